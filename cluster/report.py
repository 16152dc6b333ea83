"""What a run shows: PNG plots and a short markdown report, written into every run directory.

Inputs (all written by `paceflow train`): `metrics.jsonl` (one line per learner step), `evals.jsonl` (one line
per held-out evaluation, with every prompt's rewards so that before/after differences can be paired),
`calibration.jsonl` (PACED-RL: each fresh group's a(x) and accuracy), `summary.json` and `config.yaml`.
Outputs: `heldout.png`, `training.png`, `calibration.png` (PACED-RL), `report.md`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from cluster.evaluate import Estimate, PromptResult, paired_difference, results_from_json, summarize
from replay.store import ReplayStats


@dataclass(frozen=True)
class EvalPoint:
    """One held-out evaluation of a run."""

    step: int
    rollouts: int
    elapsed_s: float
    results: list[PromptResult]

    @property
    def samples(self) -> int:
        return len(self.results[0].rewards) if self.results else 0


@dataclass(frozen=True)
class Comparison:
    """A metric before and after training, and the paired difference, each with its 95% CI."""

    metric: str
    before: Estimate
    after: Estimate
    gain: Estimate


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_evals(run_dir: Path) -> list[EvalPoint]:
    return [
        EvalPoint(
            int(row["step"]),
            int(row.get("rollouts", 0)),
            float(row.get("elapsed_s", 0.0)),
            results_from_json(row["per_prompt"]),
        )
        for row in read_jsonl(run_dir / "evals.jsonl")
    ]


def pass_ks(samples: int) -> tuple[int, ...]:
    return (1, samples) if samples > 1 else (1,)


def compare(before: EvalPoint, after: EvalPoint) -> list[Comparison]:
    """Every held-out metric of the first and last evaluations, with the paired (per-prompt) difference."""
    ks = pass_ks(min(before.samples, after.samples))
    first, last = summarize(before.results, ks), summarize(after.results, ks)
    return [
        Comparison(name, first[name], last[name], paired_difference(before.results, after.results, name, ks))
        for name in first
        if name in last
    ]


def headline_metric(samples: int) -> str:
    return f"avg@{samples}"


def before_after_table(before: EvalPoint, after: EvalPoint, title: str) -> Table:
    table = Table(title=title, caption="mean ± 95% CI over held-out prompts; gains paired prompt by prompt")
    table.add_column("held-out metric")
    table.add_column(f"step {before.step}", justify="right")
    table.add_column(f"step {after.step}", justify="right")
    table.add_column("gain [95% CI]", justify="right")
    for c in compare(before, after):
        if c.metric.startswith("distinct_") and c.metric not in ("distinct_1", "distinct_answers"):
            continue
        gain = "-" if math.isnan(c.gain.mean) else f"{c.gain.mean:+.3f} {_interval(c.gain)}"
        table.add_row(c.metric, str(c.before), str(c.after), gain)
    return table


def _interval(e: Estimate) -> str:
    return "-" if math.isnan(e.mean) else f"[{e.low:+.3f}, {e.high:+.3f}]"


# --------------------------------------------------------------------------------------------------- plots
def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        if not math.isnan(v):
            acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc) if acc else math.nan)
    return out


def plot_heldout(evals: Sequence[EvalPoint], path: Path) -> None:
    import matplotlib.pyplot as plt

    metric = headline_metric(evals[0].samples)
    points = [(e, summarize(e.results, pass_ks(e.samples))[metric]) for e in evals]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, x_of, label in (
        (axes[0], lambda e: e.step, "learner step"),
        (axes[1], lambda e: e.rollouts, "rollouts generated (responses)"),
    ):
        xs = [x_of(e) for e, _ in points]
        means = [s.mean for _, s in points]
        errors = [s.half_width for _, s in points]
        ax.errorbar(xs, means, yerr=errors, marker="o", capsize=4, color="tab:blue")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out {metric} (95% CI)")
    fig.suptitle(f"Held-out accuracy ({len(evals[0].results)} prompts x {evals[0].samples} samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(steps: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    x = [s["step"] for s in steps]
    panels = [
        ("on-policy reward", [s["reward_mean"] for s in steps]),
        ("loss", [s["loss"] for s in steps]),
        ("response length (tokens)", [s["metrics"].get("response_len_mean", math.nan) for s in steps]),
        ("policy lag (versions)", [s["lag_mean"] for s in steps]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    window = max(1, len(steps) // 10)
    for ax, (title, ys) in zip(axes.flat, panels, strict=True):
        ys = [math.nan if y is None else float(y) for y in ys]
        ax.plot(x, ys, color="tab:gray", alpha=0.5, lw=1, label="per step")
        ax.plot(x, _moving_average(ys, window), color="tab:blue", lw=2, label=f"mean of {window}")
        ax.set_title(title)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    if all(s["loss"] > 0 for s in steps):
        axes[0][1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(steps: Sequence[dict[str, Any]], groups: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [s["step"] for s in steps]
    window = max(3, len(steps) // 8)
    mae = [s["metrics"].get("calib_mae", math.nan) for s in steps]
    const = [s["metrics"].get("calib_mae_const", math.nan) for s in steps]
    axes[0].plot(x, _moving_average(mae, window), lw=2, label="a(x) = beta log Z_phi(x)")
    axes[0].plot(x, _moving_average(const, window), lw=2, ls="--", label="constant: recent mean accuracy")
    axes[0].set_xlabel("learner step")
    axes[0].set_ylabel(f"mean |a(x) - group accuracy| (mean of {window})")
    axes[0].set_title("Calibration error on fresh groups (out of sample)")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    late = [g for g in groups if g["step"] > (steps[-1]["step"] if steps else 0) / 2]
    est = [g["estimate"] for g in late]
    acc = [g["accuracy"] for g in late]
    axes[1].scatter(est, acc, s=10, alpha=0.35, color="tab:gray", label="one fresh group")
    centres, means = [], []
    for b in range(5):  # five bins of a(x); the last one includes 1.0
        inside = [(e, a) for e, a in zip(est, acc, strict=True) if min(int(e * 5), 4) == b]
        if inside:
            centres.append(sum(e for e, _ in inside) / len(inside))
            means.append(sum(a for _, a in inside) / len(inside))
    axes[1].plot(centres, means, marker="o", lw=2, color="tab:blue", label="binned mean")
    axes[1].plot([0, 1], [0, 1], color="black", lw=1, ls=":", label="perfect calibration")
    axes[1].set_xlim(-0.02, 1.02)
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_xlabel("estimated accuracy a(x) when the prompt was scheduled")
    axes[1].set_ylabel("accuracy of the group (N_correct / G)")
    axes[1].set_title("Reliability, second half of the run")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- report
def informative_shares(steps: Sequence[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Per selection rule, over the run: (groups with 0 < accuracy < 1, groups)."""
    out: dict[str, tuple[int, int]] = {}
    for how in ("paced", "explore", "uniform"):
        total = sum(int(s["metrics"].get(f"groups_{how}", 0)) for s in steps)
        informative = sum(int(s["metrics"].get(f"informative_{how}", 0)) for s in steps)
        if total:
            out[how] = (informative, total)
    return out


