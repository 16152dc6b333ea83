"""The learner's batch: collated on the CPU, moved whole to the policy's device."""

from __future__ import annotations

from dataclasses import fields

import torch

from learner.batching import TrainBatch, collate
from replay.records import RolloutGroup, SampledBatch


def _batch() -> TrainBatch:
    groups = [
        RolloutGroup.new(
            prompt_id=f"p{i}",
            prompt_token_ids=[5, 6, 7][: i + 1],
            responses=[[8, 9], [10]],
            behaviour_logprobs=[[-1.0, -2.0], [-0.5]],
            rewards=[1.0, 0.0],
            policy_version=0,
            actor_id="test",
        )
        for i in range(2)
    ]
    return collate(SampledBatch.of_fresh(groups), pad_id=0, current_version=1, drop_invalid_rewards=True)


def test_to_moves_every_tensor_and_keeps_the_rest() -> None:
    """A GPU learner computes on the batch's tensors where the policy lives (checked on an H200 with the learner
    tests; here on the meta device, which every tensor op accepts and no CPU tensor is on)."""
    batch = _batch()
    moved = batch.to(torch.device("meta"))
    tensors = [f.name for f in fields(TrainBatch) if isinstance(getattr(batch, f.name), torch.Tensor)]
    assert {"input_ids_BT", "response_mask_BT", "reward_B", "group_B", "policy_lag_B"} <= set(tensors)
    for name in tensors:
        before, after = getattr(batch, name), getattr(moved, name)
        assert after.device.type == "meta", name
        assert (after.shape, after.dtype) == (before.shape, before.dtype), name
    others = [f.name for f in fields(TrainBatch) if f.name not in tensors]
    assert all(getattr(moved, n) == getattr(batch, n) for n in others)
    assert batch.input_ids_BT.device.type == "cpu"  # the original stays where it was
    assert batch.to(torch.device("cpu")) is batch  # already there: no copy
