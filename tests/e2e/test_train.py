"""End to end on CPU with real Ray, real DeepSpeed, real Redis and a tiny model: two rollout actors stream into
the replay while the learner trains, publishes weights and the actors pick them up."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from transformers import AutoModelForCausalLM

from cluster.launch import train
from configs.load import load_config
from replay.store import ReplayStats
from tests.conftest import MODEL_CACHE

pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, *overrides: str) -> Any:
    return load_config(
        "tiny_cpu",
        [
            f"model.cache_dir={MODEL_CACHE}",
            f"output_dir={tmp_path}",
            "cluster.num_rollout_actors=2",
            "cluster.rollout_resources.num_cpus=0.5",
            "cluster.learner_resources.num_cpus=0.5",
            "learner.num_steps=24",
            "learner.lr=1e-3",
            # log R = r / beta: the residual starts near -sum log pi (~-70 nats for a random model), so the
            # loss must fall by orders of magnitude as log Z and the policy learn.
            "objective.use_reference=false",
            "objective.log_z_lr=0.05",
            "objective.log_z_clamp=500",
            "eval.every_steps=12",
            "eval.num_prompts=4",
            *overrides,
        ],
    )


def _check_run(summary: Any, max_lag: int, min_drawn: float) -> None:
    steps = summary.steps
    assert len(steps) == 24
    # The loss falls: medians, because a step whose batch holds prompts the log Z head has not fit yet (or groups
    # 4 versions old) spikes alone (one step at 5-8k among neighbours at 100-300 in runs here) and a sum over a
    # few steps then measures that one step, not the trend.
    losses = [round(s["loss"], 1) for s in steps]
    assert statistics.median(losses[-6:]) < 0.5 * statistics.median(losses[:6]), losses
    assert [s["version"] for s in steps] == list(range(1, 25))  # a new weight version every step
    assert max(s["lag_max"] for s in steps) <= max_lag  # the staleness bound holds
    assert [e["step"] for e in summary.evals] == [0, 12, 24]  # the baseline, then every eval.every_steps
    assert all(e["prompts"] == 4 and "avg@2" in e["metrics"] for e in summary.evals)
    alive = [c for c in summary.actor_counters if "error" not in c or c["error"] is None]
    assert len(alive) == 2
    assert all(c["weight_updates"] > 0 and c["weight_version"] > 0 for c in alive)  # actors took new weights
    assert all(c["groups"] > 0 for c in alive)
    # The rate limit (rollout.max_ahead_batches, default 1) with oldest-first fresh draws: what the actors generate
    # is trained on, not left to go stale.
    replay = ReplayStats(**summary.replay_stats)
    assert replay.drawn_fraction >= min_drawn, summary.replay_stats
    assert "drawn by a batch" in summary.report.read_text()
    model = AutoModelForCausalLM.from_pretrained(summary.final_dir)  # the final checkpoint loads
    assert model.config.hidden_size == 128
    assert (summary.run_dir / "metrics.jsonl").read_text().count("\n") == 24
    # Every run can be looked at: plots and a markdown report with the before/after table.
    assert summary.report is not None and "## Held-out: step 0 vs step 24" in summary.report.read_text()
    for plot in ("heldout.png", "training.png"):
        assert (summary.run_dir / plot).stat().st_size > 10_000


def test_train_with_the_in_process_replay(ray_local: Any, tmp_path: Path) -> None:
    summary = train(_cfg(tmp_path, "replay.max_policy_lag=4"), console=Console(width=120))
    _check_run(summary, max_lag=4, min_drawn=0.9)


def test_train_with_the_redis_replay(ray_local: Any, redis_server: Any, tmp_path: Path) -> None:
    summary = train(
        _cfg(tmp_path, f"replay={{kind: redis, port: {redis_server.port}, key_prefix: e2e, max_policy_lag: 4}}"),
        console=Console(width=120),
    )
    # The original 0.8 bar, at the in-process run's lag bound 4. At lag 3 the tiny learner steps so much faster than
    # an HF actor generates that a group taking over 3 learner steps to generate arrives stale and is evicted
    # unsampled whatever the rate limit does: 91-92% drawn on the AMD machine, 73-79% in full suites on the slower
    # Intel one; at lag 4 86% there. Groups that arrive already stale are now refused and counted apart
    # (stale_on_arrival), outside this share, which so measures what the rate limit lets go stale in the replay.
    _check_run(summary, max_lag=4, min_drawn=0.8)
    assert summary.replay_stats["inserted"] > 0


def test_resume_continues_exactly_like_an_uninterrupted_run(ray_local: Any, tmp_path: Path) -> None:
    """Synchronous mode, same seeds: 6 steps in one go, or 3 steps, stop, and --resume for 3 more, give the same
    losses at steps 4-6 (learner, optimizer, log Z head, replay, scheduler and counters all restored)."""
    sync = [
        "learner.sync=true",
        "replay.fresh_fraction=1.0",
        "cluster.num_rollout_actors=1",
        "rollout.prompts_per_batch=4",
        "learner.groups_per_step=4",
        "learner.num_steps=6",
        "eval.every_steps=0",
    ]
    full = train(_cfg(tmp_path / "full", *sync), console=Console(width=120))
    part = train(_cfg(tmp_path / "part", *sync), console=Console(width=120), max_steps=3)
    assert [s["step"] for s in part.steps] == [1, 2, 3]
    resumed = train(_cfg(tmp_path / "part", *sync), console=Console(width=120), resume=part.run_dir)
    assert [s["step"] for s in resumed.steps] == [4, 5, 6]
    assert [s["version"] for s in resumed.steps] == [4, 5, 6]
    for uninterrupted, continued in zip(full.steps[3:], resumed.steps, strict=True):
        assert continued["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-5, abs=1e-6)
    assert full.steps[3]["loss"] != full.steps[4]["loss"]  # the comparison is not trivially equal
