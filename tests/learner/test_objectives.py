"""The objectives, proven on enumerable toys: every learned distribution is compared with the exact target.

The toy (tests/learner/toy.py) has 40 responses per prompt and a tabular policy, trained through the same
`token_logprobs` as a real model. Bounds, not golden numbers: a better optimiser only makes them pass by more.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from configs.schema import GRPOObjectiveConfig, PacedObjectiveConfig, PowerFlowObjectiveConfig, TBObjectiveConfig
from learner import objectives
from learner.log_partition import LogZHead, ZPhi, accuracy_estimate, measured_offset
from learner.logprobs import token_logprobs
from learner.objectives import (
    OBJECTIVES,
    NonFiniteLossError,
    ObjectiveInputs,
    ObjectiveOutput,
    grpo_loss,
    paced_loss,
    powerflow_keep_and_weight,
    powerflow_loss,
    tb_log_reward,
    tb_loss,
)
from tests.learner.toy import (
    LENGTHS,
    NUM_PREFIXES,
    RESPONSES,
    Batch,
    ToyPolicy,
    exact_log_probs,
    length_tilted_target,
    make_batch,
    sample,
    total_variation,
)

P = 3  # prompts in the toys
SAMPLES_PER_PROMPT = 32


def _train(
    policy: ToyPolicy,
    loss_fn: Callable[[Batch, Tensor, Tensor], ObjectiveOutput],
    *,
    steps: int,
    head: torch.nn.Module | None = None,
    behaviour: ToyPolicy | None = None,
    policy_lr: float = 0.05,
    head_lr: float = 0.01,
    samples_per_prompt: int = SAMPLES_PER_PROMPT,
) -> None:
    """Sample from `behaviour` (default: the policy itself), recompute log-probs, step; LR decays linearly to 0."""
    groups = [{"params": policy.parameters(), "lr": policy_lr}]
    if head is not None:
        groups.append({"params": head.parameters(), "lr": head_lr})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    gen = torch.Generator().manual_seed(1234)
    prompts = torch.arange(policy.num_prompts).repeat_interleave(samples_per_prompt)
    for _ in range(steps):
        batch = sample(behaviour or policy, prompts, gen)
        logp_BT, hidden = token_logprobs(
            policy, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT, return_hidden=True
        )
        assert hidden is not None
        out = loss_fn(batch, logp_BT, hidden)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()


def _head_log_z(policy: ToyPolicy, head: LogZHead) -> Tensor:
    batch = make_batch(torch.arange(policy.num_prompts), torch.zeros(policy.num_prompts, dtype=torch.long), P)
    _, hidden = token_logprobs(
        policy, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT, return_hidden=True
    )
    assert hidden is not None
    return head(hidden, batch.prompt_mask_BT).detach().double()


def _lm_like_base() -> ToyPolicy:
    """A frozen base model shaped like an LM: EOS ~0.2 per step, near-uniform continuations, so log p(y)
    falls roughly linearly with |y| (the regime in which the PowerFlow paper sees plain TB collapse)."""
    base = ToyPolicy(P, seed=11)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        table = 0.4 * torch.randn(P, NUM_PREFIXES, 4, generator=gen)
        table[..., 0] += math.log(0.2) - math.log(0.8 / 3)
        base.table.copy_(table)
    return base.requires_grad_(False)


def _expected_length(logp: Tensor) -> Tensor:
    return (logp.exp() * LENGTHS).sum(-1)


# --------------------------------------------------------------------------------------------------- TB
@pytest.mark.parametrize("behaviour", ["on_policy", "off_policy"])
def test_tb_learns_the_reward_distribution_and_log_partition(behaviour: str) -> None:
    log_r = 1.5 * torch.randn(P, len(RESPONSES), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    policy, head = ToyPolicy(P), LogZHead(8)
    fixed = ToyPolicy(P, init_scale=0.5, seed=7).requires_grad_(False) if behaviour == "off_policy" else None
    cfg = TBObjectiveConfig()

    def loss(batch: Batch, logp_BT: Tensor, hidden: Tensor) -> ObjectiveOutput:
        inp = ObjectiveInputs(
            logp_BT=logp_BT,
            mask_BT=batch.response_mask_BT,
            group_B=batch.prompt_B,
            log_reward_B=log_r[batch.prompt_B, batch.response_index_B].float(),
            log_z_B=head(hidden, batch.prompt_mask_BT),
        )
        return tb_loss(inp, cfg)

    _train(policy, loss, steps=1000 if fixed else 600, head=head, behaviour=fixed)
    target = log_r - log_r.logsumexp(-1, keepdim=True)
    assert total_variation(exact_log_probs(policy), target).max() < 0.05
    assert (_head_log_z(policy, head) - log_r.logsumexp(-1)).abs().max() < 0.1


def test_tb_with_vargrad_learns_the_reward_distribution() -> None:
    log_r = 1.5 * torch.randn(P, len(RESPONSES), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    policy = ToyPolicy(P)
    cfg = TBObjectiveConfig(log_z="vargrad")

    def loss(batch: Batch, logp_BT: Tensor, hidden: Tensor) -> ObjectiveOutput:
        inp = ObjectiveInputs(
            logp_BT=logp_BT,
            mask_BT=batch.response_mask_BT,
            group_B=batch.prompt_B,
            log_reward_B=log_r[batch.prompt_B, batch.response_index_B].float(),
        )
        return tb_loss(inp, cfg)

    _train(policy, loss, steps=600)
    target = log_r - log_r.logsumexp(-1, keepdim=True)
    assert total_variation(exact_log_probs(policy), target).max() < 0.05


# --------------------------------------------------------------------------------------------------- PowerFlow
def _train_towards_power(alpha: float, *, length_aware: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Start at p_base and train with LA-TB (powerflow_loss) or plain sequence TB toward p_base^alpha.
    Returns (log p_base, learned log pi, learned log Z per prompt)."""
    base = _lm_like_base()
    policy = copy.deepcopy(base).requires_grad_(True)
    head = LogZHead(8)
    pf_cfg, tb_cfg = PowerFlowObjectiveConfig(alpha=alpha), TBObjectiveConfig()

    def loss(batch: Batch, logp_BT: Tensor, hidden: Tensor) -> ObjectiveOutput:
        ref_BT, _ = token_logprobs(base, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
        common: dict[str, Any] = {"logp_BT": logp_BT, "mask_BT": batch.response_mask_BT, "group_B": batch.prompt_B}
        log_z_B = head(hidden, batch.prompt_mask_BT)
        if length_aware:
            inp = ObjectiveInputs(**common, old_logp_BT=logp_BT.detach(), ref_logp_BT=ref_BT, log_z_B=log_z_B)
            return powerflow_loss(inp, pf_cfg)
        return tb_loss(ObjectiveInputs(**common, log_reward_B=alpha * ref_BT.sum(-1), log_z_B=log_z_B), tb_cfg)

    _train(policy, loss, steps=800, head=head)
    return exact_log_probs(base), exact_log_probs(policy), _head_log_z(policy, head)


@pytest.mark.parametrize("alpha", [2.0, 0.5, 1.0])
def test_powerflow_reaches_the_length_tilted_power_distribution(alpha: float) -> None:
    log_base, learned, log_z = _train_towards_power(alpha, length_aware=True)
    target, lam = length_tilted_target(log_base, alpha)
    assert total_variation(learned, target).max() < 0.05
    assert (log_z - lam).abs().max() < 0.1  # log Z' is the per-token tilt lambda
    if alpha == 1.0:
        assert total_variation(learned, log_base).max() < 0.05  # alpha = 1 leaves the base model alone


def test_plain_tb_toward_the_power_collapses_length_and_la_tb_does_not() -> None:
    log_base, plain, _ = _train_towards_power(2.0, length_aware=False)
    _, length_aware, _ = _train_towards_power(2.0, length_aware=True)
    power = 2.0 * log_base - (2.0 * log_base).logsumexp(-1, keepdim=True)
    assert total_variation(plain, power).max() < 0.05  # plain TB does reach its own fixed point...
    shortest = LENGTHS == 1
    base_short, plain_short = log_base.exp()[:, shortest].sum(-1), plain.exp()[:, shortest].sum(-1)
    assert (plain_short > base_short + 0.2).all()  # ...which piles mass on the shortest responses
    assert (_expected_length(plain) < _expected_length(log_base) - 0.9).all()
    assert (_expected_length(length_aware) > _expected_length(log_base) - 0.25).all()


def test_powerflow_format_penalty_applies_to_unformatted_responses_even_if_masked() -> None:
    """psi sits outside the keep-mask: a response whose every token is masked still gets alpha * psi."""
    logp_BT = torch.tensor([[0.0, -1.0, -1.0], [0.0, -1.0, -1.0]], requires_grad=True)
    old_BT = torch.tensor([[0.0, -1.0, -1.0], [0.0, -3.0, -3.0]])  # row 1: ratios e^2, every token masked
    inp = ObjectiveInputs(
        logp_BT=logp_BT,
        mask_BT=torch.tensor([[0, 1, 1], [0, 1, 1]]),
        group_B=torch.tensor([0, 0]),
        old_logp_BT=old_BT,
        ref_logp_BT=torch.full((2, 3), -2.0),
        log_z_B=torch.zeros(2),
        has_format_B=torch.tensor([0.0, 0.0]),
    )
    cfg = PowerFlowObjectiveConfig(alpha=2.0, use_format_penalty=True, format_penalty=-0.5)
    out = powerflow_loss(inp, cfg)
    # row 0: 0 + (-1) - 2 * (-2 - 0.5) = 4; row 1 (all masked): 0 + 0 - 2 * (0 - 0.5) = 1
    assert torch.allclose(out.delta_B, torch.tensor([4.0, 1.0]))
    assert out.metrics["masked_token_frac"] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------- PACED
def _correct_sets(policy: ToyPolicy, accuracies: list[float], seed: int) -> Tensor:
    """A 0/1 reward table giving each prompt roughly the wanted accuracy under `policy`."""
    start = exact_log_probs(policy)
    gen = torch.Generator().manual_seed(seed)
    correct = torch.zeros(len(accuracies), len(RESPONSES))
    for p, wanted in enumerate(accuracies):
        covered = 0.0
        for r in torch.randperm(len(RESPONSES), generator=gen).tolist():
            if covered >= wanted:
                break
            correct[p, r] = 1.0
            covered += start[p, r].exp().item()
    return correct


@pytest.mark.parametrize("policy_lr", [0.0, 3e-3])
def test_paced_accuracy_estimate_matches_the_behaviour_policy(policy_lr: float) -> None:
    """beta * log Z_phi(x) recovers each prompt's exact accuracy, frozen or while the policy itself improves."""
    num_prompts = 4
    policy = ToyPolicy(num_prompts, init_scale=0.5, seed=3)
    start = exact_log_probs(policy)
    correct = _correct_sets(policy, [0.1, 0.35, 0.6, 0.85], seed=9)  # prompts from hard to easy
    embeddings = torch.randn(num_prompts, 16, generator=torch.Generator().manual_seed(9))
    cfg = PacedObjectiveConfig()
    z_phi = ZPhi(16, 64, beta=cfg.beta)
    z_phi.set_normalisation(embeddings)

    def loss(batch: Batch, logp_BT: Tensor, hidden: Tensor) -> ObjectiveOutput:
        inp = ObjectiveInputs(
            logp_BT=logp_BT,
            mask_BT=batch.response_mask_BT,
            group_B=batch.prompt_B,
            old_logp_BT=logp_BT.detach(),  # samples come from the current policy: pi_old = pi_theta at sampling
            reward_B=correct[batch.prompt_B, batch.response_index_B],
            log_z_B=z_phi(embeddings[batch.prompt_B]),
        )
        return paced_loss(inp, cfg)

    _train(policy, loss, steps=800, head=z_phi, policy_lr=policy_lr, head_lr=1e-3, samples_per_prompt=64)
    exact_accuracy = (exact_log_probs(policy).exp() * correct).sum(-1)
    estimate = accuracy_estimate(z_phi(embeddings), cfg.beta).double()
    assert (estimate - exact_accuracy).abs().max() < 0.05
    assert exact_accuracy.max() - exact_accuracy.min() > 0.25  # the prompts really differ in difficulty
    if policy_lr:
        assert (exact_accuracy > (start.exp() * correct).sum(-1)).all()  # and PACED-RL improved the policy


def _replay_successes(source: ToyPolicy, correct: Tensor, per_prompt: int, gen: torch.Generator) -> Batch:
    """A success buffer: `per_prompt` correct responses per prompt, drawn from `source` (an older policy)."""
    probs = exact_log_probs(source).exp() * correct  # source restricted to its correct responses
    picks = torch.multinomial(probs.float(), per_prompt, replacement=True, generator=gen)
    prompts = torch.arange(source.num_prompts).repeat_interleave(per_prompt)
    return make_batch(prompts, picks.flatten(), source.num_prompts)


def _cat(a: Batch, b: Batch) -> Batch:
    return Batch(*(torch.cat([x, y]) for x, y in zip(vars(a).values(), vars(b).values(), strict=True)))


@pytest.mark.parametrize("old_logprobs", ["recomputed", "stored"])
def test_paced_with_replayed_successes_reaches_pi_old_times_exp_r_over_beta(old_logprobs: str) -> None:
    """One PACED update run to convergence on a batch mixing fresh samples of pi_old with correct responses
    replayed from an older policy. With pi_old recomputed for every row (what the learner does) the policy
    reaches the exact target pi_old * exp(r / beta) / Z; with the replayed rows' stored behaviour log-probs it
    would mix in the older policy's target instead."""
    num_prompts, beta = 3, 0.5
    pi_old = ToyPolicy(num_prompts, init_scale=0.5, seed=3).requires_grad_(False)
    older = ToyPolicy(num_prompts, init_scale=1.5, seed=8).requires_grad_(False)
    correct = _correct_sets(pi_old, [0.2, 0.4, 0.6], seed=4)
    policy = copy.deepcopy(pi_old).requires_grad_(True)
    log_z = torch.nn.Parameter(torch.zeros(num_prompts))
    cfg = PacedObjectiveConfig(beta=beta)
    gen = torch.Generator().manual_seed(0)
    buffer = _replay_successes(older, correct, 200, gen)
    opt = torch.optim.Adam([{"params": policy.parameters(), "lr": 0.05}, {"params": [log_z], "lr": 0.05}])
    steps = 1500
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for _ in range(steps):
        fresh = sample(pi_old, torch.arange(num_prompts).repeat_interleave(48), gen)
        replay_rows = torch.randint(0, len(buffer.prompt_B), (48,), generator=gen)
        replayed = Batch(*(x[replay_rows] for x in vars(buffer).values()))
        batch = _cat(fresh, replayed)
        replayed_B = torch.cat([torch.zeros(len(fresh.prompt_B)), torch.ones(48)])
        logp_BT, _ = token_logprobs(policy, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
        old_BT, _ = token_logprobs(pi_old, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
        if old_logprobs == "stored":  # the replayed rows' behaviour policy: the older one
            stored_BT, _ = token_logprobs(older, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
            old_BT = torch.where(replayed_B.bool()[:, None], stored_BT, old_BT)
        inp = ObjectiveInputs(
            logp_BT=logp_BT,
            mask_BT=batch.response_mask_BT,
            group_B=batch.prompt_B,
            old_logp_BT=old_BT,
            reward_B=correct[batch.prompt_B, batch.response_index_B],
            log_z_B=log_z[batch.prompt_B],
            replayed_B=replayed_B,
        )
        out = paced_loss(inp, cfg)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    target = exact_log_probs(pi_old) + correct.double() / beta
    target = target - torch.logsumexp(target, -1, keepdim=True)
    tv = total_variation(exact_log_probs(policy), target)
    if old_logprobs == "recomputed":
        assert tv.max() < 0.05, tv
        exact_log_z = torch.logsumexp(exact_log_probs(pi_old) + correct / beta, -1)
        assert (log_z.detach().double() - exact_log_z).abs().max() < 0.1
    else:
        assert tv.max() > 0.1, tv


@pytest.mark.parametrize("keep_replay_out_of_z", [True, False])
def test_paced_estimate_is_fitted_on_on_policy_groups_only(keep_replay_out_of_z: bool) -> None:
    """A third of every batch is replayed correct responses. Marked as replayed, they leave Z_phi alone and
    a(x) stays the behaviour policy's exact accuracy; fitted on them too, a(x) overestimates the prompts that
    are not already almost always solved (by up to a third here)."""
    num_prompts = 4
    policy = ToyPolicy(num_prompts, init_scale=0.5, seed=3).requires_grad_(False)
    correct = _correct_sets(policy, [0.1, 0.35, 0.6, 0.85], seed=9)
    embeddings = torch.randn(num_prompts, 16, generator=torch.Generator().manual_seed(9))
    cfg = PacedObjectiveConfig()
    z_phi = ZPhi(16, 64, beta=cfg.beta)
    z_phi.set_normalisation(embeddings)
    opt = torch.optim.Adam(z_phi.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    buffer = _replay_successes(policy, correct, 100, gen)
    for _ in range(600):
        fresh = sample(policy, torch.arange(num_prompts).repeat_interleave(32), gen)
        rows = torch.randint(0, len(buffer.prompt_B), (64,), generator=gen)
        batch = _cat(fresh, Batch(*(x[rows] for x in vars(buffer).values())))
        logp_BT, _ = token_logprobs(policy, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
        replayed_B = torch.cat([torch.zeros(len(fresh.prompt_B)), torch.ones(64)])
        inp = ObjectiveInputs(
            logp_BT=logp_BT,
            mask_BT=batch.response_mask_BT,
            group_B=batch.prompt_B,
            old_logp_BT=logp_BT.detach(),
            reward_B=correct[batch.prompt_B, batch.response_index_B],
            log_z_B=z_phi(embeddings[batch.prompt_B]),
            replayed_B=replayed_B if keep_replay_out_of_z else None,
        )
        opt.zero_grad()
        paced_loss(inp, cfg).loss.backward()
        opt.step()
    exact_accuracy = (exact_log_probs(policy).exp() * correct).sum(-1)
    error = accuracy_estimate(z_phi(embeddings), cfg.beta).double() - exact_accuracy
    if keep_replay_out_of_z:
        assert error.abs().max() < 0.05, error
    else:
        assert (error[:3] > 0.1).all() and (error >= 0).all(), error  # prompts of accuracy 0.1, 0.35, 0.6


# --------------------------------------------------------------------------------------------------- GRPO
def test_grpo_raises_expected_reward() -> None:
    policy = ToyPolicy(P, init_scale=0.5, seed=3)
    reward = (torch.rand(P, len(RESPONSES), generator=torch.Generator().manual_seed(4)) < 0.3).float()
    before = (exact_log_probs(policy).exp() * reward).sum(-1)
    cfg = GRPOObjectiveConfig()

    def loss(batch: Batch, logp_BT: Tensor, hidden: Tensor) -> ObjectiveOutput:
        inp = ObjectiveInputs(
            logp_BT=logp_BT,
            mask_BT=batch.response_mask_BT,
            group_B=batch.prompt_B,
            old_logp_BT=logp_BT.detach(),
            reward_B=reward[batch.prompt_B, batch.response_index_B],
        )
        return grpo_loss(inp, cfg)

    _train(policy, loss, steps=200, samples_per_prompt=16)
    after = (exact_log_probs(policy).exp() * reward).sum(-1)
    assert (after > before + 0.2).all(), (before, after)


def test_grpo_all_equal_groups_give_zero_advantage_and_no_gradient() -> None:
    logp_BT = torch.tensor([[0.0, -1.0, -0.5], [0.0, -2.0, 0.0], [0.0, -0.3, -0.1]], requires_grad=True)
    inp = ObjectiveInputs(
        logp_BT=logp_BT,
        mask_BT=torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1]]),
        group_B=torch.tensor([0, 0, 1]),  # group 1 has a single sample
        reward_B=torch.tensor([1.0, 1.0, 0.0]),
    )
    out = grpo_loss(inp, GRPOObjectiveConfig())
    assert torch.equal(out.delta_B, torch.zeros(3))
    out.loss.backward()
    assert logp_BT.grad is not None and torch.equal(logp_BT.grad, torch.zeros_like(logp_BT))


# --------------------------------------------------------------------------------------------------- contract
def _inputs_for(kind: str, policy: ToyPolicy, batch: Batch, head: LogZHead, old: ToyPolicy, ref: ToyPolicy):
    logp_BT, hidden = token_logprobs(
        policy, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT, return_hidden=True
    )
    old_BT, _ = token_logprobs(old, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
    ref_BT, _ = token_logprobs(ref, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
    assert hidden is not None
    reward_B = (batch.response_index_B % 3 == 0).to(logp_BT.dtype)
    return ObjectiveInputs(
        logp_BT=logp_BT,
        mask_BT=batch.response_mask_BT,
        group_B=batch.prompt_B,
        old_logp_BT=old_BT,
        ref_logp_BT=ref_BT,
        reward_B=reward_B,
        log_reward_B=tb_log_reward(reward_B, 0.5, ref_BT.sum(-1)),
        log_z_B=head(hidden, batch.prompt_mask_BT),
        has_format_B=(batch.response_index_B % 2).to(logp_BT.dtype),
    )


CONFIGS = {
    "tb": TBObjectiveConfig(),
    "paced": PacedObjectiveConfig(beta=0.5),
    "powerflow": PowerFlowObjectiveConfig(alpha=2.0, use_format_penalty=True),
    "grpo": GRPOObjectiveConfig(kl_coef=0.1),
}


def _toy_setup(dtype: torch.dtype) -> tuple[ToyPolicy, LogZHead, ToyPolicy, ToyPolicy, Batch]:
    torch.manual_seed(0)
    policy = ToyPolicy(2, init_scale=0.3, seed=1, dtype=dtype)
    old = ToyPolicy(2, init_scale=0.3, seed=1, dtype=dtype).requires_grad_(False)
    with torch.no_grad():  # pi_old a little away from pi_theta, so ratios and clipping are exercised
        old.table.add_(0.1 * torch.randn(old.table.shape, generator=torch.Generator().manual_seed(2), dtype=dtype))
    ref = ToyPolicy(2, init_scale=0.5, seed=3, dtype=dtype).requires_grad_(False)
    head = LogZHead(8).to(dtype)
    batch = sample(old, torch.arange(2).repeat_interleave(6), torch.Generator().manual_seed(5))
    return policy, head, old, ref, batch


@pytest.mark.parametrize("kind", sorted(OBJECTIVES))
def test_gradients_match_finite_differences(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    policy, head, old, ref, batch = _toy_setup(torch.float64)
    cfg = CONFIGS[kind]
    if kind == "powerflow":
        # PowerFlow's keep-mask and IS weight are stop-gradient by definition: hold them at their values here,
        # so the finite differences measure the same function the gradient is of.
        at_start = _inputs_for(kind, policy, batch, head, old, ref)
        assert isinstance(cfg, PowerFlowObjectiveConfig)
        frozen = powerflow_keep_and_weight(
            at_start.logp_BT, at_start.old_logp_BT, at_start.mask_BT.to(torch.float64), cfg
        )
        monkeypatch.setattr(objectives, "powerflow_keep_and_weight", lambda *args: frozen)

    def loss() -> Tensor:
        return OBJECTIVES[kind](_inputs_for(kind, policy, batch, head, old, ref), cfg).loss

    params = [policy.table, policy.embed, *head.parameters()]
    grads = torch.autograd.grad(loss(), params, allow_unused=True)
    gen = torch.Generator().manual_seed(7)
    checked = 0
    for param, grad in zip(params, grads, strict=True):
        grad = torch.zeros_like(param) if grad is None else grad
        flat, flat_grad = param.data.view(-1), grad.view(-1)
        nonzero = flat_grad.nonzero().flatten()
        candidates = nonzero if nonzero.numel() else torch.arange(flat.numel())
        for i in candidates[torch.randperm(candidates.numel(), generator=gen)[:6]].tolist():
            original = flat[i].item()
            with torch.no_grad():
                flat[i] = original + 1e-6
                up = loss().item()
                flat[i] = original - 1e-6
                down = loss().item()
                flat[i] = original
            numeric = (up - down) / 2e-6
            assert numeric == pytest.approx(flat_grad[i].item(), rel=1e-4, abs=1e-7), (kind, param.shape, i)
            checked += 1
    assert checked >= 12


@pytest.mark.parametrize("kind", sorted(OBJECTIVES))
def test_contract_finite_scalar_loss_and_padding_has_no_effect(kind: str) -> None:
    policy, head, old, ref, batch = _toy_setup(torch.float32)
    out = OBJECTIVES[kind](_inputs_for(kind, policy, batch, head, old, ref), CONFIGS[kind])
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.delta_B.shape == (batch.prompt_B.numel(),)
    assert {"loss", "delta_mean", "response_len_mean"} <= set(out.metrics)
    # The same rows padded with three more PAD columns: identical per-token log-probs, identical loss.
    pad = torch.zeros(batch.prompt_B.numel(), 3, dtype=torch.long)
    padded = Batch(
        torch.cat([batch.input_ids_BT, pad], 1),
        torch.cat([batch.attention_mask_BT, pad], 1),
        torch.cat([batch.response_mask_BT, pad], 1),
        torch.cat([batch.prompt_mask_BT, pad], 1),
        batch.prompt_B,
        batch.response_index_B,
    )
    padded_out = OBJECTIVES[kind](_inputs_for(kind, policy, padded, head, old, ref), CONFIGS[kind])
    assert torch.allclose(out.loss, padded_out.loss, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(OBJECTIVES))
def test_gradients_reach_only_the_policy_and_log_z(kind: str) -> None:
    policy, head, old, ref, batch = _toy_setup(torch.float32)
    old.requires_grad_(True)
    ref.requires_grad_(True)
    OBJECTIVES[kind](_inputs_for(kind, policy, batch, head, old, ref), CONFIGS[kind]).loss.backward()
    assert policy.table.grad is not None and policy.table.grad.abs().sum() > 0
    assert old.table.grad is None and ref.table.grad is None
    if kind != "grpo":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_empty_responses_give_no_nan() -> None:
    mask_BT = torch.tensor([[0, 0, 0], [0, 1, 1]])
    logp_BT = torch.tensor([[0.0, 0.0, 0.0], [0.0, -1.0, -2.0]], requires_grad=True)
    common: dict[str, Any] = {"logp_BT": logp_BT, "mask_BT": mask_BT, "group_B": torch.tensor([0, 0])}
    pf = powerflow_loss(
        ObjectiveInputs(**common, ref_logp_BT=torch.zeros(2, 3), log_z_B=torch.zeros(2)), PowerFlowObjectiveConfig()
    )
    grpo = grpo_loss(ObjectiveInputs(**common, reward_B=torch.tensor([0.0, 1.0])), GRPOObjectiveConfig())
    tb = tb_loss(ObjectiveInputs(**common, log_reward_B=torch.zeros(2)), TBObjectiveConfig(log_z="vargrad"))
    for out in (pf, grpo, tb):
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert logp_BT.grad is not None and torch.isfinite(logp_BT.grad).all()


def test_non_finite_loss_is_refused_naming_the_samples() -> None:
    inp = ObjectiveInputs(
        logp_BT=torch.zeros(3, 2),
        mask_BT=torch.ones(3, 2),
        group_B=torch.tensor([0, 0, 1]),
        log_reward_B=torch.tensor([0.0, float("nan"), float("inf")]),
        log_z_B=torch.zeros(3),
        sample_names=["prompt a #0", "prompt a #1", "prompt b #0"],
    )
    with pytest.raises(NonFiniteLossError, match=r"2 of 3 samples: prompt a #1, prompt b #0"):
        tb_loss(inp, TBObjectiveConfig())


def test_missing_inputs_name_the_field() -> None:
    inp = ObjectiveInputs(logp_BT=torch.zeros(1, 2), mask_BT=torch.ones(1, 2), group_B=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"needs ObjectiveInputs\.reward_B"):
        grpo_loss(inp, GRPOObjectiveConfig())
    with pytest.raises(ValueError, match=r"needs ObjectiveInputs\.log_reward_B"):
        tb_loss(inp, TBObjectiveConfig())


def test_token_logprobs_in_bf16_are_summed_in_float32() -> None:
    policy = ToyPolicy(2, init_scale=0.5, seed=1, dtype=torch.bfloat16)
    batch = make_batch(torch.tensor([0, 1]), torch.tensor([5, 39]), 2)
    logp_BT, _ = token_logprobs(policy, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
    assert logp_BT.dtype == torch.float32
    assert torch.equal(logp_BT[batch.response_mask_BT == 0], torch.zeros(int((batch.response_mask_BT == 0).sum())))


def test_measured_offset_is_alpha_minus_one_times_the_mean_nll_per_token() -> None:
    base = torch.tensor([[0.0, -1.0, -3.0, 0.0], [0.0, -2.0, 0.0, 0.0]])  # NLL per token: 2.0 in both rows
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    assert measured_offset(base, mask, alpha=0.5) == pytest.approx(-1.0)  # (0.5 - 1) x 2.0
    assert measured_offset(base, mask, alpha=2.0) == pytest.approx(2.0)
    empty = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no response tokens"):
        measured_offset(base[:1], empty, alpha=2.0)
