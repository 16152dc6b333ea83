"""`paceflow compare`: objectives head to head on one rollout budget.

Each objective trains the same model on the same task and prompts, from the same seeds, in synchronous mode, so
that every learner step consumes exactly the groups generated for it and "the same number of rollouts" means the
same thing for all: steps = budget / (fresh groups per step x responses per group). What an objective needs comes
with it and nothing else changes: PACED-RL its prompt scheduler and success buffer, the others uniform prompts and
no success buffer; an objective that is the config's own keeps the config's settings for it. Every run is
evaluated on the held-out split before training, a few times during it and at the end.

A run whose directory already holds a finished run of exactly the planned config (its summary.json and the config
`train` saved) is reused, not trained again: re-running compare with more seeds or objectives trains only what
is missing.

Outputs in OUT: compare.json (every evaluation of every run), compare.md (the table, the figure and the command),
compare.png (held-out accuracy against rollouts and against seconds), and each run's own directory.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from cluster.evaluate import Estimate, PromptResult, mean_ci, paired_difference, results_from_json, t_quantile_975
from configs.load import ConfigError, load_config
from configs.schema import RunConfig

if TYPE_CHECKING:
    from cluster.launch import TrainSummary

OBJECTIVES = ("grpo", "tb", "paced", "powerflow")
EVALS_PER_RUN = 4


@dataclass
class RunResult:
    objective: str
    seed: int
    steps: int
    run_dir: str
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Per evaluation: step, rollouts, elapsed_s and the avg@k estimate (mean, low, high, n)."""


def objective_overrides(base: RunConfig, kind: str) -> list[str]:
    """The overrides that make `base` train with objective `kind` and what that objective needs."""
    if kind not in OBJECTIVES:
        raise ConfigError(f"--objectives: got {kind!r}, allowed {', '.join(OBJECTIVES)}")
    objective = [] if base.objective.kind == kind else [f"objective={{kind: {kind}}}"]
    if kind == "paced":
        keep_buffer = base.objective.kind == "paced" and base.replay.success_buffer is not None
        return [*objective, "rollout.scheduler={kind: paced}", *([] if keep_buffer else ["replay.success_buffer={}"])]
    return [*objective, "rollout.scheduler={kind: uniform}", "replay.success_buffer=null"]


def plan(config: str, overrides: list[str], kind: str, *, rollouts: int, seed: int, out: Path) -> RunConfig:
    """The config of one run: `kind` on `config`'s model, task and prompts, sized to `rollouts` responses. One
    actor generates exactly the fresh groups each step trains on (learner.sync), so steps x groups x G is the
    budget for every objective alike."""
    base = load_config(config, overrides)
    shaped = [*overrides, *objective_overrides(base, kind)]
    # Fresh groups per step (PACED-RL's success buffer takes a share), from the config before it is made synchronous.
    groups = load_config(config, [*shaped, "learner.sync=false"]).batch_plan[0]
    steps = max(1, round(rollouts / (groups * base.rollout.sampling.num_samples)))
    return load_config(
        config,
        [
            *shaped,
            "learner.sync=true",
            "replay.fresh_fraction=1.0",
            "cluster.num_rollout_actors=1",
            f"rollout.prompts_per_batch={groups}",
            f"learner.num_steps={steps}",
            f"eval.every_steps={max(1, math.ceil(steps / EVALS_PER_RUN))}",
            f"seed={seed}",
            f"name={base.name}-{kind}-s{seed}",
            f"output_dir={out}",
        ],
    )


