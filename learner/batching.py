"""Rollout groups from the replay -> padded training tensors, split into micro-batches of whole groups.

Rows are right-padded `prompt + response`; `response_mask_BT` marks response tokens, `prompt_mask_BT` prompt
tokens. The behaviour log-probs and (when present) the base-model log-probs stored with each response are placed
at the same positions as the tokens they score, so objectives can use them next to the recomputed ones.
Micro-batches never split a group, because VarGrad and GRPO need every sample of a prompt together.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from replay.records import RolloutGroup, SampledBatch


@dataclass
class TrainBatch:
    input_ids_BT: Tensor
    attention_mask_BT: Tensor
    response_mask_BT: Tensor
    prompt_mask_BT: Tensor
    behaviour_logp_BT: Tensor
    base_logp_BT: Tensor | None
    reward_B: Tensor
    has_answer_B: Tensor
    group_B: Tensor
    """Index of each row's group within this batch (0..num_groups-1)."""
    policy_lag_B: Tensor
    replayed_B: Tensor
    """1 for rows replayed from the success buffer, 0 for rows of whole groups from the main table."""
    prompt_ids: list[str]
    """One per group."""
    keys: list[str]
    """Replay key of each group."""
    replayed: list[bool]
    """Per group: a single response from the success buffer (True) or a whole group (False)."""
    fresh: list[bool]
    """Per group: never sampled before this batch."""
    selections: list[str]
    """Per group: how the scheduler chose its prompt ('uniform', 'paced', 'explore')."""
    priorities: list[float]
    """Per group: its replay priority when it was drawn."""
    sample_names: list[str]

    @property
    def num_rows(self) -> int:
        return int(self.input_ids_BT.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask_BT.sum())

    def to(self, device: torch.device) -> TrainBatch:
        """The same batch with every tensor on `device` (itself when they already are)."""
        if self.input_ids_BT.device == device:
            return self
        moved: dict[str, Any] = {
            f.name: value.to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)


def collate(
    sampled: SampledBatch,
    *,
    pad_id: int,
    current_version: int,
    drop_invalid_rewards: bool,
) -> TrainBatch:
    """Pad every response of every sampled group into one batch. With `drop_invalid_rewards`, responses whose
    reward is NaN (verifier crashed or timed out) are left out; a group left with no response is left out."""
    rows: list[tuple[int, RolloutGroup, int]] = []  # (group index in batch, group, response index)
    kept_groups: list[tuple[RolloutGroup, str, bool, bool]] = []  # (group, key, replayed, fresh)
    priorities: list[float] = []
    drawn = zip(sampled.groups, sampled.keys, sampled.success, sampled.fresh, sampled.priorities, strict=True)
    for group, key, replayed, fresh, priority in drawn:
        valid = [i for i in range(group.size) if not (drop_invalid_rewards and np.isnan(group.rewards[i]))]
        if not valid:
            continue
        rows += [(len(kept_groups), group, i) for i in valid]
        kept_groups.append((group, key, replayed, fresh))
        priorities.append(float(priority))
    width = max((len(g.prompt_token_ids) + len(g.response_token_ids[i]) for _, g, i in rows), default=1)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention, response, prompt = (torch.zeros(n, width, dtype=torch.long) for _ in range(3))
    behaviour = torch.zeros(n, width)
    has_base = bool(rows) and all(g.base_logprobs is not None for _, g, _ in rows)
    base = torch.zeros(n, width) if has_base else None
    for r, (_, group, i) in enumerate(rows):
        p, resp = len(group.prompt_token_ids), group.response_token_ids[i]
        end = p + len(resp)
        ids[r, :p] = torch.from_numpy(group.prompt_token_ids.astype(np.int64))
        ids[r, p:end] = torch.from_numpy(resp.astype(np.int64))
        attention[r, :end] = 1
        prompt[r, :p] = 1
        response[r, p:end] = 1
        behaviour[r, p:end] = torch.from_numpy(group.behaviour_logprobs[i].astype(np.float32))
        if base is not None and group.base_logprobs is not None:
            base[r, p:end] = torch.from_numpy(group.base_logprobs[i].astype(np.float32))
    return TrainBatch(
        input_ids_BT=ids,
        attention_mask_BT=attention,
        response_mask_BT=response,
        prompt_mask_BT=prompt,
        behaviour_logp_BT=behaviour,
        base_logp_BT=base,
        reward_B=torch.tensor([float(g.rewards[i]) for _, g, i in rows]),
        has_answer_B=torch.tensor([float(g.parsed_answers[i] is not None) for _, g, i in rows]),
        group_B=torch.tensor([gi for gi, _, _ in rows], dtype=torch.long),
        policy_lag_B=torch.tensor([current_version - g.policy_version for _, g, _ in rows], dtype=torch.long),
        replayed_B=torch.tensor([float(kept_groups[gi][2]) for gi, _, _ in rows]),
        prompt_ids=[g.prompt_id for g, _, _, _ in kept_groups],
        keys=[k for _, k, _, _ in kept_groups],
        replayed=[r for _, _, r, _ in kept_groups],
        fresh=[f for _, _, _, f in kept_groups],
        selections=[g.selection for g, _, _, _ in kept_groups],
        priorities=priorities,
        sample_names=[f"prompt {g.prompt_id} sample {i} (actor {g.actor_id}, v{g.policy_version})" for _, g, i in rows],
    )


def micro_batches(batch: TrainBatch, max_rows: int) -> list[TrainBatch]:
    """Consecutive whole groups, each chunk at most max_rows rows (a single larger group gets its own chunk)."""
    bounds: list[tuple[int, int]] = []
    start = 0
    group_ends = (torch.nonzero(torch.diff(batch.group_B, append=torch.tensor([-1]))).flatten() + 1).tolist()
    for end in group_ends:
        if bounds and end - bounds[-1][0] <= max_rows:
            bounds[-1] = (bounds[-1][0], end)
        else:
            bounds.append((start, end))
        start = end
    return [_rows(batch, a, b) for a, b in bounds]


def _rows(batch: TrainBatch, a: int, b: int) -> TrainBatch:
    groups = batch.group_B[a:b]
    first, last = int(groups.min()), int(groups.max())
    width = int(batch.attention_mask_BT[a:b].sum(-1).max())  # trim padding columns no row in the chunk uses

    def cut(t: Tensor) -> Tensor:
        return t[a:b, :width]

    return TrainBatch(
        input_ids_BT=cut(batch.input_ids_BT),
        attention_mask_BT=cut(batch.attention_mask_BT),
        response_mask_BT=cut(batch.response_mask_BT),
        prompt_mask_BT=cut(batch.prompt_mask_BT),
        behaviour_logp_BT=cut(batch.behaviour_logp_BT),
        base_logp_BT=cut(batch.base_logp_BT) if batch.base_logp_BT is not None else None,
        reward_B=batch.reward_B[a:b],
        has_answer_B=batch.has_answer_B[a:b],
        group_B=groups - first,
        policy_lag_B=batch.policy_lag_B[a:b],
        replayed_B=batch.replayed_B[a:b],
        prompt_ids=batch.prompt_ids[first : last + 1],
        keys=batch.keys[first : last + 1],
        replayed=batch.replayed[first : last + 1],
        fresh=batch.fresh[first : last + 1],
        selections=batch.selections[first : last + 1],
        priorities=batch.priorities[first : last + 1],
        sample_names=batch.sample_names[a:b],
    )
