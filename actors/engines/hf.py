"""Hugging Face transformers `generate` as a rollout engine: the portable fallback and the reference.

It samples G responses per prompt and returns, for each, the token ids (EOS included when it was produced),
the log-prob of every sampled token under the distribution it was actually drawn from (after temperature
and top-p, i.e. the behaviour policy that off-policy objectives need), the decoded text and why it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.models import torch_dtype


@dataclass(frozen=True)
class Sample:
    """One sampled response."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "length"]


class HFEngine:
    def __init__(self, model_dir: Path, *, dtype: str = "float32", batch_size: int = 16) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge of every row
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        *,
        num_samples: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int = 0,
    ) -> list[list[Sample]]:
        """G = num_samples responses for each prompt string; temperature 0 means greedy."""
        if not prompts:
            return []
        if num_samples < 1 or max_new_tokens < 1:
            raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples}, {max_new_tokens}")
        torch.manual_seed(seed)
        rows = [p for p in prompts for _ in range(num_samples)]
        samples: list[Sample] = []
        for start in range(0, len(rows), self.batch_size):
            samples.extend(
                self._generate_batch(rows[start : start + self.batch_size], max_new_tokens, temperature, top_p, stop)
            )
        return [samples[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]

    def _generate_batch(
        self, rows: list[str], max_new_tokens: int, temperature: float, top_p: float, stop: list[str] | None
    ) -> list[Sample]:
        enc = self.tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        out = self.model.generate(
            **enc,
            **(sampling if temperature > 0 else {"do_sample": False}),
            max_new_tokens=max_new_tokens,
            stop_strings=stop or None,
            tokenizer=self.tokenizer if stop else None,
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_scores=True,
        )
        new_tokens = out.sequences[:, enc["input_ids"].shape[1] :]
        # `scores` are the processed logits the tokens were drawn from; their log-softmax is the behaviour policy.
        logp = torch.stack(out.scores, dim=1).float().log_softmax(-1)
        token_logp = logp.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        result = []
        for ids, lps in zip(new_tokens.tolist(), token_logp.tolist(), strict=True):
            if eos in ids:
                end, reason = ids.index(eos) + 1, "stop"
            elif stop and pad in ids:  # a stop string ended this row; generate padded the rest
                end, reason = ids.index(pad), "stop"
            else:
                end, reason = len(ids), "length"
            text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
            result.append(Sample(ids[:end], lps[:end], text, reason))
        return result
