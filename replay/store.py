"""The replay store interface and the rules both backends share.

A store holds rollout groups keyed by their group id, each with a priority (PACED-RL: the accuracy-estimate
error e(x) = |N_correct/G - a(x)|). Semantics, identical for `MemoryStore` and `RedisStore` (one contract test
suite runs against both):

- `add(groups, priorities=None)`: every group enters the main table whole, correct and incorrect responses alike
  (the learner's fresh batches come from there); idempotent by group id (a writer that retries after a lost
  reply never duplicates). Per-prompt accuracy statistics are counted from every group. Over `capacity`, the
  lowest-priority or the oldest groups are evicted, as configured. With a `success_buffer`, the successful
  responses of the groups are also offered to that second table: each reward-1 response on its own (id
  `<group id>/<index>`), the `insert_top_k` of the groups with the largest priority, in a table of `capacity`
  trajectories.
- `sample(n, num_success=k)`: from the main table, first up to round(fresh_fraction * n) *fresh* groups (never
  sampled yet, oldest or newest first by `fresh_order`), the rest drawn with replacement with probability
  proportional to max(priority, 1e-6) ** priority_exponent; then k single responses from the success buffer,
  drawn the same way (marked `success` in the batch). Each draw reports its probability and importance weight (N * P)^-1
  normalised to a batch maximum of 1. Groups older than `max_policy_lag` weight versions are evicted first, in
  both tables. A payload that fails to decode is counted, moved to quarantine and skipped; it never reaches the
  learner and never crashes the reader.
- `set_policy_version(v)` records the learner's newest weight version (and evicts stale groups);
  `announce_weights(w)` does the same and tells rollout actors where the weights are (`latest_weights()`).
- `put_acc_estimates` / `prompt_stats`: the learner's a(x) and the empirical accuracy, per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from configs.schema import ReplayConfig
from replay.priority import estimate_error
from replay.records import PromptStats, RecordError, RolloutGroup, SampledBatch, WeightVersion, decode_group

MIN_PRIORITY = 1e-6
"""Priorities are floored here before the exponent, so a perfectly estimated prompt can still be replayed."""


@dataclass(frozen=True)
class ReplayStats:
    """Counters since the store was created; `sampled` counts draws (a corrupt draw counts, then `corrupt`)."""

    size: int
    fresh: int
    policy_version: int
    inserted: int
    duplicates: int
    sampled: int
    evicted_capacity: int
    evicted_stale: int
    corrupt: int
    evicted_unsampled: int = 0
    """Of the evicted groups, those no batch had drawn: generated and never trained on (the rate limiter's
    measure, rollout.max_ahead_batches)."""
    evicted_late: int = 0
    """Of the stale-evicted groups no batch drew, those that arrived already on their last valid version (made
    max_policy_lag versions ago: generated in as many learner steps), so that only the learner's very next draw
    could take them; no rate limit could have helped."""
    stale_on_arrival: int = 0
    """Groups refused at insertion because their weights were already more than max_policy_lag versions behind
    the learner's (an actor that generates slower than the learner steps): counted here, never in `inserted`."""
    success_size: int = 0
    """Trajectories in the success buffer (0 without one)."""
    success_inserted: int = 0

    @property
    def drawn_fraction(self) -> float:
        """Of the inserted groups whose fate is settled (drawn by a batch, or evicted before any batch drew them;
        fresh ones still wait), the share that was drawn: 1 - this is rollout work the replay let go stale. Groups
        that came too late for any batch are not in it (`stale_on_arrival`, `evicted_late`): no rate limit could
        have saved them; they measure generation that is slow against the learner and max_policy_lag."""
        settled = self.inserted - self.fresh - self.evicted_late
        return 1.0 if settled <= 0 else (settled - (self.evicted_unsampled - self.evicted_late)) / settled


STAT_FIELDS = (
    "inserted",
    "duplicates",
    "sampled",
    "evicted_capacity",
    "evicted_stale",
    "corrupt",
    "evicted_unsampled",
    "evicted_late",
    "stale_on_arrival",
)


