"""The losses: trajectory balance, PACED-RL, PowerFlow (length-aware TB) and the GRPO baseline.

Each is one short function `loss(inputs, cfg) -> ObjectiveOutput`; `OBJECTIVES[cfg.kind]` picks it. The inputs
are per-token tensors that the learner recomputes under the current weights (`learner.logprobs`), plus the
per-sample quantities stored with each rollout. All arithmetic is float32. A non-finite per-sample loss is
refused with `NonFiniteLossError` naming the samples, before it can reach the optimizer.

Names carry shapes: `_B` one value per response, `_BT` one per response token (zero outside `mask_BT`).
The equations, and every choice made where the papers are silent, are in docs/objectives.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from configs.schema import (
    GRPOObjectiveConfig,
    ObjectiveConfig,
    PacedObjectiveConfig,
    PowerFlowObjectiveConfig,
    TBObjectiveConfig,
)
from learner.log_partition import vargrad_log_z
from learner.logprobs import at_least_f32, masked_mean


class NonFiniteLossError(FloatingPointError):
    """A loss term is NaN or infinite; the message names the offending samples."""


@dataclass
class ObjectiveInputs:
    """Everything a loss may read, one row per response."""

    logp_BT: Tensor
    """log pi_theta of each response token under the current weights (with grad), 0 outside the mask."""
    mask_BT: Tensor
    """1 on response tokens (EOS included), 0 on prompt and padding."""
    group_B: Tensor
    """Index 0..G-1 of the rollout group (prompt) each response belongs to."""
    old_logp_BT: Tensor | None = None
    """log pi_old: the policy that produced the samples (PACED, PowerFlow, GRPO), detached."""
    ref_logp_BT: Tensor | None = None
    """Frozen reference / base-model per-token log-probs (PowerFlow target, GRPO KL)."""
    reward_B: Tensor | None = None
    """Verifier reward."""
    log_reward_B: Tensor | None = None
    """log R(x, y) for TB (see `tb_log_reward`)."""
    log_z_B: Tensor | None = None
    """log Z(x) from a head (LogZHead, ZPhi), one value per response."""
    has_format_B: Tensor | None = None
    """PowerFlow's format check: 1 where the response has a final-answer format (no psi penalty)."""
    replayed_B: Tensor | None = None
    """1 for responses replayed from the success buffer. Their log Z(x) enters the residual detached, so the
    log Z parameters are fitted on the on-policy groups alone (replayed responses are all correct, and would
    pull a(x) = beta log Z_phi(x) above the accuracy it estimates); the policy learns from every row."""
    sample_names: Sequence[str] | None = None
    """Names used in error messages (e.g. 'prompt 3f2a.. sample 5'); row indices when absent."""


@dataclass
class ObjectiveOutput:
    loss: Tensor
    delta_B: Tensor
    """The per-sample residual (detached): TB-family balance error, or the GRPO advantage."""
    metrics: dict[str, float] = field(default_factory=dict)


def tb_log_reward(reward_B: Tensor, beta: float, ref_logp_sum_B: Tensor | None = None) -> Tensor:
    """log R(x, y) = log pi_ref(y | x) + r / beta (the reference term is dropped when None)."""
    log_r = at_least_f32(reward_B) / beta
    return log_r + at_least_f32(ref_logp_sum_B) if ref_logp_sum_B is not None else log_r


def tb_loss(inp: ObjectiveInputs, cfg: TBObjectiveConfig) -> ObjectiveOutput:
    """Trajectory balance (Malkin et al. 2022), autoregressive so P_B = 1:

        delta(x, y) = log Z(x) + sum_t log pi_theta(y_t | x, y_<t) - log R(x, y),    L = mean delta^2

    log Z is the head's output, or with cfg.log_z='vargrad' the detached group mean of log R - log pi.
    Valid off-policy: y may come from any full-support behaviour policy.
    """
    logp_B = inp.logp_BT.sum(-1)
    log_r_B = _need(inp.log_reward_B, "log_reward_B", "tb").detach()
    if cfg.log_z == "vargrad":
        log_z_B = vargrad_log_z(log_r_B, logp_B, inp.group_B)
    else:
        log_z_B = _on_policy_log_z(_need(inp.log_z_B, "log_z_B", "tb with log_z='head'"), inp.replayed_B)
    delta_B = log_z_B + logp_B - log_r_B
    return _finish(delta_B.square(), delta_B, inp, log_z=log_z_B)


