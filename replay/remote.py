"""The in-process store shared by separate processes: a Ray actor hosting a `MemoryStore`, and a client proxy.

When rollout actors and the learner are separate Ray processes, the embedded default keeps one `MemoryStore`
inside a `ReplayServer` actor. Only bytes, strings and numbers cross the process boundary: groups travel as
their msgpack encoding and are decoded and validated on the receiving side, exactly as with Redis, so no
Python object is ever unpickled from a rollout actor. `RemoteStore` implements the `ReplayStore` protocol on
top of an actor handle, so the learner and the actors use it like any other store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray

from configs.schema import MemoryReplayConfig
from replay.memory_store import MemoryStore
from replay.records import (
    PromptStats,
    RecordError,
    RolloutGroup,
    SampledBatch,
    WeightVersion,
    decode_group,
    decode_weight_version,
    encode_group,
    encode_weight_version,
)
from replay.store import Draw, ReplayStats, check_add_arguments, decode_draw


class ReplayServer:
    """Holds the store. Methods take and return plain data only."""

    def __init__(self, cfg_json: str, snapshot: str | None = None) -> None:
        cfg = MemoryReplayConfig.model_validate_json(cfg_json)
        self.store = MemoryStore.load(Path(snapshot), cfg) if snapshot else MemoryStore(cfg)
        self.rejected = 0

    def save(self, path: str) -> None:
        self.store.save(Path(path))

    def add(self, payloads: list[bytes], priorities: list[float] | None = None) -> list[str]:
        """Groups as their encodings; without priorities the store computes them (`ReplayStore.add`)."""
        groups, kept, kept_payloads = [], [], []
        for i, payload in enumerate(payloads):
            try:
                groups.append(decode_group(payload))  # validated here, stored as received
            except RecordError:  # a writer sent garbage: count it, keep serving everyone else
                self.rejected += 1
                continue
            kept.append(i)
            kept_payloads.append(payload)
        given = None if priorities is None else [float(priorities[i]) for i in kept]
        return self.store.add(groups, given, payloads=kept_payloads)

    def add_encoded(self, key: str, payload: bytes, priority: float, policy_version: int) -> None:
        self.store.add_encoded(key, payload, priority, policy_version)

    def draw(self, num_groups: int, seed: int | None, num_success: int = 0) -> list[dict[str, Any]]:
        """The main table's draw, then the success buffer's if asked for, still encoded (`Draw.to_wire`)."""
        return [d.to_wire() for d in self.store.draws(num_groups, num_success=num_success, seed=seed)]

    def quarantine_key(self, key: str, success: bool = False) -> None:
        table = self.store.success if success else self.store
        if table is not None:
            table.quarantine_key(key)

    def update_priorities(self, keys: list[str], priorities: list[float]) -> None:
        self.store.update_priorities(keys, priorities)

    def set_policy_version(self, version: int) -> None:
        self.store.set_policy_version(version)

    def policy_version(self) -> int:
        return self.store.policy_version()

    def put_acc_estimates(self, estimates: dict[str, float]) -> None:
        self.store.put_acc_estimates(estimates)

    def announce_weights(self, encoded: bytes) -> None:
        self.store.announce_weights(decode_weight_version(encoded))

    def latest_weights(self) -> bytes | None:
        weights = self.store.latest_weights()
        return encode_weight_version(weights) if weights is not None else None

    def prompt_stats(self, prompt_ids: list[str]) -> list[tuple[str, float, int, float | None]]:
        return [
            (s.prompt_id, s.num_correct, s.num_samples, s.acc_estimate) for s in self.store.prompt_stats(prompt_ids)
        ]

    def stats(self) -> dict[str, int]:
        stats = dict(vars(self.store.stats()))
        stats["corrupt"] += self.rejected  # payloads refused at the door count as corrupt too
        return stats

    def claim(self, identity: dict[str, str]) -> None:
        self.store.claim(identity)

    def keys(self) -> list[str]:
        return self.store.keys()

    def quarantined(self) -> list[bytes]:
        return self.store.quarantined()

    def size(self) -> int:
        return len(self.store)


def start_replay_server(
    cfg: MemoryReplayConfig, *, name: str | None = None, namespace: str | None = None, snapshot: Path | None = None
) -> Any:
    """Start the actor (threaded, so writers and the learner are served concurrently; the store has a lock),
    empty or from a snapshot written by `ReplayServer.save`."""
    actor_cls = ray.remote(num_cpus=0, max_concurrency=16)(ReplayServer)
    options: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True} if name else {}
    return actor_cls.options(**options).remote(cfg.model_dump_json(), str(snapshot) if snapshot else None)


class RemoteStore:
    """`ReplayStore` over a `ReplayServer` handle; decodes sampled payloads here and quarantines bad ones."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def add(self, groups: Sequence[RolloutGroup], priorities: Sequence[float] | None = None) -> list[str]:
        if priorities is not None:
            check_add_arguments(len(groups), priorities)
        payloads = [encode_group(g) for g in groups]
        sent = None if priorities is None else [float(p) for p in priorities]
        return list(ray.get(self.handle.add.remote(payloads, sent)))

    def add_encoded(self, key: str, payload: bytes, priority: float, policy_version: int) -> None:
        ray.get(self.handle.add_encoded.remote(key, payload, priority, policy_version))

    def sample(self, num_groups: int, *, num_success: int = 0, seed: int | None = None) -> SampledBatch:
        if num_groups < 1:
            raise ValueError(f"sample: num_groups must be >= 1, got {num_groups}")
        main, *replayed = [Draw.from_wire(d) for d in ray.get(self.handle.draw.remote(num_groups, seed, num_success))]
        batch = decode_draw(main, quarantine=lambda key: ray.get(self.handle.quarantine_key.remote(key)))
        for success in replayed:
            batch = batch.extended(
                decode_draw(success, quarantine=lambda key: ray.get(self.handle.quarantine_key.remote(key, True)))
            )
        return batch

    def update_priorities(self, keys: Sequence[str], priorities: Sequence[float]) -> None:
        ray.get(self.handle.update_priorities.remote(list(keys), [float(p) for p in priorities]))

    def set_policy_version(self, version: int) -> None:
        ray.get(self.handle.set_policy_version.remote(version))

    def policy_version(self) -> int:
        return int(ray.get(self.handle.policy_version.remote()))

    def put_acc_estimates(self, estimates: Mapping[str, float]) -> None:
        ray.get(self.handle.put_acc_estimates.remote({k: float(v) for k, v in estimates.items()}))

    def announce_weights(self, weights: WeightVersion) -> None:
        ray.get(self.handle.announce_weights.remote(encode_weight_version(weights)))

    def latest_weights(self) -> WeightVersion | None:
        encoded = ray.get(self.handle.latest_weights.remote())
        return decode_weight_version(encoded) if encoded is not None else None

    def prompt_stats(self, prompt_ids: Sequence[str]) -> list[PromptStats]:
        rows = ray.get(self.handle.prompt_stats.remote(list(prompt_ids)))
        return [PromptStats(pid, correct, total, estimate) for pid, correct, total, estimate in rows]

    def stats(self) -> ReplayStats:
        return ReplayStats(**ray.get(self.handle.stats.remote()))

    def claim(self, identity: Mapping[str, str]) -> None:
        ray.get(self.handle.claim.remote(dict(identity)))

    def keys(self) -> list[str]:
        return list(ray.get(self.handle.keys.remote()))

    def quarantined(self) -> list[bytes]:
        return list(ray.get(self.handle.quarantined.remote()))

    def __len__(self) -> int:
        return int(ray.get(self.handle.size.remote()))

    def close(self) -> None:
        pass
