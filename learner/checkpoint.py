"""Checkpoint files without pickle: nested state (optimizer states, module states, counters, RNG) as one
safetensors file for the tensors plus one JSON file for the structure and the plain values.

DeepSpeed's own `save_checkpoint` writes torch pickles and reads them back with `weights_only=False`, which
would unpickle whatever a checkpoint directory contains; paceflow never loads those. Writes go to a temporary
name and are renamed into place, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


@contextmanager
def io_errors_as_os_errors() -> Iterator[None]:
    """safetensors reports a failed write (a full disk) as its own SafetensorError; re-raise it as the OSError it
    is, so callers handle every I/O failure of a checkpoint with one `except OSError`."""
    try:
        yield
    except SafetensorError as exc:
        if "I/O error" not in str(exc) and "os error" not in str(exc):
            raise
        code = re.search(r"os error (\d+)", str(exc))
        raise OSError(int(code.group(1)) if code else errno.EIO, str(exc)) from exc


def save_state(path: Path, state: Any) -> None:
    """Write `state` (dicts, lists, tuples, tensors, numbers, strings, None) as path.json + path.safetensors."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {"__dict__": [[k, encode(v, f"{key}.{k}")] for k, v in value.items()]}
        if isinstance(value, list | tuple):
            return {
                "__list__": [encode(v, f"{key}.{i}") for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple),
            }
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot checkpoint a {type(value).__name__} at {key!r}")

    structure = encode(state, "state")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_json, tmp_st = path.with_suffix(".json.tmp"), path.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp_st))
    tmp_json.write_text(json.dumps(structure))
    os.replace(tmp_st, path.with_suffix(".safetensors"))
    os.replace(tmp_json, path.with_suffix(".json"))


def load_state(path: Path) -> Any:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    structure = json.loads(path.with_suffix(".json").read_text())

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            if "__tensor__" in value:
                return tensors[value["__tensor__"]]
            if "__dict__" in value:
                return {k: decode(v) for k, v in value["__dict__"]}
            if "__list__" in value:
                items = [decode(v) for v in value["__list__"]]
                return tuple(items) if value.get("tuple") else items
        return value

    return decode(structure)