def paced_loss(inp: ObjectiveInputs, cfg: PacedObjectiveConfig) -> ObjectiveOutput:
    """PACED-RL (Kim et al. 2026): TB toward pi_old * exp(r / beta), a mirror-descent step from the behaviour policy:

        delta = log Z_phi(x) + sum log pi_theta - sum log pi_old - r / beta,    L = mean delta^2

    At theta = theta_old the optimum of log Z_phi is E[r] / beta, so beta * log Z_phi(x) estimates the accuracy.
    pi_old is the policy of this update for every row, replayed ones included (the learner passes its own
    log-probs, detached): TB's fixed point pi_old * exp(r / beta) / Z holds whatever distribution the responses
    were drawn from, as long as every row names the same pi_old. Replayed rows use log Z_phi detached.
    """
    old_B = _need(inp.old_logp_BT, "old_logp_BT", "paced").detach().sum(-1)
    reward_B = at_least_f32(_need(inp.reward_B, "reward_B", "paced"))
    log_z_B = _on_policy_log_z(_need(inp.log_z_B, "log_z_B", "paced"), inp.replayed_B)
    delta_B = log_z_B + inp.logp_BT.sum(-1) - old_B - reward_B / cfg.beta
    return _finish(delta_B.square(), delta_B, inp, log_z=log_z_B)


def powerflow_loss(inp: ObjectiveInputs, cfg: PowerFlowObjectiveConfig) -> ObjectiveOutput:
    """PowerFlow length-aware TB (Chen et al. 2026, Eq. 10) toward p_base^alpha:

        delta = log Z'(x) + mean_keep log pi_theta - alpha * (mean_keep log p_base + psi(y))
        w     = sg(clip(exp(sum_keep (log pi_theta - log pi_old)), lo, hi)),    L = mean w * delta^2

    keep = response tokens whose ratio pi_theta/pi_old lies in [lo, hi]. psi = format_penalty when the response
    has no final-answer format; it is applied per sample, outside the token mask (the reference code summed it
    over kept tokens, which penalises a correct answer whose format token was masked out). Fixed point:
    pi(y|x) proportional to p_base(y|x)^alpha * exp(-lambda |y|), lambda = log Z'(x).
    """
    ref_BT = _need(inp.ref_logp_BT, "ref_logp_BT", "powerflow").detach()
    log_z_B = _need(inp.log_z_B, "log_z_B", "powerflow")
    mask_BT = inp.mask_BT.to(inp.logp_BT.dtype)
    keep_BT, weight_B = powerflow_keep_and_weight(inp.logp_BT, inp.old_logp_BT, mask_BT, cfg)
    psi_B = torch.zeros_like(log_z_B)
    if cfg.use_format_penalty:
        has_format_B = _need(inp.has_format_B, "has_format_B", "powerflow with use_format_penalty")
        psi_B = (1.0 - has_format_B.to(log_z_B.dtype)) * cfg.format_penalty
    target_B = cfg.alpha * (masked_mean(ref_BT, keep_BT) + psi_B)
    delta_B = log_z_B + masked_mean(inp.logp_BT, keep_BT) - target_B
    extra = {
        "is_weight_mean": weight_B.mean().item(),
        "is_weight_min": weight_B.min().item(),
        "is_weight_max": weight_B.max().item(),
        "masked_token_frac": 1.0 - (keep_BT.sum() / mask_BT.sum().clamp_min(1.0)).item(),
    }
    return _finish(weight_B * delta_B.square(), delta_B, inp, log_z=log_z_B, extra=extra)


def powerflow_keep_and_weight(
    logp_BT: Tensor, old_logp_BT: Tensor | None, mask_BT: Tensor, cfg: PowerFlowObjectiveConfig
) -> tuple[Tensor, Tensor]:
    """(keep_BT, weight_B), both stop-gradient: response tokens whose ratio pi_theta/pi_old is inside
    [lo, hi], and the sequence weight clip(exp(sum_keep log ratio), lo, hi). Without pi_old (fully on-policy)
    every token is kept and every weight is 1."""
    if old_logp_BT is None:
        return mask_BT, torch.ones(mask_BT.shape[0], dtype=mask_BT.dtype, device=mask_BT.device)
    log_ratio_BT = (logp_BT.detach() - old_logp_BT.detach()) * mask_BT
    ratio_BT = log_ratio_BT.exp()
    keep_BT = mask_BT * ((ratio_BT >= cfg.is_clip_low) & (ratio_BT <= cfg.is_clip_high)).to(mask_BT.dtype)
    weight_B = (log_ratio_BT * keep_BT).sum(-1).exp().clamp(cfg.is_clip_low, cfg.is_clip_high)
    return keep_BT, weight_B


