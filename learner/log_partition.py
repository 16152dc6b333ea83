"""log Z(x), the learned log-partition function of trajectory balance, in its three forms.

- `LogZHead`: an MLP on the policy's own mean-pooled prompt hidden states (FlowRL / PowerFlow). Gradients flow
  into the policy, as in those papers. PowerFlow shifts its output by -offset * (alpha - 1) so the first
  residuals are near zero.
- `ZPhi`: PACED-RL's 3-layer MLP on *frozen reference-model* prompt embeddings, so any candidate prompt can be
  scored without a rollout or a policy forward pass; beta * log Z_phi(x) estimates the accuracy on x. The MLP
  works in accuracy units (log Z_phi = output / beta) on standardised embeddings: see `ZPhi`.
- `vargrad_log_z`: no parameters, the detached per-group mean of log R - log pi (needs >= 2 samples per prompt).

Heads are separate modules from the policy: they get their own optimizer parameter group, are saved with the
learner checkpoint, and are never part of the weights published to rollout engines.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from learner.logprobs import at_least_f32


class LogZHead(nn.Module):
    """[Linear -> GELU -> LayerNorm] x 2 -> Linear on the mean of the prompt tokens' last hidden states."""

    def __init__(self, hidden_size: int, *, offset: float = 0.0, clamp: float = 20.0) -> None:
        super().__init__()
        last = nn.Linear(hidden_size, 1)
        nn.init.zeros_(last.weight)  # start at log Z = -offset for every prompt
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.LayerNorm(hidden_size),
            last,
        )
        self.offset: Tensor
        self.register_buffer("offset", torch.tensor(float(offset)))  # saved with the head: a measured offset survives
        self.clamp = clamp

    def forward(self, hidden_BTH: Tensor, prompt_mask_BT: Tensor) -> Tensor:
        mask = prompt_mask_BT.to(hidden_BTH.dtype).unsqueeze(-1)
        pooled_BH = (hidden_BTH * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return clamp_straight_through(self.mlp(pooled_BH).squeeze(-1) - self.offset, self.clamp)


def measured_offset(base_logp_BT: Tensor, response_mask_BT: Tensor, alpha: float) -> float:
    """PowerFlow's LogZHead offset for `log_z_offset_per_token: auto`: (alpha - 1) x the base model's mean NLL per
    token over the batch's responses (each response weighs the same, as in the length-normalised residual).
    At the start pi_theta = p_base, so the residual is log Z' + (1 - alpha) * mean log p_base; this offset makes
    its batch mean zero."""
    mask = response_mask_BT.to(base_logp_BT.dtype)
    lengths = mask.sum(-1)
    rows = lengths > 0
    if not bool(rows.any()):
        raise ValueError("no response tokens in the batch to measure the base model's NLL on")
    per_token = (base_logp_BT * mask).sum(-1)[rows] / lengths[rows]
    return power_offset(float(-per_token.mean()), alpha)


def power_offset(nll_per_token: float, alpha: float) -> float:
    """The LogZHead offset that centres PowerFlow's first residuals, given the base model's NLL per token."""
    return nll_per_token * (alpha - 1.0)


class ZPhi(nn.Module):
    """PACED-RL's Z_phi: a 3-layer MLP from a frozen prompt embedding to log Z.

    Two choices the paper leaves open, both about how fast Z_phi can follow the accuracy it estimates:
    - The MLP predicts in accuracy units and log Z_phi = output / beta. Adam moves every parameter by about the
      learning rate per step whatever the gradient's scale, so an MLP asked for log Z itself (0 to 1/beta = 20)
      needs ~1/beta times more steps to cross the same range of accuracies: a real run's estimate climbed
      linearly for 23 steps before this scaling.
    - Embeddings are standardised with the mean and spread of the training prompts' embeddings
      (`set_normalisation`): mean-pooled prompt states share a large common component (chat template, system
      prompt), and only the differences tell prompts apart.
    - The common level is data, the differences are learned: log Z_phi(x) = (offset + MLP(x)) / beta, where the
      learner sets `offset` to the recent mean accuracy of fresh groups (`set_offset`), so the MLP learns how
      each prompt differs from the policy's current accuracy. The level then follows a policy that improves
      every step at once, while the per-prompt part, fitted on a few noisy groups per prompt, moves slowly; with
      the MLP at zero the estimate is exactly the recent mean, the constant it has to beat.
    The last layer starts at zero: a(x) = offset (0 before the first step) for every prompt.
    """

    mean: Tensor
    scale: Tensor
    offset: Tensor

    def __init__(self, embed_dim: int, hidden: int = 256, *, beta: float = 0.05, clamp: float = 20.0) -> None:
        super().__init__()
        last = nn.Linear(hidden, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), last)
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("scale", torch.ones(embed_dim))
        self.register_buffer("offset", torch.zeros(()))
        self.beta = beta
        self.clamp = clamp

    @torch.no_grad()
    def set_normalisation(self, embeddings_NE: Tensor) -> None:
        """Standardise inputs with the statistics of these embeddings (the training prompts')."""
        self.mean.copy_(embeddings_NE.mean(0))
        if len(embeddings_NE) > 1:
            self.scale.copy_(embeddings_NE.std(0).clamp_min(1e-6))

    @torch.no_grad()
    def set_offset(self, accuracy: float) -> None:
        """The common level of a(x): the policy's recent mean accuracy."""
        self.offset.fill_(accuracy)

    def forward(self, embedding_BE: Tensor) -> Tensor:
        accuracy_B = self.offset + self.mlp((embedding_BE - self.mean) / self.scale).squeeze(-1)
        return clamp_straight_through(accuracy_B / self.beta, self.clamp)


def clamp_straight_through(x: Tensor, bound: float) -> Tensor:
    """Clamp the value to [-bound, bound] but keep the identity gradient.

    A plain clamp has zero gradient outside the bounds, so a head that overshoots (log Z_phi = E[r]/beta is
    17.4 for an 87%-accurate prompt at beta = 0.05, close to the bound 20) would stay stuck there for good.
    """
    return x + (x.clamp(-bound, bound) - x).detach()


def vargrad_log_z(log_reward_B: Tensor, logp_sum_B: Tensor, group_B: Tensor) -> Tensor:
    """Detached per-group mean of (log R - log pi), broadcast back to every sample of the group."""
    residual_B = at_least_f32((log_reward_B - logp_sum_B).detach())
    num_groups = int(group_B.max()) + 1 if group_B.numel() else 0
    sums = torch.zeros(num_groups, dtype=residual_B.dtype, device=residual_B.device).index_add_(0, group_B, residual_B)
    counts = torch.zeros_like(sums).index_add_(0, group_B, torch.ones_like(residual_B))
    return (sums / counts.clamp_min(1.0))[group_B]


def accuracy_estimate(log_z_B: Tensor, beta: float) -> Tensor:
    """PACED-RL's a(x) = clip(beta * log Z_phi(x), 0, 1): the squared-TB optimum of log Z is E[r]/beta."""
    return (beta * at_least_f32(log_z_B.detach())).clamp(0.0, 1.0)
