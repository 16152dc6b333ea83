"""`paceflow demo`: look at what the rollout side produces, without training.

It resolves the configured model (converting SmolLM2 from its GGUF on first use), loads the task, applies the
chat template, samples one rollout group per prompt with the Hugging Face engine, and scores every response
with the task's verifier: the data a rollout actor streams into the replay. `paceflow train` runs the whole loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from actors.engines.base import Sample
from actors.engines.hf_engine import HFEngine
from actors.tasks import Prompt, Task, build_task, encode_prompt
from cluster.models import resolve_model_dir
from configs.schema import RunConfig


@dataclass(frozen=True)
class DemoGroup:
    prompt: Prompt
    samples: list[Sample]
    rewards: list[float | None]
    parsed: list[str | None]


def run_demo(cfg: RunConfig, *, num_prompts: int, console: Console) -> list[DemoGroup]:
    with console.status("Preparing the model (the first SmolLM2 use converts its GGUF, ~20 s)..."):
        model_dir = resolve_model_dir(cfg.model)
    console.print(f"model     [bold]{cfg.model.kind}[/] at {model_dir}")
    task = build_task(cfg.task)
    _describe_task(task, console)

    with console.status("Loading the model into the Hugging Face engine..."):
        engine = HFEngine(model_dir, dtype=cfg.model.dtype, batch_size=_hf_batch_size(cfg))
    prompts = task.train[:num_prompts]
    token_prompts = [encode_prompt(engine.tokenizer, p.text, cfg.tokenizer) for p in prompts]
    s = cfg.rollout.sampling
    start = time.perf_counter()
    with console.status(f"Sampling {s.num_samples} responses for each of {len(prompts)} prompts..."):
        groups = engine.generate(token_prompts, s, seed=cfg.seed)
    elapsed = time.perf_counter() - start
    results = []
    for prompt, samples in zip(prompts, groups, strict=True):
        verdicts = [task.score(prompt, sample.text) for sample in samples]
        results.append(DemoGroup(prompt, samples, [v.reward for v in verdicts], [v.parsed for v in verdicts]))
    _report(results, elapsed, console)
    return results


def _hf_batch_size(cfg: RunConfig) -> int:
    engine = cfg.rollout.engine
    return engine.batch_size if engine.kind == "hf" else 16


def _describe_task(task: Task, console: Console) -> None:
    console.print(f"task      [bold]{task.name}[/]: {len(task.train)} training / {len(task.eval)} held-out prompts")
    for note in task.warnings:
        console.print(f"[yellow]warning[/] {note}")
    if task.skipped_rows:
        console.print(f"[yellow]skipped {task.skipped_rows} malformed rows[/], e.g. {task.skip_reasons[0]}")


def _report(results: list[DemoGroup], elapsed: float, console: Console) -> None:
    table = Table(title="One rollout group per prompt", show_lines=True)
    table.add_column("prompt", max_width=48)
    table.add_column("answer")
    table.add_column("parsed answers")
    table.add_column("rewards")
    table.add_column("accuracy", justify="right")
    for g in results:
        scored = [r for r in g.rewards if r is not None]
        acc = f"{sum(scored) / len(scored):.2f}" if scored else "-"
        table.add_row(
            g.prompt.text.splitlines()[0],
            g.prompt.answer or "-",
            ", ".join(str(p) for p in g.parsed),
            " ".join("-" if r is None else f"{r:g}" for r in g.rewards),
            acc,
        )
    console.print(table)
    tokens = sum(len(s.token_ids) for g in results for s in g.samples)
    truncated = sum(s.finish_reason == "length" for g in results for s in g.samples)
    total = sum(len(g.samples) for g in results)
    console.print(
        f"{total} responses, {tokens} tokens in {elapsed:.1f} s ({tokens / max(elapsed, 1e-9):.0f} tok/s, "
        f"HF engine); {truncated}/{total} hit max_new_tokens."
    )
    mixed = sum(len({r for r in g.rewards if r is not None}) > 1 for g in results)
    console.print(
        f"{mixed}/{len(results)} groups have mixed rewards (the groups that carry signal for TB and GRPO).\n"
        "[dim]This is the rollout half of the pipeline (model, task, chat template, sampling with behaviour "
        "log-probs, verification). Train end to end with `paceflow train <preset>`.[/]"
    )