def grpo_loss(inp: ObjectiveInputs, cfg: GRPOObjectiveConfig) -> ObjectiveOutput:
    """GRPO (Shao et al. 2024): group-normalised advantages with PPO clipping and an optional k3 KL:

    A_i = (r_i - mean_group r) / (std_group r + eps)     (0 for a group whose rewards are all equal)
    L_i = (1/|o_i|) sum_t [ -min(rho_t A_i, clip(rho_t, 1 - lo, 1 + hi) A_i) + kl_coef * k3_t ]
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1,    L = mean_i L_i
    """
    reward_B = _need(inp.reward_B, "reward_B", "grpo").to(inp.logp_BT.dtype)
    adv_B = group_advantages(reward_B, inp.group_B, normalize_std=cfg.normalize_std)
    mask_BT = inp.mask_BT.to(inp.logp_BT.dtype)
    old_BT = inp.old_logp_BT.detach() if inp.old_logp_BT is not None else inp.logp_BT.detach()
    ratio_BT = ((inp.logp_BT - old_BT) * mask_BT).exp()
    clipped_BT = ratio_BT.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    surrogate_BT = torch.minimum(ratio_BT * adv_B[:, None], clipped_BT * adv_B[:, None])
    per_token_BT = -surrogate_BT
    extra: dict[str, float] = {}
    if cfg.kl_coef > 0:
        ref_BT = _need(inp.ref_logp_BT, "ref_logp_BT", "grpo with kl_coef > 0").detach()
        log_ratio_BT = (ref_BT - inp.logp_BT) * mask_BT
        k3_BT = log_ratio_BT.exp() - log_ratio_BT - 1.0
        per_token_BT = per_token_BT + cfg.kl_coef * k3_BT
        extra["kl_k3"] = masked_mean(k3_BT.detach(), mask_BT).mean().item()
    clipped = ((ratio_BT - clipped_BT).abs() > 0).to(mask_BT.dtype)
    extra["clip_frac"] = ((clipped * mask_BT).sum() / mask_BT.sum().clamp_min(1.0)).item()
    extra["adv_abs_mean"] = adv_B.abs().mean().item()
    return _finish(masked_mean(per_token_BT, mask_BT), adv_B, inp, extra=extra)


def group_advantages(reward_B: Tensor, group_B: Tensor, *, normalize_std: bool, eps: float = 1e-6) -> Tensor:
    """r minus its group mean, divided by the group's (population) std when asked; exactly 0 in all-equal groups."""
    num_groups = int(group_B.max()) + 1
    ones = torch.ones_like(reward_B)
    count = torch.zeros(num_groups, dtype=reward_B.dtype, device=reward_B.device).index_add_(0, group_B, ones)
    mean = torch.zeros_like(count).index_add_(0, group_B, reward_B) / count
    centred_B = reward_B - mean[group_B]
    if not normalize_std:
        return centred_B
    var = torch.zeros_like(count).index_add_(0, group_B, centred_B.square()) / count
    std_B = var.sqrt()[group_B]
    return torch.where(std_B > eps, centred_B / (std_B + eps), torch.zeros_like(centred_B))


OBJECTIVES: dict[str, Callable[[ObjectiveInputs, Any], ObjectiveOutput]] = {
    "tb": tb_loss,
    "paced": paced_loss,
    "powerflow": powerflow_loss,
    "grpo": grpo_loss,
}


def compute_objective(inp: ObjectiveInputs, cfg: ObjectiveConfig) -> ObjectiveOutput:
    return OBJECTIVES[cfg.kind](inp, cfg)


def _on_policy_log_z(log_z_B: Tensor, replayed_B: Tensor | None) -> Tensor:
    """log Z with its gradient kept on on-policy rows only (see ObjectiveInputs.replayed_B)."""
    if replayed_B is None:
        return log_z_B
    return torch.where(replayed_B.bool(), log_z_B.detach(), log_z_B)


def _need(value: Tensor | None, name: str, objective: str) -> Tensor:
    if value is None:
        raise ValueError(f"objective {objective} needs ObjectiveInputs.{name}, which is None")
    return value


def _finish(
    per_sample_B: Tensor,
    delta_B: Tensor,
    inp: ObjectiveInputs,
    log_z: Tensor | None = None,
    extra: Mapping[str, float] | None = None,
) -> ObjectiveOutput:
    bad = (~torch.isfinite(per_sample_B.detach())).nonzero().flatten().tolist()
    if bad:
        names = [inp.sample_names[i] if inp.sample_names else f"row {i}" for i in bad[:8]]
        raise NonFiniteLossError(
            f"non-finite loss for {len(bad)} of {per_sample_B.numel()} samples: {', '.join(names)}"
            + (" ..." if len(bad) > 8 else "")
        )
    lengths_B = inp.mask_BT.to(per_sample_B.dtype).sum(-1)
    metrics = {
        "loss": per_sample_B.detach().mean().item(),
        "delta_mean": delta_B.detach().mean().item(),
        "delta_abs_mean": delta_B.detach().abs().mean().item(),
        "response_len_mean": lengths_B.mean().item(),
        **(extra or {}),
    }
    if log_z is not None:
        metrics["log_z_mean"] = log_z.detach().mean().item()
    return ObjectiveOutput(loss=per_sample_B.mean(), delta_B=delta_B.detach(), metrics=metrics)
