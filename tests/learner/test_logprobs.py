"""token_logprobs computes logits only from the earliest response position on; the values must be exactly those
of a full forward pass, for right-padded rows whose prompts and responses differ in length."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from learner.logprobs import _takes_logits_to_keep, token_logprobs


class _FullLogits:
    """The same model behind a call signature without `logits_to_keep`: the reference, full-logits path."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, input_ids: Any, attention_mask: Any, output_hidden_states: bool = False) -> SimpleNamespace:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
        return SimpleNamespace(logits=out.logits, hidden_states=out.hidden_states)


def test_logits_for_response_positions_only_match_a_full_forward(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert _takes_logits_to_keep(type(model)) and not _takes_logits_to_keep(_FullLogits)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    rows = [(7, 5), (4, 9), (10, 0), (6, 3)]  # (prompt, response) lengths; one empty response
    width = max(p + r for p, r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention, response = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, r) in enumerate(rows):
        ids[i, : p + r] = torch.randint(3, 60, (p + r,), generator=gen)
        attention[i, : p + r] = 1
        response[i, p : p + r] = 1
    with torch.no_grad():
        fast, hidden = token_logprobs(model, ids, attention, response, return_hidden=True)
        full, _ = token_logprobs(_FullLogits(model), ids, attention, response)
    assert torch.allclose(fast, full, atol=1e-5)
    assert (fast[response == 0] == 0).all() and (fast[response == 1] < 0).all()
    assert hidden is not None and hidden.shape[:2] == ids.shape  # hidden states still cover the prompt
