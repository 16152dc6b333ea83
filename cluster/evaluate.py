"""Held-out evaluation: sample `eval.num_samples` responses for `eval.num_prompts` held-out prompts with a given
set of weights and score them with the task's verifier (avg@k accuracy). Runs the HF engine in the calling
process, so it never competes with the rollout actors' engines for their weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from actors.engines.hf_engine import HFEngine
from actors.tasks import build_task, encode_prompt
from cluster.models import resolve_model_dir
from configs.schema import RunConfig, SamplingConfig


def evaluate(cfg: RunConfig, weights_dir: Path) -> dict[str, Any]:
    task = build_task(cfg.task)
    prompts = task.eval[: cfg.eval.num_prompts]
    if not prompts:
        return {"accuracy": None, "prompts": 0}
    model_dir = resolve_model_dir(cfg.model)
    engine = HFEngine(model_dir, dtype="float32")
    if weights_dir != model_dir:
        engine.load_weights(weights_dir, version=1)
    ids = [encode_prompt(engine.tokenizer, p.text, cfg.tokenizer) for p in prompts]
    sampling = SamplingConfig(
        num_samples=cfg.eval.num_samples,
        temperature=cfg.eval.temperature,
        max_new_tokens=cfg.rollout.sampling.max_new_tokens,
        stop=cfg.rollout.sampling.stop,
    )
    groups = engine.generate(ids, sampling, seed=cfg.seed)
    rewards = [task.score(p, s.text).reward for p, g in zip(prompts, groups, strict=True) for s in g]
    valid = [r for r in rewards if r is not None and not math.isnan(r)]
    return {
        "accuracy": sum(valid) / len(valid) if valid else None,
        "prompts": len(prompts),
        "samples": len(rewards),
        "invalid": len(rewards) - len(valid),
    }
