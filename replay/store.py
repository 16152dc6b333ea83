"""The replay store interface and the rules both backends share.

A store holds rollout groups keyed by their group id, each with a priority (PACED-RL: the accuracy-estimate
error e(x) = |N_correct/G - a(x)|). Semantics, identical for `MemoryStore` and `RedisStore` (one contract test
suite runs against both):

- `add(groups, priorities)`: idempotent by group id (a writer that retries after a lost reply never
  duplicates). With `successful_only`, only responses with reward 1 are kept (a group with none is dropped);
  with `insert_top_k`, only the k highest-priority groups of the call enter. Per-prompt accuracy statistics are
  counted from every group offered, before those filters. Over `capacity`, the lowest-priority or the oldest
  groups are evicted, as configured.
- `sample(n)`: first up to round(fresh_fraction * n) *fresh* groups (never sampled yet, newest first), the rest
  drawn with replacement with probability proportional to max(priority, 1e-6) ** priority_exponent. Each draw
  reports its probability and importance weight (N * P)^-1 normalised to a batch maximum of 1. Groups older than
  `max_policy_lag` weight versions are evicted first. A payload that fails to decode is counted, moved to
  quarantine and skipped; it never reaches the learner and never crashes the reader.
- `set_policy_version(v)` records the learner's newest weight version (and evicts stale groups);
  `announce_weights(w)` does the same and tells rollout actors where the weights are (`latest_weights()`).
- `put_acc_estimates` / `prompt_stats`: the learner's a(x) and the empirical accuracy, per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from configs.schema import ReplayConfig
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
    filtered: int
    sampled: int
    evicted_capacity: int
    evicted_stale: int
    corrupt: int


STAT_FIELDS = ("inserted", "duplicates", "filtered", "sampled", "evicted_capacity", "evicted_stale", "corrupt")


class ReplayStore(Protocol):
    def add(self, groups: Sequence[RolloutGroup], priorities: Sequence[float]) -> list[str]:
        """Insert groups; returns the keys that entered the store."""
        ...

    def sample(self, num_groups: int, *, seed: int | None = None) -> SampledBatch: ...

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

    def __len__(self) -> int: ...

    def close(self) -> None: ...


def sampling_weight(priorities: np.ndarray | float, exponent: float) -> np.ndarray:
    return np.power(np.maximum(np.asarray(priorities, dtype=np.float64), MIN_PRIORITY), exponent)


def prepare_inserts(
    groups: Sequence[RolloutGroup], priorities: Sequence[float], cfg: ReplayConfig
) -> tuple[list[tuple[RolloutGroup, float]], int]:
    """Apply `successful_only` and `insert_top_k`. Returns (groups that enter with their priorities, filtered)."""
    check_add_arguments(len(groups), priorities)
    kept: list[tuple[RolloutGroup, float]] = []
    for group, priority in zip(groups, priorities, strict=True):
        if cfg.successful_only:
            winners = [i for i, r in enumerate(group.rewards.tolist()) if r == 1.0]
            if not winners:
                continue
            group = group.select(winners) if len(winners) < group.size else group
        kept.append((group, float(priority)))
    if cfg.insert_top_k is not None and len(kept) > cfg.insert_top_k:
        kept = sorted(kept, key=lambda gp: -gp[1])[: cfg.insert_top_k]
    return kept, len(groups) - len(kept)


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


def decode_draw(
    picked: Sequence[tuple[str, bytes | None, float]],
    probabilities: Sequence[float],
    times_sampled: Sequence[int],
    num_fresh: int,
    size: int,
    quarantine: Callable[[str], None],
) -> SampledBatch:
    """Turn drawn payloads into a batch: the first `num_fresh` rows are fresh; a payload that fails to decode
    is handed to `quarantine` and skipped; a payload that vanished (None: evicted meanwhile) is skipped."""
    batch = SampledBatch([], [], [], [], [], [], [])
    kept: list[float] = []
    for i, (key, payload, priority) in enumerate(picked):
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
        kept.append(probabilities[i])
        batch.fresh.append(i < num_fresh)
        batch.times_sampled.append(times_sampled[i])
    batch.probabilities = kept
    batch.is_weights = importance_weights(kept, size)
    return batch


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