def compare(
    config: str,
    overrides: list[str],
    objectives: list[str],
    *,
    rollouts: int,
    seeds: int,
    out: Path,
    console: Console,
    command: str | None = None,
) -> list[RunResult]:
    """Train every objective with every seed (sequentially, on this Ray), then write the table and the figure."""
    from cluster.launch import train

    if rollouts < 1 or seeds < 1:
        raise ConfigError(f"--rollouts and --seeds must be >= 1 (got {rollouts} and {seeds})")
    configs = [plan(config, overrides, k, rollouts=rollouts, seed=s, out=out) for s in range(seeds) for k in objectives]
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, cfg in enumerate(configs, 1):
        what = f"[bold]compare[/] run {i}/{len(configs)}: {cfg.objective.kind}, seed {cfg.seed}"
        summary = finished_run(cfg)
        if summary is not None:
            console.print(f"{what}: reusing the finished run in {summary.run_dir}")
        else:
            console.print(f"{what}, {cfg.learner.num_steps} steps")
            summary = train(cfg, console=console)
        result = RunResult(cfg.objective.kind, cfg.seed, len(summary.steps), str(summary.run_dir))
        per_step = cfg.batch_plan[0] * cfg.rollout.sampling.num_samples  # what each synchronous step consumed
        for e in summary.evals:
            name, accuracy = accuracy_metric(e["metrics"])
            result.evals.append(
                {
                    "step": e["step"],
                    "rollouts": e["step"] * per_step,
                    "generated": e["rollouts"],  # includes the batch the actor had ready for the next step
                    "elapsed_s": e["elapsed_s"],
                    name: accuracy,
                }
            )
        results.append(result)
        (out / "compare.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    write_report(results, out, command=command)
    console.print(summary_table(results))
    console.print(f"table and figure: {out / 'compare.md'}, {out / 'compare.png'}")
    return results


def finished_run(cfg: RunConfig) -> TrainSummary | None:
    """The summary of a run of exactly `cfg` that finished in its output directory, else None. The saved config is
    compared as `train` resolved it (run id, weight transport), the output directory aside (runs may be moved)."""
    from cluster.launch import TrainSummary, resolve_replay_host, resolve_weight_transport

    run_dir = Path(cfg.output_dir).expanduser() / cfg.name
    summary, saved_path = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary.is_file() and saved_path.is_file()):
        return None
    saved = load_config(str(saved_path), [])
    planned = resolve_weight_transport(resolve_replay_host(cfg.model_copy(update={"run_id": saved.run_id})))
    if planned.model_dump(exclude={"output_dir"}) != saved.model_dump(exclude={"output_dir"}):
        return None
    data = json.loads(summary.read_text())
    return TrainSummary(run_dir=run_dir, steps=data["steps"], evals=data["evals"])


