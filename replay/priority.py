"""The replay priority, one rule for both sides: the accuracy-estimate error of PACED-RL.

    e(x) = | N_correct(x) / G - a(x) |

over the group's valid (non-NaN) rewards, where a(x) is the learner's current accuracy estimate for the prompt.
Rollout actors compute it for the groups they insert, and the learner recomputes it after each step with its
new estimates. A prompt the learner has not estimated yet, or a group with no valid reward, gets 1.0 (the
largest possible error), so it is replayed first.
"""

from __future__ import annotations

import numpy as np

UNKNOWN = 1.0


def estimate_error(rewards: np.ndarray, estimate: float | None) -> float:
    """|mean valid reward - estimate|, or UNKNOWN when either side is missing."""
    valid = rewards[~np.isnan(rewards)]
    if estimate is None or len(valid) == 0:
        return UNKNOWN
    return abs(float(valid.mean()) - float(estimate))
