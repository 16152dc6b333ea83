"""`paceflow pareto`: diversity against quality for the base model and trained runs, over sampling temperatures.

PowerFlow with alpha < 1 claims more diversity at equal quality. Temperature is the free way to buy diversity
(at a cost in quality), so the base model swept over temperatures draws the frontier a trained policy has to beat:
a trained point above and to the right of the base curve is a gain no temperature gives. Diversity is the
encoder's semantic diversity and word-level distinct-2; quality is the encoder's prompt relevance (neither is the
training signal: cluster/semantic.py). Writes OUT/pareto.json, OUT/pareto.md and OUT/pareto.png.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from actors.tasks import build_task
from cluster.console import third_party_output_to
from cluster.eval_command import resolve_weights
from cluster.evaluate import Estimate, Evaluator, PromptResult, paired_difference, results_from_json, summarize
from cluster.models import resolve_model_dir
from configs.load import ConfigError
from configs.schema import RunConfig

QUALITY = "relevance"
DIVERSITY = ("semantic_diversity", "distinct_2")
SHOWN = (*DIVERSITY, QUALITY, "response_tokens")


@dataclass(frozen=True)
class Point:
    """One model at one temperature: its metrics and, for a trained model, the paired change against the base."""

    model: str
    temperature: float
    metrics: dict[str, Estimate]
    vs_base: dict[str, Estimate] | None


def run_pareto(
    cfg: RunConfig,
    *,
    runs: Sequence[str],
    temperatures: Sequence[float],
    num_prompts: int,
    num_samples: int,
    engine: str,
    out: Path,
    console_factory: Callable[..., Console],
    command: str,
) -> list[Point]:
    """Evaluate 'base' and every run at every temperature on the same held-out prompts (one engine, weights
    swapped between models), then write the table, the JSON and the figure."""
    if build_task(cfg.task).verifier is not None:  # the evaluator's own rule for diversity and relevance metrics
        raise ConfigError(f"task.kind: pareto needs a task without a verifier ('creative'), got {cfg.task.kind!r}")
    if not temperatures or any(t <= 0 for t in temperatures):
        raise ConfigError(f"--temperatures: got {list(temperatures)} (positive numbers, e.g. 0.7,1.0,1.3)")
    models = [("base", None), *((r, resolve_weights(r)) for r in runs)]
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "pareto.log"
    results: dict[tuple[str, float], list[PromptResult]] = {}
    with third_party_output_to(log_path) as terminal:
        console = console_factory(file=terminal)
        with console.status(f"Starting the {engine} engine (its output goes to {log_path})..."):
            evaluator = Evaluator(cfg.to_worker_json(), str(resolve_model_dir(cfg.model)), engine)
        try:
            for label, weights in models:
                for t in temperatures:
                    start = time.perf_counter()
                    with console.status(f"{label} at temperature {t:g}: {num_prompts} prompts x {num_samples}..."):
                        rows = evaluator.evaluate(str(weights) if weights else None, num_prompts, num_samples, t)
                    results[(label, t)] = results_from_json(rows)
                    console.print(f"{label} at T={t:g}: {time.perf_counter() - start:.0f} s")
        finally:
            evaluator.close()
        points = [
            Point(
                label,
                t,
                summarize(results[(label, t)]),
                None
                if label == "base"
                else {m: paired_difference(results[("base", t)], results[(label, t)], m) for m in SHOWN},
            )
            for label, _ in models
            for t in temperatures
        ]
        for shown in tables(points):
            console.print(shown)
    write_outputs(points, out, command)
    return points


HEADERS = {"semantic_diversity": "sem. diversity", "distinct_2": "distinct-2", "relevance": "relevance",
           "response_tokens": "tokens"}  # fmt: skip


def tables(points: Sequence[Point]) -> list[Table]:
    """For the terminal: the metrics (mean ± 95% CI), then each trained point's paired change against the base."""
    values = Table(title="diversity vs quality (mean ± 95% CI over held-out prompts)")
    changes = Table(title="trained minus base at the same temperature, paired by prompt [95% CI]")
    for t in (values, changes):
        t.add_column("model", overflow="fold")
        t.add_column("T", justify="right")
        for name in SHOWN:
            t.add_column(HEADERS[name], justify="right")
    for p in points:
        label = p.model if p.model == "base" else Path(p.model).name
        values.add_row(label, f"{p.temperature:g}", *(str(p.metrics[n]) for n in SHOWN))
        if p.vs_base is not None:
            # One digit less on the bounds keeps the columns narrow; token counts need one digit in all.
            cells = (_change(p.vs_base[n], *((1, 1) if n == "response_tokens" else (3, 2))) for n in SHOWN)
            changes.add_row(label, f"{p.temperature:g}", *cells)
    return [values, changes] if changes.row_count else [values]


