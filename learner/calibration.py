"""How well the accuracy estimate a(x) predicts what the policy then does on x: PACED-RL's calibration metrics.

Each learner step compares, for the fresh whole groups of its batch, the estimate the scheduler saw when it
picked the prompt (Z_phi before this step's update, so the group is out of sample) with the group's empirical
accuracy N_correct/G. A constant estimate, the mean accuracy of the fresh groups of the last few steps (the
learner's CONSTANT_WINDOW_STEPS), is the baseline that a per-prompt estimator has to beat: it knows how good the
policy is now, but nothing about the prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GroupOutcome:
    """One fresh group: its prompt, the estimate it was chosen with, and what the policy did."""

    prompt_id: str
    estimate: float
    accuracy: float
    samples: int
    selection: str


def calibration_metrics(outcomes: Sequence[GroupOutcome], constant: float | None) -> dict[str, float]:
    """Mean |a(x) - accuracy| (`calib_mae`), its Pearson correlation (`calib_corr`, NaN when either side is
    constant or there are fewer than two groups), and the mean error of the constant estimate
    (`calib_mae_const`, NaN while there is no history)."""
    if not outcomes:
        return {}
    estimates = [o.estimate for o in outcomes]
    accuracies = [o.accuracy for o in outcomes]
    return {
        "calib_mae": sum(abs(e - a) for e, a in zip(estimates, accuracies, strict=True)) / len(outcomes),
        "calib_corr": pearson(estimates, accuracies),
        "calib_mae_const": (
            sum(abs(constant - a) for a in accuracies) / len(outcomes) if constant is not None else math.nan
        ),
    }


def informative_counts(outcomes: Sequence[GroupOutcome]) -> dict[str, float]:
    """Per selection rule: groups, and groups with 0 < accuracy < 1 (the only ones whose responses differ in
    reward, so the only ones that carry signal). `explore` picks are uniform draws, so their share estimates
    what uniform selection would give."""
    out: dict[str, float] = {}
    for o in outcomes:
        out[f"groups_{o.selection}"] = out.get(f"groups_{o.selection}", 0) + 1
        informative = 0.0 < o.accuracy < 1.0
        out[f"informative_{o.selection}"] = out.get(f"informative_{o.selection}", 0) + int(informative)
    return out


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)
