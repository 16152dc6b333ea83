"""Hugging Face transformers `generate` as a rollout engine: the portable fallback and the reference.

It samples G responses per tokenised prompt and returns, for each, the token ids (EOS included when it was
generated), the log-prob of every sampled token under the distribution it was actually drawn from (after
temperature and top-p: the behaviour policy that off-policy objectives need), the text and why it stopped.
New weights are loaded in place from a safetensors directory or received over a weight channel
(replay/weight_broadcast.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engines.base import FinishReason, Sample, check_sampling
from configs.dtypes import torch_dtype
from configs.schema import SamplingConfig
from learner.logprobs import response_logprobs
from replay.weight_broadcast import WeightReceiver


class HFEngine:
    def __init__(self, model_dir: Path, *, dtype: str = "float32", batch_size: int = 16) -> None:
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).eval()
        self.batch_size = batch_size
        self.weight_version = 0
        self._receiver: WeightReceiver | None = None

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, *, seed: int = 0) -> list[list[Sample]]:
        """sampling.num_samples responses per prompt; temperature 0 means greedy."""
        check_sampling(prompts, sampling)
        if not prompts:
            return []
        torch.manual_seed(seed)
        g = sampling.num_samples
        rows = [p for p in prompts for _ in range(g)]
        samples: list[Sample] = []
        for start in range(0, len(rows), self.batch_size):
            samples.extend(self._generate_batch(rows[start : start + self.batch_size], sampling))
        return [samples[i * g : (i + 1) * g] for i in range(len(prompts))]

    def _generate_batch(self, rows: list[list[int]], sampling: SamplingConfig) -> list[Sample]:
        pad = self.tokenizer.pad_token_id
        width = max(len(r) for r in rows)
        # Left padding: generation continues from the right edge of every row.
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        greedy = sampling.temperature == 0
        options = (
            {"do_sample": False}
            if greedy
            else {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            **options,
            max_new_tokens=sampling.max_new_tokens,
            stop_strings=sampling.stop or None,
            tokenizer=self.tokenizer if sampling.stop else None,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_scores=True,
        )
        new_tokens = out.sequences[:, width:]
        # `scores` are the processed logits the tokens were drawn from; their log-softmax is the behaviour policy.
        logp = torch.stack(out.scores, dim=1).float().log_softmax(-1)
        token_logp = logp.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        eos = self.tokenizer.eos_token_id
        result = []
        for ids, lps in zip(new_tokens.tolist(), token_logp.tolist(), strict=True):
            reason: FinishReason
            if eos in ids:
                end, reason = ids.index(eos) + 1, "stop"
            elif sampling.stop and pad in ids:  # a stop string ended this row; generate padded the rest
                end, reason = ids.index(pad), "stop"
            else:
                end, reason = len(ids), "length"
            text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
            for stop in sampling.stop:  # like vLLM and the OpenAI API: the text ends before the stop string
                if stop in text:
                    text, reason = text[: text.index(stop)], "stop"
            result.append(Sample(ids[:end], lps[:end], text, reason))
        return result

    def load_weights(self, weights_dir: Path, version: int) -> None:
        state: dict[str, torch.Tensor] = {}
        for path in sorted(Path(weights_dir).glob("*.safetensors")):
            state.update(load_file(path))
        if not state:
            raise FileNotFoundError(f"no *.safetensors in {weights_dir}")
        self._load_state(state, str(weights_dir))
        self.weight_version = version

    weight_receivers = 1
    """Processes that receive broadcast weights: this one."""

    def join_weight_channel(self, info_json: str, own_host: str) -> None:
        self._receiver = WeightReceiver(info_json, 1, own_host=own_host, device=self.model.device)

    def receive_weights(self) -> int:
        if self._receiver is None:
            raise RuntimeError("no weight channel joined")
        version, tensors = self._receiver.receive()
        self._load_state(dict(tensors), "the weight channel")
        self.weight_version = version
        return version

    def _load_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # A tied output layer is saved once, as the embedding; loading that updates both.
        may_miss = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - may_miss:
            raise ValueError(f"weights from {source} do not fit the model: missing {missing}, unexpected {unexpected}")

    def logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        return response_logprobs(self.model, prompt, response)

    def close(self) -> None:
        pass