def _change(e: Estimate, digits: int = 3, bound_digits: int = 3) -> str:
    return f"{e.mean:+.{digits}f} [{e.low:+.{bound_digits}f}, {e.high:+.{bound_digits}f}]"


def _cell(p: Point, name: str) -> str:
    return str(p.metrics[name]) + (f" (Δ {_change(p.vs_base[name])})" if p.vs_base is not None else "")


def write_outputs(points: Sequence[Point], out: Path, command: str) -> None:
    payload = {"command": command, "points": [_point_json(p) for p in points]}
    (out / "pareto.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "# Diversity vs quality",
        "",
        f"`{command}`",
        "",
        "Mean ± 95% CI over held-out prompts; Δ is the paired change against the base model at the same temperature.",
        "",
        "| model | T | " + " | ".join(SHOWN) + " |",
        "|---|---:|" + "---:|" * len(SHOWN),
    ]
    lines += [f"| {p.model} | {p.temperature:g} | " + " | ".join(_cell(p, n) for n in SHOWN) + " |" for p in points]
    (out / "pareto.md").write_text("\n".join(lines) + "\n")
    plot(points, out / "pareto.png")


def _point_json(p: Point) -> dict[str, Any]:
    def est(e: Estimate) -> dict[str, float]:
        return {"mean": e.mean, "low": e.low, "high": e.high, "n": e.n}

    return {
        "model": p.model,
        "temperature": p.temperature,
        "metrics": {k: est(v) for k, v in p.metrics.items()},
        "vs_base": None if p.vs_base is None else {k: est(v) for k, v in p.vs_base.items()},
    }


def plot(points: Sequence[Point], path: Path) -> None:
    """One panel per diversity measure: quality (y) against diversity (x), one curve per model through its
    temperatures, 95% CIs as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DIVERSITY), figsize=(5.5 * len(DIVERSITY), 4.2))
    models = list(dict.fromkeys(p.model for p in points))
    for ax, diversity in zip(axes, DIVERSITY, strict=True):
        for i, model in enumerate(models):
            mine = sorted((p for p in points if p.model == model), key=lambda p: p.temperature)
            xs = [p.metrics[diversity] for p in mine]
            ys = [p.metrics[QUALITY] for p in mine]
            ax.errorbar(
                [x.mean for x in xs],
                [y.mean for y in ys],
                xerr=[[x.mean - x.low for x in xs], [x.high - x.mean for x in xs]],
                yerr=[[y.mean - y.low for y in ys], [y.high - y.mean for y in ys]],
                marker="o",
                capsize=3,
                color=f"C{i}",
                label=model if len(model) < 40 else "…" + model[-38:],
            )
            for p, x, y in zip(mine, xs, ys, strict=True):
                ax.annotate(f"T={p.temperature:g}", (x.mean, y.mean), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel(f"{diversity} (higher: more diverse)")
        ax.set_ylabel(f"{QUALITY} to the prompt (quality proxy)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("diversity vs quality: base model over temperatures against trained policies")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
