"""Session fixtures shared by the whole suite: real models on disk, built once per session.

Models are cached under the repository's .cache/ (git-ignored), so a second run of the suite reuses them;
`make clean` removes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actors.tasks import default_gsm8k_dir
from cluster.models import resolve_model_dir
from configs.schema import SmolLM2ModelConfig, TinyModelConfig

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = REPO / ".cache" / "models"


def save_perturbed(model_dir: Path, out: Path, *, seed: int, scale: float) -> Any:
    """The float32 model in `model_dir` with each parameter moved by `scale` x its std of seeded noise, saved to
    `out` (a new weight version whose log-probs differ measurably); returns the model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen) * p.std().clamp_min(1e-3))
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return resolve_model_dir(TinyModelConfig(cache_dir=MODEL_CACHE))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return resolve_model_dir(SmolLM2ModelConfig(cache_dir=MODEL_CACHE))


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The GSM8K copy shipped with paceflow (actors/data/gsm8k), what `task.data_dir` unset resolves to."""
    path = default_gsm8k_dir()
    assert (path / "train.jsonl").is_file(), f"GSM8K ships with paceflow in {path}, but train.jsonl is missing"
    return path


@pytest.fixture(scope="session")
def redis_server():  # -> cluster.services.Service
    """One real redis-server for the session, on a free localhost port, stopped by PID at the end."""
    from cluster.services import start_redis

    with start_redis() as server:
        yield server


@pytest.fixture(scope="session")
def ray_local():  # -> the ray module, initialised once for the session
    """A real local Ray (2 CPUs, no dashboard), shared by every test that needs it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
