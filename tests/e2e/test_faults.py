"""Faults during a real training run (tiny model, real Ray, real DeepSpeed, a real redis-server with AOF): a rollout
actor killed with SIGKILL, redis-server killed with SIGKILL and restarted from its AOF, the learner process killed
with SIGKILL and the run resumed from its last checkpoint. Nothing the replay acknowledged is lost, the run goes
on, and a resumed run continues where the checkpoint left off. The run's Redis password comes from an environment
variable and appears in none of the run's files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from pydantic import SecretStr
from rich.console import Console

from cluster.launch import _checkpoint_step, train
from cluster.services import Service, free_port, start_redis
from configs.load import load_config
from replay.redis_store import RedisStore
from tests.conftest import MODEL_CACHE

pytestmark = pytest.mark.slow

PASSWORD_ENV = "PACEFLOW_TEST_REDIS_PASSWORD"


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.1)


def _learner_pid() -> int:
    """The learner's Ray worker process, found the way an operator would: by its process title."""
    found = [
        p.pid for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::Learner")
    ]
    assert len(found) == 1, f"expected one learner process, found {found}"
    return found[0]


class Faults:
    """Injects the faults from a thread while `train` runs in the test's own thread, and records what it saw."""

    def __init__(self, ray: Any, cfg: Any, run_dir: Path, start_server: Callable[[], Service], password: str) -> None:
        self.ray, self.cfg, self.run_dir = ray, cfg, run_dir
        self.start_server, self.password = start_server, password
        self.seen: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _store(self) -> RedisStore:
        replay = self.cfg.replay.model_copy(update={"password_env": None, "password": SecretStr(self.password)})
        return RedisStore(replay, run_name=self.cfg.replay_namespace)

    def _run(self) -> None:
        try:
            self._kill_an_actor()
            self._restart_redis()
            self._kill_the_learner()
        except BaseException as exc:  # reported by the test, which is waiting in train()
            self.error = exc

    def _kill_an_actor(self) -> None:
        _wait(lambda: _steps_done(self.run_dir) >= 2, 300, "step 2")
        actor = self.ray.get_actor(f"{self.cfg.replay_namespace}-rollout-0", namespace=self.cfg.cluster.namespace)
        before = self.ray.get(actor.counters.remote())
        os.kill(before["pid"], signal.SIGKILL)
        at = _steps_done(self.run_dir)

        def back() -> bool:
            try:
                now = self.ray.get(actor.counters.remote(), timeout=5)
            except Exception:  # still restarting
                return False
            self.seen["restarted_actor"] = now
            return bool(now["restarted"] and now["groups"] > 0)

        _wait(back, 240, "the killed rollout actor to come back and add groups")
        _wait(lambda: _steps_done(self.run_dir) >= at + 2, 240, "two more steps after the actor was killed")
        self.seen["actor_killed_at"] = at

    def _restart_redis(self) -> None:
        _wait(lambda: _steps_done(self.run_dir) >= self.seen["actor_killed_at"] + 2, 300, "steps")
        store = self._store()
        server = self.seen["server"]
        # Every write acknowledged from here on is in the AOF before the reply (appendfsync always).
        acknowledged = set(store.keys())
        inserted = store.stats().inserted
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait()
        at = _steps_done(self.run_dir)
        time.sleep(1.0)  # writers and the learner meet a dead server and retry
        self.seen["server"] = self.start_server()
        after = set(self._store().keys())
        self.seen["redis"] = {"acknowledged": len(acknowledged), "lost": len(acknowledged - after)}
        self.seen["redis_inserted_before"] = inserted
        _wait(lambda: _steps_done(self.run_dir) >= at + 2, 300, "two more steps after Redis restarted")
        self.seen["redis_restarted_at"] = at

    def _kill_the_learner(self) -> None:
        checkpoint = self.run_dir / "checkpoint" / "run.json"
        _wait(lambda: checkpoint.is_file() and json.loads(checkpoint.read_text())["step"] >= 6, 300, "checkpoint 6")
        self.seen["checkpoint_step"] = json.loads(checkpoint.read_text())["step"]
        self.seen["keys_at_learner_kill"] = set(self._store().keys())
        os.kill(_learner_pid(), signal.SIGKILL)


