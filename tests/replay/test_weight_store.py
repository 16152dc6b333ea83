"""replay/weight_store.py: weights through Ray's object store, bytes only (safetensors), newest versions kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from replay.weight_store import fetch, is_object_uri, ship, start_weight_store


def test_a_version_round_trips_and_old_ones_are_dropped(ray_local: Any, tmp_path: Path) -> None:
    import ray

    store = start_weight_store("test-weights", "paceflow-test", keep=2)
    try:
        embed = torch.randn(8, 4)
        state = {"embed.weight": embed, "lm_head.weight": embed, "norm.weight": torch.ones(4)}  # tied, as in LMs
        uris = [ship("test-weights", "paceflow-test", v, state) for v in (1, 2, 3)]
        assert all(is_object_uri(u) for u in uris) and not is_object_uri(str(tmp_path))
        local = fetch(uris[-1], "paceflow-test", tmp_path)
        loaded = load_file(str(local / "model.safetensors"))
        assert set(loaded) == {"embed.weight", "norm.weight"}  # the tied copy is stored once, as on disk
        assert torch.equal(loaded["embed.weight"], embed) and torch.equal(loaded["norm.weight"], torch.ones(4))
        assert local.parent == tmp_path and local.name == "v3"
        with pytest.raises(FileNotFoundError, match="no longer in the weight store"):
            fetch(uris[0], "paceflow-test", tmp_path)  # keep=2: version 1 was dropped
    finally:
        ray.kill(store)