class ReplayStore(Protocol):
    def add(self, groups: Sequence[RolloutGroup], priorities: Sequence[float] | None = None) -> list[str]:
        """Insert groups; returns the keys that entered the store. Without `priorities`, each group's is PACED-RL's
        e(x) against the estimate the store holds for its prompt (`initial_priorities`)."""
        ...

    def sample(self, num_groups: int, *, num_success: int = 0, seed: int | None = None) -> SampledBatch: ...

    def update_priorities(self, keys: Sequence[str], priorities: Sequence[float]) -> None: ...

    def set_policy_version(self, version: int) -> None: ...

    def policy_version(self) -> int: ...

    def put_acc_estimates(self, estimates: Mapping[str, float]) -> None: ...

    def announce_weights(self, weights: WeightVersion) -> None:
        """Make a published weight version the one actors load (and the store's policy version)."""
        ...

    def latest_weights(self) -> WeightVersion | None: ...

    def prompt_stats(self, prompt_ids: Sequence[str]) -> list[PromptStats]: ...

    def stats(self) -> ReplayStats: ...

    def claim(self, identity: Mapping[str, str]) -> None:
        """Mark the store as the run's, or raise ValueError naming each field where the run that claimed it first
        differs (two runs sharing a replay would train on each other's groups); the same identity may claim again."""
        ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


def initial_priorities(groups: Sequence[RolloutGroup], estimates: Sequence[float | None]) -> list[float]:
    """A new group's priority: e(x) = |N_correct/G - a(x)| against the learner's latest a(x) for its prompt
    (replay/priority.py), computed where the estimates are, so a writer needs no extra round trip."""
    return [estimate_error(g.rewards, e) for g, e in zip(groups, estimates, strict=True)]


def sampling_weight(priorities: np.ndarray | float, exponent: float) -> np.ndarray:
    return np.power(np.maximum(np.asarray(priorities, dtype=np.float64), MIN_PRIORITY), exponent)


def success_inserts(
    groups: Sequence[RolloutGroup], priorities: Sequence[float], top_k: int
) -> list[tuple[RolloutGroup, float]]:
    """PACED-RL's insert rule: every reward-1 response as its own one-response group (id `<group>/<index>`,
    keeping its group's priority e(x)), the `top_k` of those whose groups have the largest e(x)."""
    ranked = sorted(zip(groups, priorities, strict=True), key=lambda gp: -gp[1])  # stable: ties keep their order
    out: list[tuple[RolloutGroup, float]] = []
    for group, priority in ranked:
        for i, reward in enumerate(group.rewards.tolist()):
            if len(out) == top_k:
                return out
            if reward == 1.0:
                out.append((group.select([i], group_id=f"{group.group_id}/{i}"), float(priority)))
    return out


def success_table_config(cfg: ReplayConfig) -> ReplayConfig:
    """The success buffer's own table settings: the main table's backend and staleness bound, the buffer's
    capacity, eviction and exponent, and no fresh-first rule (its draws are all by priority)."""
    buffer = cfg.success_buffer
    if buffer is None:
        raise ValueError("replay.success_buffer is not configured")
    return cfg.model_copy(
        update={
            "capacity": buffer.capacity,
            "eviction": buffer.eviction,
            "priority_exponent": buffer.priority_exponent,
            "fresh_fraction": 0.0,
            "success_buffer": None,
        }
    )


def check_add_arguments(num_groups: int, priorities: Sequence[float]) -> None:
    if num_groups != len(priorities):
        raise ValueError(f"add: {num_groups} groups but {len(priorities)} priorities")
    bad = [p for p in priorities if not np.isfinite(p) or p < 0]
    if bad:
        raise ValueError(f"add: priorities must be finite and >= 0, got {bad[0]}")


def importance_weights(probabilities: Sequence[float], size: int) -> list[float]:
    """(N * P)^-1 normalised to max 1 over the batch; fresh draws (P = 1) count as weight 1."""
    raw = [1.0 if p >= 1.0 else 1.0 / max(size * p, 1e-12) for p in probabilities]
    top = max((w for w, p in zip(raw, probabilities, strict=True) if p < 1.0), default=1.0)
    return [w / top if p < 1.0 else 1.0 for w, p in zip(raw, probabilities, strict=True)]


def split_batch(num_groups: int, fresh_fraction: float) -> tuple[int, int]:
    """(fresh, prioritised) counts for a batch of num_groups."""
    if num_groups < 1:
        raise ValueError(f"sample: num_groups must be >= 1, got {num_groups}")
    fresh = round(fresh_fraction * num_groups)
    return fresh, num_groups - fresh