def write_report(run_dir: Path) -> Path:
    """Draw the plots and write report.md; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    steps = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_evals(run_dir)
    groups = read_jsonl(run_dir / "calibration.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    lines = [f"# Run `{run_dir.name}`", ""]
    if summary.get("command"):
        lines += ["Reproduce with:", "", "```bash", summary["command"], "```", ""]
    lines += _setup_lines(run_dir, steps, summary)
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        lines += [
            f"## Held-out: step {first.step} vs step {last.step}",
            "",
            f"{len(last.results)} held-out prompts x {last.samples} samples; mean ± 95% CI over prompts; the gain is "
            "the paired per-prompt difference.",
            "",
            "| metric | before | after | gain | 95% CI of the gain |",
            "|---|---|---|---|---|",
        ]
        for c in compare(first, last):
            gain = "-" if math.isnan(c.gain.mean) else f"{c.gain.mean:+.3f}"
            lines.append(f"| {c.metric} | {c.before} | {c.after} | {gain} | {_interval(c.gain)} |")
        lines.append("")
    if evals:
        plot_heldout(evals, run_dir / "heldout.png")
        lines += ["![held-out accuracy](heldout.png)", ""]
    if steps:
        plot_training(steps, run_dir / "training.png")
        lines += ["## Training", "", "![training curves](training.png)", ""]
    if any("calib_mae" in s["metrics"] for s in steps):
        plot_calibration(steps, groups, run_dir / "calibration.png")
        lines += _calibration_lines(steps)
        lines += ["![calibration](calibration.png)", ""]
    shares = informative_shares(steps)
    if shares:
        lines += [
            "## Informative prompts",
            "",
            "Share of fresh groups whose responses differ in reward (0 < accuracy < 1), by how the prompt was chosen "
            "(`explore` = PACED-RL's uniform picks, i.e. what uniform selection gives):",
            "",
            "| selection | informative | groups | share |",
            "|---|---|---|---|",
        ]
        lines += [f"| {how} | {i} | {n} | {i / n:.2f} |" for how, (i, n) in shares.items()]
        lines.append("")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _setup_lines(run_dir: Path, steps: Sequence[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    import yaml

    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    if not cfg or not steps:
        return []
    task = cfg["task"]
    task_name = task.get("name", task["kind"])
    obj = cfg["objective"]
    sampling = cfg["rollout"]["sampling"]
    learner = cfg["learner"]
    elapsed = steps[-1].get("elapsed_s", 0.0)
    lines = [
        "## Setup",
        "",
        f"- model `{cfg['model']['kind']}`, task `{task_name}` {task.get('kwargs', '')}, objective `{obj['kind']}`",
        f"- {learner['groups_per_step']} groups x {sampling['num_samples']} responses per step, "
        f"lr {learner['lr']}, temperature {sampling['temperature']}, max {sampling['max_new_tokens']} new tokens",
        f"- {len(steps)} learner steps in {elapsed / 60:.1f} min; {steps[-1].get('rollouts', 0)} responses generated, "
        f"{sum(s['rows'] for s in steps)} trained on",
    ]
    replay = summary.get("replay") or {}
    if replay.get("inserted"):
        stats = ReplayStats(**{k: v for k, v in replay.items() if k in ReplayStats.__dataclass_fields__})
        lines.append(
            f"- replay: {stats.inserted} groups inserted, {stats.drawn_fraction:.0%} of those settled drawn by a "
            f"batch ({stats.evicted_unsampled} evicted unsampled, of which {stats.evicted_late} arrived on their last "
            f"valid version, {stats.fresh} still fresh at the end; {stats.stale_on_arrival} more refused as stale on "
            "arrival); rate "
            f"limit rollout.max_ahead_batches = {cfg['rollout'].get('max_ahead_batches')}, learner.sync = "
            f"{learner.get('sync')}"
        )
    if replay.get("success_size") is not None and cfg["replay"].get("success_buffer"):
        lines.append(
            f"- success buffer: {replay.get('success_inserted', 0)} successful responses inserted, "
            f"{replay.get('success_size', 0)} held at the end; "
            f"{sum(s['metrics'].get('rows_replayed', 0) for s in steps):.0f} replayed rows trained on"
        )
    return [*lines, ""]


def _calibration_lines(steps: Sequence[dict[str, Any]]) -> list[str]:
    k = max(1, len(steps) // 5)

    def mean(name: str, part: Sequence[dict[str, Any]]) -> float:
        values = [s["metrics"].get(name, math.nan) for s in part]
        values = [v for v in values if v is not None and not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    first, last = steps[:k], steps[-k:]
    return [
        "## Calibration of a(x)",
        "",
        f"Mean |a(x) - group accuracy| over fresh groups, first {k} vs last {k} steps "
        f"(the estimate the scheduler used, before the step that trained on the group):",
        "",
        "| | first steps | last steps |",
        "|---|---|---|",
        f"| a(x) = beta log Z_phi(x) | {mean('calib_mae', first):.3f} | {mean('calib_mae', last):.3f} |",
        f"| constant (mean accuracy of the last 4 steps) | {mean('calib_mae_const', first):.3f} | "
        f"{mean('calib_mae_const', last):.3f} |",
        f"| correlation of a(x) with accuracy | {mean('calib_corr', first):.3f} | {mean('calib_corr', last):.3f} |",
        "",
    ]
