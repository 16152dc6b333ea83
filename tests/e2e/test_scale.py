"""Rollout actors scaled at runtime, as `paceflow scale` does it: 1 -> 3 -> 1 actors during a CPU run, without
restarting the learner, with the actor-count and throughput metrics following, no acknowledged group lost, and
the run ended cleanly by `paceflow stop`."""

from __future__ import annotations

import io
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from cluster.cli import main
from cluster.launch import TrainSummary, train
from cluster.services import free_port
from configs.load import load_config
from tests.conftest import MODEL_CACHE

pytestmark = pytest.mark.slow


def _scrape(port: int) -> dict[str, float]:
    """Every sample on the run's endpoint: 'name{labels}' -> value (none while the endpoint is not up yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def _actors_with_tokens(samples: dict[str, float]) -> set[str]:
    pattern = re.compile(r'paceflow_rollout_tokens_total\{actor="([^"]+)"')
    return {m.group(1) for key, value in samples.items() if (m := pattern.match(key)) and value > 0}


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_scale_one_to_three_to_one_while_training(
    ray_local: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    cfg = load_config(
        "tiny_cpu",
        [
            f"model.cache_dir={MODEL_CACHE}",
            f"output_dir={tmp_path}",
            "cluster.num_rollout_actors=1",
            "cluster.rollout_resources.num_cpus=0.25",
            "cluster.learner_resources.num_cpus=0.25",
            "learner.num_steps=100000",  # ended by `paceflow stop` below
            "eval.every_steps=0",
            f"metrics.port={port}",
            "metrics.poll_s=0.5",
        ],
    )
    run_dir = tmp_path / cfg.name
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["summary"] = train(cfg, console=Console(file=io.StringIO(), width=120))
        except BaseException as exc:  # surfaced by the assertions below
            result["error"] = exc

    driver = threading.Thread(target=run, daemon=True)
    driver.start()
    try:
        _wait_for("the first actor's throughput", lambda: "rollout-0" in _actors_with_tokens(_scrape(port)))
        assert main(["scale", str(run_dir), "--actors", "3"]) == 0
        _wait_for(
            "three actors producing",
            lambda: (
                _scrape(port).get(f'paceflow_rollout_actors{{run="{cfg.name}"}}') == 3
                and _actors_with_tokens(_scrape(port)) >= {"rollout-0", "rollout-1", "rollout-2"}
            ),
        )
        steps_at_three = _scrape(port)[f'paceflow_learner_steps_total{{run="{cfg.name}"}}']
        assert main(["scale", str(run_dir), "--actors", "1"]) == 0
        _wait_for("one actor again", lambda: _scrape(port).get(f'paceflow_rollout_actors{{run="{cfg.name}"}}') == 1)
        _wait_for(  # training continues with one actor
            "more learner steps",
            lambda: _scrape(port).get(f'paceflow_learner_steps_total{{run="{cfg.name}"}}', 0) > steps_at_three + 5,
        )
        capsys.readouterr()
        assert main(["status", str(run_dir)]) == 0
        assert "rollout-0" in capsys.readouterr().out
        assert main(["scale", str(run_dir), "--actors", "0"]) == 2  # a clear refusal, nothing changes
    finally:
        _wait_for("the run's control.json", lambda: (run_dir / "control.json").is_file() or not driver.is_alive())
        main(["stop", str(run_dir)])
        driver.join(timeout=300)
    assert "error" not in result, result.get("error")
    summary: TrainSummary = result["summary"]
    ids = sorted(c["actor_id"] for c in summary.actor_counters)
    assert ids == ["rollout-0", "rollout-1", "rollout-2"]
    assert all(c["error"] is None and c["groups"] > 0 for c in summary.actor_counters)
    # Nothing an actor pushed is lost: the replay took every group the three actors made, but for those refused
    # because their weights were already more than replay.max_policy_lag versions old when they arrived.
    made = sum(c["groups"] for c in summary.actor_counters)
    assert summary.replay_stats["inserted"] + summary.replay_stats["stale_on_arrival"] == made
    assert summary.replay_stats["duplicates"] == 0
    assert (run_dir / "checkpoint" / "run.json").is_file() and summary.final_dir is not None
    assert main(["status", str(run_dir)]) == 1  # the run is over: a clear error, not a hang
