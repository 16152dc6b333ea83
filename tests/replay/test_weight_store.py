"""replay/weight_store.py: weights through Ray's object store, bytes only (safetensors), newest versions kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from replay.weight_store import is_object_uri, load_published, ship, start_weight_store


def test_a_version_round_trips_and_old_ones_are_dropped(ray_local: Any, tmp_path: Path) -> None:
    import ray

    store = start_weight_store("test-weights", "paceflow-test", keep=2)
    try:
        embed = torch.randn(8, 4)
        state = {"embed.weight": embed, "lm_head.weight": embed, "norm.weight": torch.ones(4)}  # tied, as in LMs
        uris = [ship("test-weights", "paceflow-test", v, state) for v in (1, 2, 3)]
        assert all(is_object_uri(u) for u in uris) and not is_object_uri(str(tmp_path))
        seen: dict[str, Any] = {}

        def load(directory: Path) -> None:  # what an engine does: read the files while they exist
            seen["dir"], seen["state"] = directory, load_file(str(directory / "model.safetensors"))

        load_published(uris[-1], "paceflow-test", load, version=3)
        loaded = seen["state"]
        assert set(loaded) == {"embed.weight", "norm.weight"}  # the tied copy is stored once, as on disk
        assert torch.equal(loaded["embed.weight"], embed) and torch.equal(loaded["norm.weight"], torch.ones(4))
        assert not seen["dir"].exists()  # removed once loaded: nothing accumulates on the node
        with pytest.raises(FileNotFoundError, match="no longer in the weight store"):
            load_published(uris[0], "paceflow-test", load, version=1)  # keep=2: version 1 was dropped
        save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
        load_published(str(tmp_path), "paceflow-test", load, version=7)  # a published directory is handed over as is
        assert seen["dir"] == tmp_path and set(seen["state"]) == {"x"}
    finally:
        ray.kill(store)