def accuracy_metric(evaluation: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """The avg@k entry of an evaluation's metrics (k is the evaluation's samples per prompt): (name, estimate)."""
    name = next(k for k in evaluation if k.startswith("avg@"))
    return name, evaluation[name]


def final_estimates(results: list[RunResult]) -> dict[str, dict[str, float]]:
    """Per objective: the final held-out accuracy, mean over seeds with a 95% t-interval (one seed: the run's
    own interval over prompts), the base model's, and the rollouts and seconds it took."""
    out: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(r.objective for r in results):
        runs = [r for r in results if r.objective == kind and r.evals]
        finals = [accuracy_metric(r.evals[-1])[1] for r in runs]
        means = [f["mean"] for f in finals]
        mean = statistics.fmean(means)
        if len(means) > 1:
            half = t_quantile_975(len(means) - 1) * statistics.stdev(means) / math.sqrt(len(means))
            low, high = max(0.0, mean - half), min(1.0, mean + half)  # an accuracy stays in [0, 1]
        else:
            low, high = finals[0]["low"], finals[0]["high"]
        out[kind] = {
            "final": mean,
            "low": low,
            "high": high,
            "base": statistics.fmean(accuracy_metric(r.evals[0])[1]["mean"] for r in runs),
            "rollouts": statistics.fmean(r.evals[-1]["rollouts"] for r in runs),
            "seconds": statistics.fmean(r.evals[-1]["elapsed_s"] for r in runs),
            "seeds": len(runs),
        }
    return out


def paired_with(results: list[RunResult], baseline: str) -> dict[str, Estimate]:
    """Per objective: its final held-out accuracy minus `baseline`'s, paired prompt by prompt within each seed
    (both runs of a seed evaluate the same held-out prompts); with several seeds, the mean of the per-seed
    differences with a t-interval across seeds. Far tighter than comparing two finals' own intervals, because the
    prompts' difficulty cancels."""
    finals = {(r.objective, r.seed): _final_prompts(r) for r in results if r.evals}
    metric = accuracy_metric(results[0].evals[-1])[0]
    out: dict[str, Estimate] = {}
    for kind in dict.fromkeys(r.objective for r in results):
        if kind == baseline:
            continue
        seeds = sorted(s for k, s in finals if k == kind and (baseline, s) in finals)
        per_seed = [paired_difference(finals[(baseline, s)], finals[(kind, s)], metric) for s in seeds]
        if len(per_seed) == 1:
            out[kind] = per_seed[0]
        elif per_seed:
            out[kind] = mean_ci([e.mean for e in per_seed])
    return out


def _final_prompts(result: RunResult) -> list[PromptResult]:
    """The per-prompt results of a run's last evaluation (its evals.jsonl)."""
    lines = (Path(result.run_dir) / "evals.jsonl").read_text().splitlines()
    return results_from_json(json.loads(lines[-1])["per_prompt"]) if lines else []


def summary_table(results: list[RunResult]) -> Table:
    table = Table(title="paceflow compare: held-out accuracy at the end of the same rollout budget")
    for column in ("objective", "seeds", "base", "final [95% CI]", "gain", "rollouts", "seconds"):
        table.add_column(column, justify="left" if column == "objective" else "right")
    for kind, e in final_estimates(results).items():
        table.add_row(
            kind,
            str(int(e["seeds"])),
            f"{e['base']:.3f}",
            f"{e['final']:.3f} [{e['low']:.3f}, {e['high']:.3f}]",
            f"{e['final'] - e['base']:+.3f}",
            f"{e['rollouts']:.0f}",
            f"{e['seconds']:.0f}",
        )
    return table


def write_report(results: list[RunResult], out: Path, *, command: str | None) -> None:
    """compare.md (table + figure + command) and compare.png."""
    estimates = final_estimates(results)
    metric = accuracy_metric(results[0].evals[0])[0] if results and results[0].evals else "avg@k"
    lines = [
        "# paceflow compare",
        "",
        f"Held-out {metric} after the same rollout budget; mean over seeds with a 95% t-interval across seeds "
        "(one seed: the interval over held-out prompts).",
        "",
        "| objective | seeds | base | final [95% CI] | gain | rollouts | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, e in estimates.items():
        lines.append(
            f"| {kind} | {e['seeds']:.0f} | {e['base']:.3f} | {e['final']:.3f} [{e['low']:.3f}, {e['high']:.3f}] | "
            f"{e['final'] - e['base']:+.3f} | {e['rollouts']:.0f} | {e['seconds']:.0f} |"
        )
    baseline = "grpo" if "grpo" in estimates else next(iter(estimates), None)
    paired = paired_with(results, baseline) if baseline is not None and len(estimates) > 1 else {}
    if paired:
        lines += [
            "",
            f"Against {baseline}, paired prompt by prompt within each seed (final {metric} minus {baseline}'s; "
            "several seeds: the mean of the per-seed differences, t-interval across seeds):",
            "",
            f"| objective | minus {baseline} [95% CI] |",
            "|---|---|",
            *(f"| {k} | {e.mean:+.3f} [{e.low:+.3f}, {e.high:+.3f}] |" for k, e in paired.items()),
        ]
    lines += ["", "![held-out accuracy against rollouts and seconds](compare.png)", ""]
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    (out / "compare.md").write_text("\n".join(lines))
    _plot(results, out / "compare.png", metric)


def _plot(results: list[RunResult], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {kind: palette[i % len(palette)] for i, kind in enumerate(dict.fromkeys(r.objective for r in results))}
    for kind, color in colors.items():
        runs = [r for r in results if r.objective == kind and r.evals]
        for r in runs:  # each seed thin, their mean thick
            ys = [accuracy_metric(e)[1]["mean"] for e in r.evals]
            axes[0].plot([e["rollouts"] for e in r.evals], ys, color=color, alpha=0.25, linewidth=1)
            axes[1].plot([e["elapsed_s"] for e in r.evals], ys, color=color, alpha=0.25, linewidth=1)
        n = min(len(r.evals) for r in runs)
        mean_y = [statistics.fmean(accuracy_metric(r.evals[i])[1]["mean"] for r in runs) for i in range(n)]
        mean_x = [statistics.fmean(r.evals[i]["rollouts"] for r in runs) for i in range(n)]
        mean_t = [statistics.fmean(r.evals[i]["elapsed_s"] for r in runs) for i in range(n)]
        label = f"{kind} (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''})"
        axes[0].plot(mean_x, mean_y, marker="o", color=color, linewidth=2, label=label)
        axes[1].plot(mean_t, mean_y, marker="o", color=color, linewidth=2)
    axes[0].set_xlabel("rollouts (responses trained on)")
    axes[1].set_xlabel("seconds since the run started")
    axes[0].set_ylabel(f"held-out {metric}")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("paceflow compare: one rollout budget, every objective")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
