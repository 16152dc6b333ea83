"""In-process replay store: the embedded default on one machine (wrapped in a Ray actor when actors and learner
are separate processes). Payloads are kept encoded, exactly as Redis keeps them, so both backends decode,
validate and quarantine the same way. Index columns live in numpy arrays with swap-remove, so eviction and
staleness are vectorised; each row's sampling weight priority^a is kept beside its priority (a draw is one
cumulative sum and a binary search, not a power over the table), and the never-sampled keys are an
insertion-ordered set, so fresh draws and `stats().fresh` do not scan the table.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from configs.schema import MemoryReplayConfig, ReplayConfig
from replay.records import (
    PromptStats,
    RolloutGroup,
    SampledBatch,
    WeightVersion,
    decode_weight_version,
    encode_group,
    encode_weight_version,
)
from replay.store import (
    STAT_FIELDS,
    Draw,
    ReplayStats,
    check_add_arguments,
    check_identity,
    check_identity_fields,
    decode_draw,
    initial_priorities,
    sampling_weight,
    split_batch,
    success_inserts,
    success_table_config,
)

_DEDUPE_WINDOW = 1_000_000  # group ids remembered for idempotent retries


class MemoryStore:
    def __init__(self, cfg: ReplayConfig | None = None) -> None:
        self.cfg = cfg or MemoryReplayConfig()
        self._lock = threading.Lock()  # a Ray actor may serve writers and the learner concurrently
        self._payloads: dict[str, bytes] = {}
        self._keys: list[str] = []
        self._row: dict[str, int] = {}
        cap = 1024
        self._priority = np.zeros(cap)
        self._version = np.zeros(cap, dtype=np.int64)
        self._seq = np.zeros(cap, dtype=np.int64)
        self._times_sampled = np.zeros(cap, dtype=np.int64)
        self._weight = np.zeros(cap)  # sampling_weight(priority): kept per row, so a draw never recomputes it
        self._fresh: dict[str, None] = {}  # never-sampled keys, oldest first (insertion order = seq order)
        self._at_bound: set[str] = set()  # keys that arrived on their last valid version (see _evict_stale)
        self._next_seq = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._version_now = 0
        self._counts = dict.fromkeys(STAT_FIELDS, 0)
        self._prompt_correct: dict[str, float] = {}
        self._prompt_total: dict[str, int] = {}
        self._prompt_estimate: dict[str, float] = {}
        self.quarantine: list[bytes] = []
        self._weights: bytes | None = None  # kept encoded, like every record
        self._identity: dict[str, str] | None = None  # the run that claimed the store (`claim`)
        # PACED-RL's success buffer: the same kind of table, with its own settings (replay/store.py).
        self.success = MemoryStore(success_table_config(self.cfg)) if self.cfg.success_buffer is not None else None

    # ----------------------------------------------------------------------------------------- writing
    def add(
        self,
        groups: Sequence[RolloutGroup],
        priorities: Sequence[float] | None = None,
        *,
        payloads: Sequence[bytes] | None = None,
    ) -> list[str]:
        """`payloads`: the groups' encodings when the caller already has them (the Ray-hosted store receives
        bytes and decodes them only to validate): stored as they are, never encoded twice."""
        if priorities is None:
            with self._lock:
                known = [self._prompt_estimate.get(g.prompt_id) for g in groups]
            priorities = initial_priorities(groups, known)
        check_add_arguments(len(groups), priorities)
        encoded = list(payloads) if payloads is not None else [None] * len(groups)
        keys = self._add_rows(list(zip(groups, priorities, encoded, strict=True)), count_prompts=True)
        if self.success is not None and self.cfg.success_buffer is not None:
            inserts = success_inserts(groups, priorities, self.cfg.success_buffer.insert_top_k)
            self.success._add_rows([(group, priority, None) for group, priority in inserts])
        return keys

    def _add_rows(
        self, rows: Sequence[tuple[RolloutGroup, float, bytes | None]], *, count_prompts: bool = False
    ) -> list[str]:
        """Insert groups not seen before, then evict over capacity; returns the keys inserted and still present.
        With `count_prompts`, every group not seen before (stale or not) counts into its prompt's statistics."""
        with self._lock:
            keys = []
            for group, priority, payload in rows:
                if group.group_id in self._seen:
                    self._counts["duplicates"] += 1  # a retry: its prompt was counted the first time
                    continue
                self._remember(group.group_id)
                if count_prompts:
                    pid = group.prompt_id
                    self._prompt_correct[pid] = self._prompt_correct.get(pid, 0.0) + group.num_correct
                    self._prompt_total[pid] = self._prompt_total.get(pid, 0) + group.size
                lag = self._version_now - group.policy_version
                if lag > self.cfg.max_policy_lag:
                    self._counts["stale_on_arrival"] += 1  # made by weights the learner has left behind
                    continue
                if lag == self.cfg.max_policy_lag:
                    self._at_bound.add(group.group_id)
                payload = payload if payload is not None else encode_group(group)
                self._insert(group.group_id, payload, float(priority), group.policy_version)
                keys.append(group.group_id)
            self._counts["inserted"] += len(keys)
            self._evict_over_capacity()
            return [k for k in keys if k in self._row]

    def add_encoded(self, key: str, payload: bytes, priority: float, policy_version: int) -> None:
        """Insert an already-encoded payload as is (used to prove that corrupt payloads are quarantined)."""
        with self._lock:
            self._insert(key, payload, priority, policy_version)

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        if len(self._seen) > _DEDUPE_WINDOW:
            self._seen.popitem(last=False)

    def _insert(self, key: str, payload: bytes, priority: float, version: int) -> None:
        if key in self._row:
            return
        n = len(self._keys)
        if n == len(self._priority):
            for name in ("_priority", "_version", "_seq", "_times_sampled", "_weight"):
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.zeros_like(old)]))
        self._keys.append(key)
        self._row[key] = n
        self._payloads[key] = payload
        self._priority[n] = priority
        self._version[n] = version
        self._seq[n] = self._next_seq
        self._times_sampled[n] = 0
        self._weight[n] = sampling_weight(priority, self.cfg.priority_exponent)
        self._fresh[key] = None
        self._next_seq += 1

    def _remove_rows(self, rows: Sequence[int]) -> None:
        for row in sorted(set(rows), reverse=True):  # highest first, so swaps never move a row still to remove
            key, last = self._keys[row], len(self._keys) - 1
            if row != last:
                moved = self._keys[last]
                self._keys[row] = moved
                self._row[moved] = row
                for arr in (self._priority, self._version, self._seq, self._times_sampled, self._weight):
                    arr[row] = arr[last]
            self._keys.pop()
            del self._row[key]
            del self._payloads[key]
            self._fresh.pop(key, None)
            self._at_bound.discard(key)

    def _evict_over_capacity(self) -> None:
        excess = len(self._keys) - self.cfg.capacity
        if excess <= 0:
            return
        n = len(self._keys)
        column = self._priority[:n] if self.cfg.eviction == "lowest_priority" else self._seq[:n]
        # Ties in priority go to the oldest: sort by (column, seq).
        order = np.lexsort((self._seq[:n], column))
        self._count_unsampled(order[:excess])
        self._remove_rows(order[:excess].tolist())
        self._counts["evicted_capacity"] += excess

    def _evict_stale(self) -> None:
        n = len(self._keys)
        stale = np.nonzero(self._version_now - self._version[:n] > self.cfg.max_policy_lag)[0]
        if len(stale):
            self._count_unsampled(stale)
            late = [r for r in stale.tolist() if self._times_sampled[r] == 0 and self._keys[r] in self._at_bound]
            self._counts["evicted_late"] += len(late)
            self._remove_rows(stale.tolist())
            self._counts["evicted_stale"] += len(stale)

    def _count_unsampled(self, rows: np.ndarray) -> None:
        self._counts["evicted_unsampled"] += int((self._times_sampled[rows] == 0).sum())

    def update_priorities(self, keys: Sequence[str], priorities: Sequence[float]) -> None:
        with self._lock:
            for key, priority in zip(keys, priorities, strict=True):
                row = self._row.get(key)
                if row is not None:  # evicted since it was sampled: nothing to update
                    self._priority[row] = priority
                    self._weight[row] = sampling_weight(priority, self.cfg.priority_exponent)

    def set_policy_version(self, version: int) -> None:
        with self._lock:
            self._version_now = version
            self._evict_stale()
        if self.success is not None:
            self.success.set_policy_version(version)

    def policy_version(self) -> int:
        return self._version_now

    def announce_weights(self, weights: WeightVersion) -> None:
        encoded = encode_weight_version(weights)
        with self._lock:
            self._weights = encoded
        self.set_policy_version(weights.version)

    def latest_weights(self) -> WeightVersion | None:
        with self._lock:
            encoded = self._weights
        return decode_weight_version(encoded) if encoded is not None else None

    def put_acc_estimates(self, estimates: Mapping[str, float]) -> None:
        with self._lock:
            self._prompt_estimate.update({k: float(v) for k, v in estimates.items()})

    # ----------------------------------------------------------------------------------------- reading
    def sample(self, num_groups: int, *, num_success: int = 0, seed: int | None = None) -> SampledBatch:
        main, *replayed = self.draws(num_groups, num_success=num_success, seed=seed)
        batch = decode_draw(main, quarantine=self.quarantine_key)
        if replayed and self.success is not None:
            batch = batch.extended(decode_draw(replayed[0], quarantine=self.success.quarantine_key))
        return batch

    def draws(self, num_groups: int, *, num_success: int = 0, seed: int | None = None) -> list[Draw]:
        """The main table's draw, then the success buffer's when asked for (seeded one apart), still encoded:
        `sample` decodes them here, `ReplayServer` ships them to another process."""
        out = [self.draw(num_groups, seed=seed)]
        if num_success and self.success is not None:
            out.append(self.success.draw(num_success, seed=None if seed is None else seed + 1))
        return out

    def draw(self, num_groups: int, *, seed: int | None = None) -> Draw:
        """Pick a batch without decoding it. `sample` decodes; `ReplayServer` ships the bytes to another process."""
        n_fresh, n_prio = split_batch(num_groups, self.cfg.fresh_fraction)
        rng = np.random.default_rng(seed)
        with self._lock:
            self._evict_stale()
            n = len(self._keys)
            if n == 0:
                return Draw.empty()
            # Last chance first: fresh groups the next weight version would evict as stale are drawn now, even
            # beyond the batch's fresh share, rather than generated for nothing.
            # Vectorised over the rows (fresh = never sampled), oldest first, as the fresh queue orders them.
            oldest_kept = self._version_now - self.cfg.max_policy_lag
            at_risk = np.nonzero((self._times_sampled[:n] == 0) & (self._version[:n] <= oldest_kept))[0]
            at_risk = at_risk[np.argsort(self._seq[at_risk], kind="stable")]
            last = [self._keys[r] for r in at_risk[: n_fresh + n_prio].tolist()]
            n_prio -= max(0, len(last) - n_fresh)
            n_fresh = max(n_fresh, len(last))
            in_order = iter(self._fresh) if self.cfg.fresh_order == "oldest" else reversed(self._fresh)
            chosen = set(last)
            rest = (k for k in in_order if k not in chosen)
            fresh_rows = [self._row[k] for k in [*last, *itertools.islice(rest, n_fresh - len(last))]]
            n_prio += n_fresh - len(fresh_rows)  # not enough fresh groups: draw the rest by priority
            prio_rows: list[int] = []
            probabilities = [1.0] * len(fresh_rows)
            if n_prio:
                cumulative = np.cumsum(self._weight[:n])
                total = cumulative[-1]
                picks = np.searchsorted(cumulative, rng.random(n_prio) * total, side="right")
                prio_rows = np.minimum(picks, n - 1).tolist()
                probabilities += (self._weight[prio_rows] / total).tolist()
            rows = fresh_rows + prio_rows
            keys = [self._keys[r] for r in rows]
            for r, k in zip(rows, keys, strict=True):
                self._times_sampled[r] += 1
                self._fresh.pop(k, None)
            self._counts["sampled"] += len(rows)
            return Draw(
                keys=keys,
                payloads=[self._payloads[k] for k in keys],
                priorities=[float(self._priority[r]) for r in rows],
                probabilities=probabilities,
                times_sampled=[int(self._times_sampled[r]) for r in rows],
                num_fresh=len(fresh_rows),
                size=n,
            )

    def quarantine_key(self, key: str) -> None:
        """Move a payload that failed to decode out of the store, keeping it for inspection."""
        with self._lock:
            row = self._row.get(key)
            if row is None:
                return
            self.quarantine.append(self._payloads[key])
            self._remove_rows([row])
            self._counts["corrupt"] += 1

    def prompt_stats(self, prompt_ids: Sequence[str]) -> list[PromptStats]:
        with self._lock:
            return [
                PromptStats(
                    prompt_id=pid,
                    num_correct=self._prompt_correct.get(pid, 0.0),
                    num_samples=self._prompt_total.get(pid, 0),
                    acc_estimate=self._prompt_estimate.get(pid),
                )
                for pid in prompt_ids
            ]

    def claim(self, identity: Mapping[str, str]) -> None:
        """As `RedisStore.claim`, for the store's lifetime: a Ray-hosted store is found by its actor name, so a
        second run of the same name and run id would otherwise write into this one."""
        check_identity_fields(identity)
        with self._lock:
            if self._identity is None:
                self._identity = dict(identity)
            stored = self._identity
        check_identity(
            stored,
            identity,
            owner="the in-process replay store",
            remedy="give the run another name or run id, or stop the run that holds it",
        )

    def stats(self) -> ReplayStats:
        success = self.success.stats() if self.success is not None else None
        with self._lock:
            n = len(self._keys)
            return ReplayStats(
                size=n,
                fresh=len(self._fresh),
                policy_version=self._version_now,
                **self._counts,
                success_size=success.size if success is not None else 0,
                success_inserted=success.inserted if success is not None else 0,
            )

    # ----------------------------------------------------------------------------------------- persistence
    def save(self, path: Path) -> None:
        """Everything, as one msgpack file (numeric columns as raw little-endian buffers); written atomically."""
        data = msgpack.packb(self._state(), use_bin_type=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _state(self) -> dict[str, object]:
        success = self.success._state() if self.success is not None else None
        with self._lock:
            n = len(self._keys)
            return {
                "format": 1,
                "keys": list(self._keys),
                "payloads": [self._payloads[k] for k in self._keys],
                "priority": self._priority[:n].astype("<f8").tobytes(),
                "version": self._version[:n].astype("<i8").tobytes(),
                "seq": self._seq[:n].astype("<i8").tobytes(),
                "times_sampled": self._times_sampled[:n].astype("<i8").tobytes(),
                "next_seq": self._next_seq,
                "version_now": self._version_now,
                "counts": dict(self._counts),
                "prompt_correct": dict(self._prompt_correct),
                "prompt_total": dict(self._prompt_total),
                "prompt_estimate": dict(self._prompt_estimate),
                "seen": list(self._seen),
                "weights": self._weights,
                "quarantine": list(self.quarantine),
                "success": success,
            }

    @classmethod
    def load(cls, path: Path, cfg: ReplayConfig) -> MemoryStore:
        raw = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
        if not isinstance(raw, dict) or raw.get("format") != 1:
            raise ValueError(f"{path}: not a paceflow in-process replay snapshot")
        store = cls(cfg)
        store._restore(raw)
        return store

    def _restore(self, raw: dict[str, Any]) -> None:
        columns = {
            name: np.frombuffer(raw[name], dtype=dt)
            for name, dt in (("priority", "<f8"), ("version", "<i8"), ("seq", "<i8"), ("times_sampled", "<i8"))
        }
        for i, (key, payload) in enumerate(zip(raw["keys"], raw["payloads"], strict=True)):
            self._insert(key, payload, float(columns["priority"][i]), int(columns["version"][i]))
            self._seq[i] = columns["seq"][i]
            self._times_sampled[i] = columns["times_sampled"][i]
        n = len(self._keys)
        never = np.nonzero(self._times_sampled[:n] == 0)[0]
        self._fresh = dict.fromkeys(self._keys[r] for r in never[np.argsort(self._seq[never], kind="stable")])
        self._next_seq = int(raw["next_seq"])
        self._version_now = int(raw["version_now"])
        self._counts.update({k: int(v) for k, v in raw["counts"].items() if k in self._counts})
        self._prompt_correct = {str(k): float(v) for k, v in raw["prompt_correct"].items()}
        self._prompt_total = {str(k): int(v) for k, v in raw["prompt_total"].items()}
        self._prompt_estimate = {str(k): float(v) for k, v in raw["prompt_estimate"].items()}
        self._seen = OrderedDict.fromkeys(raw["seen"])
        self._weights = raw["weights"]
        self.quarantine = list(raw["quarantine"])
        if self.success is not None and raw.get("success"):
            self.success._restore(raw["success"])

    def quarantined(self) -> list[bytes]:
        with self._lock:
            return list(self.quarantine)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        pass