def test_a_run_survives_killed_actors_a_redis_restart_and_a_killed_learner(
    ray_local: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = secrets.token_hex(16)
    monkeypatch.setenv(PASSWORD_ENV, password)
    port, workdir = free_port(), tmp_path / "redis"
    workdir.mkdir()

    def start_server() -> Service:
        server = start_redis(port=port, password=password, appendonly=True, workdir=workdir)
        redis.Redis(port=port, password=password).config_set("appendfsync", "always")
        return server

    servers = [start_server()]
    replay = (
        f"replay={{kind: redis, port: {port}, key_prefix: faults, password_env: {PASSWORD_ENV}, "
        "max_policy_lag: 1000, capacity: 100000}"
    )
    cfg = load_config(
        "tiny_cpu",
        [
            f"model.cache_dir={MODEL_CACHE}",
            f"output_dir={tmp_path / 'runs'}",
            "name=faults",
            replay,
            "cluster.num_rollout_actors=2",
            "cluster.rollout_resources.num_cpus=0.5",
            "cluster.learner_resources.num_cpus=0.5",
            "learner.num_steps=200",  # an upper bound: the learner is killed after its checkpoint at step 6
            # In turns with the actors (one batch per weight version), so the faults meet a run in progress.
            "learner.sync=true",
            "replay.fresh_fraction=1.0",
            "rollout.prompts_per_batch=2",  # x 2 actors = learner.groups_per_step
            "learner.checkpoint_every_steps=3",
            "eval.every_steps=0",
        ],
    )
    cfg = cfg.model_copy(update={"run_id": "faulty"})
    run_dir = tmp_path / "runs" / "faults"
    faults = Faults(ray_local, cfg, run_dir, start_server, password)
    faults.seen["server"] = servers[0]
    try:
        faults.thread.start()
        crash: BaseException | None = None
        try:
            train(cfg, console=Console(width=120, file=open(os.devnull, "w")))  # noqa: SIM115
        except ray_local.exceptions.RayActorError as exc:  # the learner died: this call of train ends
            crash = exc
        faults.thread.join(60)
        assert faults.error is None, f"{faults.error!r}; seen {faults.seen}"
        assert crash is not None, f"the run did not see the learner die; seen {faults.seen}"
        seen = faults.seen

        # A killed rollout actor: Ray restarted it, it added groups again, and the learner kept stepping.
        assert seen["restarted_actor"]["restarted"] and seen["restarted_actor"]["groups"] > 0
        # redis-server killed and restarted from its AOF: every group it had acknowledged is still there.
        assert seen["redis"]["acknowledged"] > 0 and seen["redis"]["lost"] == 0, seen["redis"]

        # The learner killed after checkpoint 6 (or later): resuming redoes the steps after the checkpoint.
        at = seen["checkpoint_step"]
        quiet = Console(width=120, file=open(os.devnull, "w"))  # noqa: SIM115
        resumed = train(cfg, console=quiet, resume=run_dir, max_steps=3)
        assert [s["step"] for s in resumed.steps] == [at + 1, at + 2, at + 3]
        assert [s["version"] for s in resumed.steps] == [at + 1, at + 2, at + 3]  # weights continue, not restart
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, at + 4))  # the steps redone after the crash appear once

        # The replay is the same one: the groups present when the learner died are still there (nothing is
        # evicted at this staleness bound and capacity), and its counters went on from where they were.
        store = faults._store()
        stats = store.stats()
        assert seen["keys_at_learner_kill"] <= set(store.keys())
        assert stats.inserted == len(store) == stats.size  # every group ever inserted is present: none lost
        assert stats.inserted > seen["redis_inserted_before"]

        # A checkpoint of another model is refused before anything starts, naming the field and both values.
        other = load_config("tiny_cpu", [f"model.cache_dir={MODEL_CACHE}", "model.num_layers=3", "name=faults"])
        with pytest.raises(ValueError, match=r"model\.num_layers: checkpoint 2, this config 3"):
            train(other, console=quiet, resume=run_dir)
        # Another run that would write under this run's Redis prefix (same name and run id, another directory).
        intruder = cfg.model_copy(update={"output_dir": tmp_path / "elsewhere"})
        with pytest.raises(ValueError, match="run_dir"):
            train(intruder, console=quiet)

        # The password came from the environment and was written nowhere: configs, logs, metrics, checkpoints.
        ray_logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
        files = [p for d in (run_dir, ray_logs) for p in d.rglob("*") if p.is_file() and not p.is_symlink()]
        assert len(files) > 20 and any(p.name.startswith("worker-") for p in files)  # the actors' logs are read
        leaked = [p for p in files if password.encode() in p.read_bytes()]
        assert not leaked, leaked
        assert PASSWORD_ENV in (run_dir / "config.yaml").read_text()
    finally:
        for server in [faults.seen["server"], *servers]:
            server.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB filesystem of its own (tmpfs), so a test can fill it up without touching anyone else's disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root or CAP_SYS_ADMIN): {done.stderr.decode()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=False)


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.rglob("*")
        if p.is_file()
    }


