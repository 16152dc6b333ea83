"""`paceflow demo`: the real slice (model -> task -> chat template -> sampling -> verifier) runs end to end."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cluster.demo import run_demo
from configs.load import load_config
from tests.conftest import MODEL_CACHE


def test_demo_on_the_tiny_model_scores_every_response() -> None:
    cfg = load_config(
        "tiny_cpu",
        [f"model.cache_dir={MODEL_CACHE}", "rollout.sampling.num_samples=3", "learner.micro_batch_size=4"],
    )
    out = io.StringIO()
    groups = run_demo(cfg, num_prompts=2, console=Console(file=out, width=120))
    assert len(groups) == 2
    for g in groups:
        assert len(g.samples) == 3
        assert all(r in (0.0, 1.0) for r in g.rewards)  # chain_sum has a verifier: no missing rewards
        assert all(len(s.logprobs) == len(s.token_ids) > 0 for s in g.samples)
    text = out.getvalue()
    assert "6 responses" in text and "tok/s" in text and "paceflow train" in text


@pytest.mark.slow
def test_make_demo_command_runs_on_smollm2(smollm2_dir: Path) -> None:
    """What `make demo` runs (with the test model cache): exit 0 and a table of scored groups."""
    cache = smollm2_dir.parent
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "demo",
            "smollm2_cpu",
            "--prompts",
            "2",
            f"model.cache_dir={cache}",
            "rollout.sampling.max_new_tokens=24",
            "rollout.sampling.num_samples=4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "One rollout group per prompt" in proc.stdout
    assert "8 responses" in proc.stdout
