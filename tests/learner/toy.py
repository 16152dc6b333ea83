"""An enumerable toy world for proving the objectives exact.

Responses are strings over A = 3 actions followed by EOS, at most L = 4 tokens in all (EOS included), so there
are 1 + 3 + 9 + 27 = 40 responses per prompt and every distribution over them can be written down. The policy
is a *tabular* causal LM with the transformers call signature (`model(input_ids=..., attention_mask=...,
output_hidden_states=...)` -> `.logits`, `.hidden_states`), so the objectives are trained through exactly the
same `learner.logprobs.token_logprobs` as a real model.

Token ids: 0 = PAD, 1 = EOS, 2..4 = actions, 5.. = one token per prompt. A row is [prompt, y_1, ..., EOS, PAD...].
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from learner.logprobs import token_logprobs

PAD, EOS, FIRST_ACTION = 0, 1, 2
NUM_ACTIONS = 3
MAX_LEN = 4  # response tokens including EOS
NUM_PREFIXES = sum(NUM_ACTIONS**t for t in range(MAX_LEN))  # response prefixes that still need a token: 40


class ToyPolicy(nn.Module):
    """logits(prompt, prefix) is a free parameter for each of the P x 40 states: any policy is representable."""

    def __init__(
        self,
        num_prompts: int,
        *,
        hidden: int = 8,
        init_scale: float = 0.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.num_prompts = num_prompts
        self.vocab = FIRST_ACTION + NUM_ACTIONS + num_prompts
        self.table = nn.Parameter(
            init_scale * torch.randn(num_prompts, NUM_PREFIXES, 1 + NUM_ACTIONS, generator=gen, dtype=dtype)
        )
        self.embed = nn.Parameter(torch.randn(self.vocab, hidden, generator=gen, dtype=dtype))

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False
    ) -> SimpleNamespace:
        B, T = input_ids.shape
        prompt_B = input_ids[:, 0] - (FIRST_ACTION + NUM_ACTIONS)
        logits = torch.full((B, T, self.vocab), float("-inf"), dtype=self.table.dtype)
        code_B = torch.zeros(B, dtype=torch.long)
        for t in range(T):
            depth = t  # response tokens before position t+1
            if depth >= MAX_LEN:
                break
            step = self.table[prompt_B, code_B.clamp(max=NUM_PREFIXES - 1)]  # (B, 1 + A): EOS, actions
            if depth == MAX_LEN - 1:  # the last slot can only end the response
                step = torch.cat([step[:, :1], torch.full_like(step[:, 1:], float("-inf"))], dim=1)
            logits[:, t, EOS] = step[:, 0]
            logits[:, t, FIRST_ACTION : FIRST_ACTION + NUM_ACTIONS] = step[:, 1:]
            if t + 1 < T:
                action = (input_ids[:, t + 1] - FIRST_ACTION).clamp(0, NUM_ACTIONS - 1)
                offset = sum(NUM_ACTIONS**d for d in range(depth + 1))
                within = code_B - sum(NUM_ACTIONS**d for d in range(depth))
                code_B = offset + within * NUM_ACTIONS + action
        hidden = (self.embed[input_ids],) if output_hidden_states else None
        return SimpleNamespace(logits=logits, hidden_states=hidden)


def all_responses() -> list[list[int]]:
    """Every response: k actions (k = 0..MAX_LEN-1) then EOS."""
    out = []
    for k in range(MAX_LEN):
        for actions in itertools.product(range(NUM_ACTIONS), repeat=k):
            out.append([FIRST_ACTION + a for a in actions] + [EOS])
    return out


RESPONSES = all_responses()
LENGTHS = torch.tensor([len(r) for r in RESPONSES], dtype=torch.float64)


@dataclass
class Batch:
    input_ids_BT: Tensor
    attention_mask_BT: Tensor
    response_mask_BT: Tensor
    prompt_mask_BT: Tensor
    prompt_B: Tensor
    response_index_B: Tensor  # index into RESPONSES


def make_batch(prompt_B: Tensor, response_index_B: Tensor, num_prompts: int) -> Batch:
    T = 1 + MAX_LEN
    B = prompt_B.numel()
    ids = torch.full((B, T), PAD, dtype=torch.long)
    ids[:, 0] = FIRST_ACTION + NUM_ACTIONS + prompt_B
    response_mask = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(response_index_B.tolist()):
        tokens = RESPONSES[r]
        ids[b, 1 : 1 + len(tokens)] = torch.tensor(tokens)
        response_mask[b, 1 : 1 + len(tokens)] = 1
    prompt_mask = torch.zeros(B, T, dtype=torch.long)
    prompt_mask[:, 0] = 1
    return Batch(ids, (ids != PAD).long(), response_mask, prompt_mask, prompt_B, response_index_B)


@torch.no_grad()
def exact_log_probs(model: ToyPolicy) -> Tensor:
    """log pi(y | x) for every prompt and every response: (P, 40), float64."""
    P = model.num_prompts
    prompts = torch.arange(P).repeat_interleave(len(RESPONSES))
    responses = torch.arange(len(RESPONSES)).repeat(P)
    batch = make_batch(prompts, responses, P)
    logp_BT, _ = token_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
    return logp_BT.sum(-1).double().view(P, len(RESPONSES))


def sample(model: ToyPolicy, prompt_B: Tensor, gen: torch.Generator) -> Batch:
    """Draw one response per row from the policy's exact sequence distribution."""
    probs = exact_log_probs(model).exp()[prompt_B]
    return make_batch(prompt_B, torch.multinomial(probs.float(), 1, generator=gen).squeeze(-1), model.num_prompts)


def total_variation(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """Per-prompt TV distance between two (P, 40) log-distributions."""
    return 0.5 * (logp_a.exp() - logp_b.exp()).abs().sum(-1)


def length_tilted_target(log_base: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """The LA-TB fixed point: p_base^alpha * exp(-lambda |y|), lambda solving sum = 1 (bisection), per prompt."""
    targets, lambdas = [], []
    for row in log_base:
        lo, hi = -50.0, 50.0
        for _ in range(200):
            lam = (lo + hi) / 2
            total = torch.logsumexp(alpha * row - lam * LENGTHS, 0)
            lo, hi = (lam, hi) if total > 0 else (lo, lam)
        lam = (lo + hi) / 2
        targets.append(alpha * row - lam * LENGTHS)
        lambdas.append(lam)
    return torch.stack(targets), torch.tensor(lambdas, dtype=torch.float64)