def test_a_full_disk_at_checkpoint_time_keeps_the_previous_checkpoint(ray_local: Any, small_disk: Path) -> None:
    """The run directory's disk fills up after the checkpoint of step 2: the checkpoint of step 4 fails with a clear
    message, leaves no partial files, the checkpoint of step 2 stays byte-for-byte intact and current, training goes
    on, and once space is free again the next checkpoint (step 6) succeeds."""
    cfg = load_config(
        "tiny_cpu",
        [
            f"model.cache_dir={MODEL_CACHE}",
            f"output_dir={small_disk}",
            "name=full",
            "learner.num_steps=8",
            "learner.checkpoint_every_steps=2",
            "learner.sync=true",
            "replay.fresh_fraction=1.0",
            "cluster.num_rollout_actors=1",
            "rollout.prompts_per_batch=4",
            "eval.every_steps=0",
        ],
    )
    run_dir, filler = small_disk / "full", small_disk / "filler"
    seen: dict[str, Any] = {}

    def fill_then_free() -> None:
        checkpoint = run_dir / "checkpoint"
        _wait(lambda: checkpoint.is_symlink() and _checkpoint_step(checkpoint) == 2, 300, "the checkpoint of step 2")
        seen["before"] = _digest(checkpoint)
        # Leave room for the run's log lines, not for a checkpoint (4-5 MB for this model).
        filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 256 * 1024))
        _wait(lambda: _steps_done(run_dir) >= 5, 300, "step 5, after the checkpoint of step 4 was tried")
        seen["during"] = (_checkpoint_step(checkpoint), _digest(checkpoint), sorted(p.name for p in run_dir.iterdir()))
        filler.unlink()

    thread = threading.Thread(target=fill_then_free, daemon=True)
    thread.start()
    out = io.StringIO()
    summary = train(cfg, console=Console(file=out, width=200))
    thread.join(30)
    text = out.getvalue()
    assert "checkpoint of step 4 failed" in text and "No space left on device" in text, text
    assert "the checkpoint of step 2 is intact" in text
    step, digest, names = seen["during"]
    assert step == 2 and digest == seen["before"]  # the previous checkpoint, current and unchanged
    assert not [n for n in names if n.endswith(".tmp") or n == "checkpoint-000004"]  # no partial checkpoint left
    assert [s["step"] for s in summary.steps] == list(range(1, 9))  # training went on
    assert _checkpoint_step(run_dir / "checkpoint") == 8 and sorted(run_dir.glob("checkpoint-*")) == [
        run_dir / "checkpoint-000008"
    ]
