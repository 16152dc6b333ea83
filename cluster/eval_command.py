"""`paceflow eval`: one model (and optionally a second, paired prompt by prompt) on a config's held-out prompts,
as a table with 95% confidence intervals and as JSON. The engine's own output goes to a log file."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cluster.console import third_party_output_to
from cluster.evaluate import (
    Estimate,
    Evaluator,
    PromptResult,
    estimates_to_json,
    paired_difference,
    pick_engine,
    results_from_json,
    results_to_json,
    summarize,
)
from cluster.models import resolve_model_dir
from configs.schema import RunConfig


def resolve_weights(spec: str) -> Path | None:
    """'base' -> None (the config's own model); a run directory -> its final policy; else a weights directory."""
    if spec == "base":
        return None
    path = Path(spec).expanduser()
    if (path / "final").is_dir():
        return path / "final"
    if path.is_dir() and any(path.glob("*.safetensors")):
        return path
    raise FileNotFoundError(
        f"MODEL_OR_RUN: {spec!r} is not 'base', a run directory with final/, or a directory of *.safetensors"
    )


def run_eval(
    cfg: RunConfig,
    *,
    model: str,
    against: str | None,
    num_prompts: int,
    num_samples: int,
    temperature: float,
    pass_ks: Sequence[int],
    engine: str,
    json_path: Path | None,
    log_path: Path,
    console_factory: Callable[..., Console],
) -> int:
    weights = resolve_weights(model)
    other = resolve_weights(against) if against is not None else None
    kind = pick_engine(engine)
    with third_party_output_to(log_path) as terminal:
        console = console_factory(file=terminal)
        with console.status(f"Starting the {kind} engine (its output goes to {log_path})..."):
            evaluator = Evaluator(cfg.to_worker_json(), str(resolve_model_dir(cfg.model)), kind)
        runs: dict[str, list[PromptResult]] = {}
        try:
            for label, path in [(model, weights), *([(against, other)] if against is not None else [])]:
                start = time.perf_counter()
                with console.status(f"Evaluating {label}: {num_prompts} prompts x {num_samples} samples..."):
                    rows = evaluator.evaluate(str(path) if path else None, num_prompts, num_samples, temperature)
                runs[label] = results_from_json(rows)
                elapsed = time.perf_counter() - start
                console.print(f"{_label(label)}: {len(rows)} prompts x {num_samples} samples in {elapsed:.0f} s")
        finally:
            evaluator.close()
        results = runs[model]
        summary = summarize(results, pass_ks)
        baseline = summarize(runs[against], pass_ks) if against is not None else None
        diffs = (
            {name: paired_difference(runs[against], results, name, pass_ks) for name in summary}
            if against is not None
            else None
        )
        console.print(_table(cfg, model, summary, against, baseline, diffs, temperature))
    if json_path is not None:
        payload: dict[str, Any] = {
            "model": model,
            "config": cfg.name,
            "task": cfg.task.kind,
            "prompts": len(results),
            "samples": num_samples,
            "temperature": temperature,
            "engine": kind,
            "metrics": estimates_to_json(summary),
            "per_prompt": results_to_json(results),
        }
        if against is not None and baseline is not None and diffs is not None:
            payload["against"] = {"model": against, "metrics": estimates_to_json(baseline)}
            payload["difference"] = estimates_to_json(diffs)
            payload["against"]["per_prompt"] = results_to_json(runs[against])
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=1))
    return 0


def _label(spec: str) -> str:
    """A short column title: 'base', or the last folder names of a path."""
    return spec if spec == "base" else "/".join(Path(spec).expanduser().parts[-2:])


def _table(
    cfg: RunConfig,
    model: str,
    summary: dict[str, Estimate],
    against: str | None,
    baseline: dict[str, Estimate] | None,
    diffs: dict[str, Estimate] | None,
    temperature: float,
) -> Table:
    n = next(iter(summary.values())).n if summary else 0
    table = Table(
        title=f"{cfg.name}: {n} held-out prompts, temperature {temperature:g}",
        caption="mean ± 95% CI over prompts",
    )
    table.add_column("metric")
    table.add_column(_label(model), justify="right")
    if against is not None:
        table.add_column(_label(against), justify="right")
        table.add_column("paired diff", justify="right")
    for name, estimate in summary.items():
        row = [name, str(estimate)]
        if baseline is not None and diffs is not None:
            d = diffs[name]
            shown = "-" if math.isnan(d.mean) else f"{d.mean:+.3f} ± {d.half_width:.3f}"
            row += [str(baseline.get(name, "-")), shown]
        table.add_row(*row)
    return table
