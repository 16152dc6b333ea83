"""learner/weights.py's shared-memory slots: each version copied in place into a preallocated safetensors file,
cast to the engine's dtype; a reader refuses a slot that was overwritten while it loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learner.weights import WeightSlots
from replay.weight_store import VersionReplaced, load_published


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    embed = torch.randn(16, 8, generator=gen)
    return {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied, as in SmolLM2: stored once
        "layer.weight": torch.randn(8, 8, generator=gen),
        "norm.weight": torch.rand(8, generator=gen),
    }


def test_versions_are_copied_into_reused_slots_in_the_engine_dtype(tmp_path: Path) -> None:
    slots = WeightSlots(tmp_path, dtype=torch.bfloat16, slots=2)
    paths = {v: slots.publish(_state(v), v) for v in (1, 2, 3)}
    assert paths[1] == paths[3] != paths[2]  # version 3 reused version 1's slot
    for version in (2, 3):
        loaded = load_file(str(paths[version] / "model.safetensors"))  # any safetensors reader: vLLM, HF
        expected = _state(version)
        assert set(loaded) == {"embed.weight", "layer.weight", "norm.weight"}
        for name, tensor in loaded.items():
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, expected[name].to(torch.bfloat16))
    size = (tmp_path / "slot0" / "model.safetensors").stat().st_size
    assert size < (16 * 8 + 8 * 8 + 8) * 2 + 1024  # bf16, the tied matrix once


def test_a_reader_refuses_a_slot_that_moved_on(tmp_path: Path) -> None:
    slots = WeightSlots(tmp_path, dtype=torch.float32, slots=2)
    slot = slots.publish(_state(1), 1)
    loaded: list[dict[str, torch.Tensor]] = []
    load_published(str(slot), "unused", lambda d: loaded.append(load_file(str(d / "model.safetensors"))), version=1)
    assert torch.equal(loaded[0]["layer.weight"], _state(1)["layer.weight"])

    slots.publish(_state(2), 2)
    slots.publish(_state(3), 3)  # the slot now holds version 3: version 1 is gone before the load starts
    with pytest.raises(VersionReplaced, match="holds version 3, not 1"):
        load_published(str(slot), "unused", lambda d: None, version=1)

    def overwritten_while_loading(directory: Path) -> None:  # the learner reuses the slot mid-load
        load_file(str(directory / "model.safetensors"))
        slots.publish(_state(5), 5)

    with pytest.raises(VersionReplaced, match="holds version 5, not 3"):
        load_published(str(slot), "unused", overwritten_while_loading, version=3)
