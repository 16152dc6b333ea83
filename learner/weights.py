"""Publishing policy weights to the rollout actors: a Hugging Face safetensors directory per version, plus a
`WeightVersion` announcement carrying a teacher-forced probe so every actor can verify its update took effect.

Directories are written to a temporary name and renamed, so an actor never reads a half-written version; old
versions beyond `keep` are deleted. The log Z heads are separate modules and are never written here.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from learner.logprobs import response_logprobs
from replay.records import WeightVersion

# Mean absolute log-prob difference allowed between the learner's float32 probe and an engine holding the same
# weights. In float32 they agree to ~1e-6. In bfloat16 (SmolLM2-135M, vLLM-CPU vs transformers fp32) identical
# weights differ by 0.02-0.05 on likely responses and 0.13 on a sampled chain_sum response with unlikely tokens,
# so half a nat only flags gross failures (wrong or missing weights), not a skipped small update.
PROBE_TOLERANCE = {"float32": 2e-3, "bfloat16": 0.5, "float16": 0.25}


def publish_weights(
    model: Any,
    state_dict: dict[str, Tensor],
    root: Path,
    *,
    version: int,
    step: int,
    probe: tuple[list[int], list[int]],
    engine_dtype: str,
    keep: int = 2,
) -> WeightVersion:
    """Write `state_dict` (the full policy) as version `version` under `root` and return its announcement."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"v{version}"
    tmp = root / f".v{version}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in root.glob("v*"):  # actors may still be loading the last few versions: keep those
        if old.name[1:].isdigit() and int(old.name[1:]) <= version - keep:
            shutil.rmtree(old, ignore_errors=True)
    return announcement(model, str(final), version=version, step=step, probe=probe, engine_dtype=engine_dtype)


def announcement(
    model: Any, path: str, *, version: int, step: int, probe: tuple[list[int], list[int]], engine_dtype: str
) -> WeightVersion:
    """The record actors load a version by: where it is, and the probe that proves an engine holds it."""
    prompt, response = probe
    return WeightVersion(
        version=version,
        path=path,
        step=step,
        created_at=time.time(),
        probe_prompt=prompt,
        probe_response=response,
        probe_logprobs=response_logprobs(model, prompt, response),
        probe_tolerance=PROBE_TOLERANCE[engine_dtype],
    )
