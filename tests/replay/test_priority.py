"""The one priority rule: e(x) = |N_correct/G - a(x)| over valid rewards, 1.0 when either side is unknown."""

from __future__ import annotations

import math

import numpy as np
import pytest

from replay.priority import UNKNOWN, estimate_error


@pytest.mark.parametrize(
    ("rewards", "estimate", "expected"),
    [
        ([1, 1, 1, 1, 1, 1, 1, 1], 1.0, 0.0),
        ([0, 0, 0, 0, 0, 0, 0, 0], 0.25, 0.25),
        ([1, 0, 1, 0, 1, 0, 1, 0], 0.5, 0.0),
        ([1, math.nan, 0, 0], 0.0, 1 / 3),  # the invalid reward is left out
        ([1, 0], None, UNKNOWN),  # no estimate yet: replay first
        ([math.nan, math.nan], 0.4, UNKNOWN),  # no valid reward
    ],
)
def test_estimate_error(rewards: list[float], estimate: float | None, expected: float) -> None:
    assert estimate_error(np.array(rewards, dtype=np.float32), estimate) == pytest.approx(expected)
