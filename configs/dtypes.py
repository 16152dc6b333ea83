"""The config's dtype names and the torch dtypes they mean: one map for the learner, the engines and the scorers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' -> the torch dtype (torch is imported only when asked: configs load fast)."""
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype: {name!r} is not one of {sorted(dtypes)}")
    return dtypes[name]
