"""The soak benchmark (bench/soak.py) at CI length: 8 writer processes and the learner on one real redis-server for
about a minute, with connections killed and replies lost on the way. Asserts the invariants, never timings."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SOAK = REPO / "bench" / "soak.py"


def ours_alive(pid: int) -> bool:
    """Whether `pid` is still a soak process or a redis-server (a reused PID of someone else's does not count)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"soak.py" in cmdline or b"redis-server" in cmdline


@pytest.mark.slow
def test_eight_writers_and_the_learner_lose_and_duplicate_nothing_in_bounded_memory() -> None:
    argv = [sys.executable, str(SOAK), "--writers", "8", "--seconds", "40", "--baseline-seconds", "5"]
    argv += ["--kill-every", "5"]
    # Its own process group holds the soak, its writers, its learner and its redis-server: killed together below
    # if anything is left, even when the soak itself hangs or dies.
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result: dict[str, Any] = json.loads(out)
    failed = [name for name, ok in result["invariants"].items() if not ok]
    assert not failed, f"invariants failed: {failed}\n{json.dumps(result['phases'], indent=1)[:6000]}"
    assert proc.returncode == 0 and result["ok"]
    assert result["lost"] == 0 and result["duplicated"] == 0

    main = result["phases"]["main"]
    store = main["store"]
    assert main["writers"] == 8 and main["checks"]["every_writer_acknowledged_groups"]
    assert main["learner"]["batches"] >= 50, main["learner"]  # the learner kept sampling beside 8 writers
    assert store["evicted_capacity"] > 0 and store["evicted_stale"] > 0  # both evictions ran
    assert store["duplicates"] > 0  # retries with the same ids really reached the store, and were dropped
    memory = main["memory"]
    assert memory["bounded"], json.dumps(memory, indent=1)
    assert {"redis_used_memory", "rss_learner", *(f"rss_writer-{i}" for i in range(8))} <= set(memory["series"])

    pids = [pid for phase in result["phases"].values() for pid in phase["pids"]] + [result["redis_pid"]]
    assert not [pid for pid in pids if ours_alive(pid)], "the soak left processes behind"