@dataclass(frozen=True)
class Draw:
    """Rows picked from one table, still encoded: what a backend hands to `decode_draw`, and what the Ray-hosted
    store ships to another process (`to_wire`: a dict of plain lists, bytes, strings and numbers)."""

    keys: list[str]
    payloads: list[bytes | None]
    """None: the group was evicted between the pick and the read."""
    priorities: list[float]
    probabilities: list[float]
    """1.0 for fresh rows; the sampling probability for prioritised rows."""
    times_sampled: list[int]
    num_fresh: int
    """The first `num_fresh` rows are fresh (never sampled before this draw)."""
    size: int
    """Rows in the table when it was drawn from."""

    @staticmethod
    def empty() -> Draw:
        return Draw([], [], [], [], [], 0, 0)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_wire(raw: dict[str, Any]) -> Draw:
        return Draw(
            keys=[str(k) for k in raw["keys"]],
            payloads=[p if p is None else bytes(p) for p in raw["payloads"]],
            priorities=[float(p) for p in raw["priorities"]],
            probabilities=[float(p) for p in raw["probabilities"]],
            times_sampled=[int(t) for t in raw["times_sampled"]],
            num_fresh=int(raw["num_fresh"]),
            size=int(raw["size"]),
        )


def decode_draw(draw: Draw, quarantine: Callable[[str], None]) -> SampledBatch:
    """Turn drawn payloads into a batch: the first `num_fresh` rows are fresh; a payload that fails to decode
    is handed to `quarantine` and skipped; a payload that vanished (None: evicted meanwhile) is skipped."""
    batch = SampledBatch([], [], [], [], [], [], [])
    kept: list[float] = []
    for i, (key, payload, priority) in enumerate(zip(draw.keys, draw.payloads, draw.priorities, strict=True)):
        if payload is None:
            continue
        try:
            group = decode_group(payload)
        except RecordError:
            quarantine(key)
            batch.skipped_corrupt += 1
            continue
        batch.groups.append(group)
        batch.keys.append(key)
        batch.priorities.append(priority)
        kept.append(draw.probabilities[i])
        batch.fresh.append(i < draw.num_fresh)
        batch.times_sampled.append(draw.times_sampled[i])
    batch.probabilities = kept
    batch.is_weights = importance_weights(kept, draw.size)
    batch.success = [False] * len(batch.groups)
    return batch


def check_identity_fields(identity: Mapping[str, str]) -> list[str]:
    """A run identity as flat field, value pairs (what `RedisStore.claim` stores); an empty one claims nothing."""
    if not identity:
        raise ValueError("claim: the identity needs at least one field")
    bad = [k for k, v in identity.items() if not isinstance(k, str) or not k or not isinstance(v, str)]
    if bad:
        raise ValueError(f"claim: identity fields and values must be strings, got {bad[0]!r}: {identity[bad[0]]!r}")
    return [item for pair in identity.items() for item in pair]


def check_identity(stored: Mapping[str, str], identity: Mapping[str, str], *, owner: str, remedy: str) -> None:
    """Raise ValueError when `stored`, the identity of the run that claimed `owner` first, is not `identity`."""
    differ = sorted(k for k in {*stored, *identity} if stored.get(k) != identity.get(k))
    if differ:
        values = "; ".join(
            f"{k} is {stored.get(k, '(unset)')!r} there, {identity.get(k, '(unset)')!r} here" for k in differ
        )
        raise ValueError(f"{owner} is claimed by another run ({values}); {remedy}")


def build_store(cfg: ReplayConfig, *, run_name: str = "run") -> ReplayStore:
    """The configured backend. Redis keys are prefixed with replay.key_prefix and the run name."""
    if cfg.kind == "redis":
        from replay.redis_store import RedisStore

        return RedisStore(cfg, run_name=run_name)
    from replay.memory_store import MemoryStore

    return MemoryStore(cfg)


def connect_store(cfg: ReplayConfig, *, run_name: str, server: object | None = None) -> ReplayStore:
    """The store as seen from any process of a run: Redis by config, or the run's `ReplayServer` actor."""
    if cfg.kind == "redis":
        return build_store(cfg, run_name=run_name)
    if server is None:
        raise ValueError("replay.kind='memory' shared between processes needs the run's ReplayServer actor handle")
    from replay.remote import RemoteStore

    return RemoteStore(server)
