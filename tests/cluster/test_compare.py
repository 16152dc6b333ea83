"""`paceflow compare`: every objective gets the same model, task, prompts and rollout budget, and the comparison
comes out as a table, a figure and JSON; on the tiny model, for real (Ray, the learner, the actors, evaluations)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from cluster.cli import main
from cluster.compare import RunResult, compare, final_estimates, finished_run, paired_with, plan
from tests.conftest import MODEL_CACHE


@pytest.mark.parametrize("config", ["tiny_cpu", "smollm2_cpu"])
def test_every_objective_gets_the_same_budget_and_what_it_needs(config: str, tmp_path: Path) -> None:
    runs = {k: plan(config, [], k, rollouts=960, seed=1, out=tmp_path) for k in ("grpo", "tb", "paced", "powerflow")}
    for kind, cfg in runs.items():
        assert cfg.objective.kind == kind and cfg.learner.sync and cfg.seed == 1
        groups, _ = cfg.batch_plan
        spent = cfg.learner.num_steps * groups * cfg.rollout.sampling.num_samples
        assert abs(spent - 960) <= groups * cfg.rollout.sampling.num_samples / 2  # the nearest whole step
        assert cfg.rollout.prompts_per_batch * cfg.cluster.num_rollout_actors == groups  # each step's own groups
        paced = kind == "paced"
        assert (cfg.rollout.scheduler.kind == "paced") == paced
        assert (cfg.replay.success_buffer is not None) == paced
    same = {json.dumps([c.model.model_dump(mode="json"), c.task.model_dump(mode="json"),
                        c.rollout.sampling.model_dump(mode="json"), c.learner.lr]) for c in runs.values()}  # fmt: skip
    assert len(same) == 1  # model, task, prompts, sampling and optimiser do not change with the objective


def test_unknown_objective_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "tiny_cpu", "--objectives", "grpo,ppo", "--rollouts", "64"]) == 2
    assert "--objectives: got 'ppo'" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_two_objectives_on_the_tiny_model(ray_local: Any, tmp_path: Path) -> None:
    overrides = [f"model.cache_dir={MODEL_CACHE}", "eval.num_prompts=4", "eval.num_samples=2"]
    results = compare(
        "tiny_cpu", overrides, ["grpo", "paced"], rollouts=32, seeds=1, out=tmp_path, console=Console(width=120)
    )
    assert [r.objective for r in results] == ["grpo", "paced"]
    for r in results:
        assert r.evals[0]["step"] == 0 and r.evals[0]["rollouts"] == 0  # the base model first
        assert r.evals[-1]["step"] == r.steps and 24 <= r.evals[-1]["rollouts"] <= 40  # the budget, both alike
        assert r.evals[-1]["generated"] >= r.evals[-1]["rollouts"]
        assert all("avg@2" in e for e in r.evals)
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [r["objective"] for r in saved] == ["grpo", "paced"]
    table = (tmp_path / "compare.md").read_text()
    assert "| grpo | 1 |" in table and "| paced | 1 |" in table and "compare.png" in table
    # PACED-RL against the GRPO baseline, paired prompt by prompt on the same held-out prompts of the same seed.
    paired = paired_with(results, "grpo")
    assert list(paired) == ["paced"] and paired["paced"].n == 4  # eval.num_prompts=4
    assert paired["paced"].low <= paired["paced"].mean <= paired["paced"].high
    assert "| objective | minus grpo [95% CI] |" in table and f"| paced | {paired['paced'].mean:+.3f} [" in table
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    # Again with the same budget: both runs are reused (no training), the table comes out the same.
    console = Console(width=120, record=True)
    again = compare("tiny_cpu", overrides, ["grpo", "paced"], rollouts=32, seeds=1, out=tmp_path, console=console)
    assert console.export_text().count("reusing the finished run") == 2
    assert [(r.objective, r.steps, r.evals) for r in again] == [(r.objective, r.steps, r.evals) for r in results]
    assert (tmp_path / "compare.md").read_text() == table
    changed = plan("tiny_cpu", [*overrides, "learner.lr=2.5e-4"], "grpo", rollouts=32, seed=0, out=tmp_path)
    assert finished_run(changed) is None  # another config is never taken for this one


def test_final_accuracy_has_a_t_interval_across_seeds() -> None:
    """With several seeds the table's interval is across training runs (t with seeds - 1 degrees of freedom);
    with one seed it falls back to that run's own interval over prompts."""

    def run(kind: str, seed: int, final: float) -> RunResult:
        base = {"step": 0, "rollouts": 0, "elapsed_s": 10.0, "avg@8": {"mean": 0.3, "low": 0.2, "high": 0.4, "n": 80}}
        end = {"step": 8, "rollouts": 512, "elapsed_s": 500.0 + seed, "avg@8": {"mean": final, "low": 0.0, "high": 1.0}}
        return RunResult(kind, seed, 8, f"/runs/{kind}-s{seed}", [base, end])

    finals = [0.60, 0.70, 0.65]
    table = final_estimates([run("grpo", s, f) for s, f in enumerate(finals)] + [run("tb", 0, 0.5)])
    half = 4.303 * statistics.stdev(finals) / math.sqrt(3)  # t(0.975, 2) = 4.303
    assert table["grpo"]["final"] == pytest.approx(0.65) and table["grpo"]["seeds"] == 3
    assert (table["grpo"]["low"], table["grpo"]["high"]) == pytest.approx((0.65 - half, 0.65 + half))
    assert table["grpo"]["seconds"] == pytest.approx(501.0) and table["grpo"]["base"] == pytest.approx(0.3)
    assert (table["tb"]["low"], table["tb"]["high"], table["tb"]["seeds"]) == (0.0, 1.0, 1)  # the run's own interval
