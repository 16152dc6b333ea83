"""Per-token log-probs of response tokens under a causal LM: the one function every objective and scorer uses.

A batch is right-padded rows of `prompt + response`; `response_mask_BT` marks the response tokens (EOS
included). `token_logprobs` returns logp_BT[b, t] = log p(input_ids[b, t] | input_ids[b, :t]) at response
positions and exactly 0 elsewhere, always in float32 even when the model runs in bf16, so sums over long
responses do not lose precision. It can also return the last hidden states, which the log Z head pools over
the prompt tokens.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logprobs(
    model: Any,
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor,
    response_mask_BT: Tensor,
    *,
    return_hidden: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(logp_BT, last_hidden_BTH or None). `model` is any callable with the transformers causal-LM signature."""
    if input_ids_BT.shape != response_mask_BT.shape or input_ids_BT.shape != attention_mask_BT.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids_BT.shape)}, attention_mask {tuple(attention_mask_BT.shape)} and "
            f"response_mask {tuple(response_mask_BT.shape)} must have the same shape"
        )
    if bool(response_mask_BT[:, 0].any()):
        raise ValueError("response_mask marks position 0, which has no preceding token to predict it from")
    # Logits only where a response token is predicted: from the earliest response start on. The prompt positions
    # before it need no vocabulary projection, which on a 49k vocabulary is a quarter of a SmolLM2 step.
    T = input_ids_BT.shape[1]
    starts = response_mask_BT.bool().float().argmax(-1)[response_mask_BT.bool().any(-1)]
    first = int(starts.min()) if len(starts) else T - 1
    keep = T - first + 1  # positions first-1 .. T-1
    if _takes_logits_to_keep(type(model)):  # type: ignore[arg-type]  # classes are hashable
        out = model(
            input_ids=input_ids_BT,
            attention_mask=attention_mask_BT,
            output_hidden_states=return_hidden,
            logits_to_keep=keep,
        )
        logits = out.logits
    else:
        out = model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, output_hidden_states=return_hidden)
        logits = out.logits[:, T - keep :]
    logits_BKV = at_least_f32(logits[:, :-1])  # predicts the tokens at positions first .. T-1
    mask_BK = response_mask_BT[:, first:].bool()
    targets_BK = input_ids_BT[:, first:].masked_fill(~mask_BK, -100)
    # The fused cross-entropy kernel (log-softmax + gather in one pass, forward and backward): measured faster than
    # gather - logsumexp on a 49k vocabulary. Positions outside the response are ignored and come out as 0.
    nll_BK = F.cross_entropy(
        logits_BKV.reshape(-1, logits_BKV.shape[-1]), targets_BK.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets_BK.shape)
    logp_BT = torch.zeros(input_ids_BT.shape, dtype=nll_BK.dtype, device=nll_BK.device)
    logp_BT[:, first:] = -nll_BK
    hidden = out.hidden_states[-1] if return_hidden else None
    return logp_BT, hidden


@functools.cache
def _takes_logits_to_keep(model_type: type) -> bool:
    """Whether the model's forward can skip the vocabulary projection for leading positions (transformers
    causal LMs can); other callables get full logits, sliced here."""
    forward = getattr(model_type, "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


@torch.no_grad()
def response_logprobs(model: Any, prompt: list[int], response: list[int]) -> list[float]:
    """Teacher-forced log-probs of one response after one prompt (eval mode, no grad): the weight-sync probe."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + response], device=device)
    mask = torch.tensor([[0] * len(prompt) + [1] * len(response)], device=device)
    was_training = model.training
    model.eval()
    try:
        logp, _ = token_logprobs(model, ids, torch.ones_like(ids), mask)
    finally:
        model.train(was_training)
    return logp[0, len(prompt) :].tolist()


def at_least_f32(x: Tensor) -> Tensor:
    """bf16/fp16 -> float32 for sums and exps; float64 stays float64 (finite-difference tests use it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_mean(values_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Row means over masked positions; 0 (not NaN) for a row with no positions."""
    mask = mask_BT.to(values_BT.dtype)
    return (values_BT * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
