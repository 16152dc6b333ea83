"""Shared by the benchmark scripts: the machine description and the per-model loop that prints JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = REPO / ".cache" / "models"


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return f"{platform.machine()} {model}, {subprocess.getoutput('nproc')} cores, Python {platform.python_version()}"


# Shapes of real models, random-initialised from their config alone (no weights exist here): for throughput on
# an accelerator where the real checkpoint cannot be copied. Qwen2.5-1.5B's config.json values.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b-shape": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
    }
}


def shape_dir(name: str) -> Path:
    """A directory holding only config.json for one of SHAPES (load it with from_config: random weights)."""
    out = MODEL_CACHE / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(SHAPES[name], indent=1))
    return out


def run_per_model(models: list[str], bench_model: Callable[[str, Path], dict[str, Any]]) -> None:
    """Bench each of 'tiny' / 'smollm2-135m' / a SHAPES name; a row per model on stderr as it finishes, the whole
    JSON on stdout."""
    from cluster.models import resolve_model_dir
    from configs.schema import SmolLM2ModelConfig, TinyModelConfig

    def model_dir(name: str) -> Path:
        if name in SHAPES:
            return shape_dir(name)
        if name == "tiny":
            return resolve_model_dir(TinyModelConfig(cache_dir=MODEL_CACHE))
        return resolve_model_dir(SmolLM2ModelConfig(cache_dir=MODEL_CACHE))

    rows = []
    with stdout_to_stderr():
        for name in models:
            rows.append(bench_model(name, model_dir(name)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"machine": machine(), "results": rows}, indent=2))


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Libraries print to stdout (DeepSpeed's accelerator notice, build messages, C-level prints); while a
    benchmark runs, file descriptor 1 points at stderr, so stdout carries only the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
