"""One behavioural suite, run against the in-process store and against a real redis-server."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from cluster.services import Service, free_port, start_redis
from configs.schema import MemoryReplayConfig, RedisReplayConfig
from replay.memory_store import MemoryStore
from replay.records import SCHEMA_VERSION, RecordError, RolloutGroup, decode_group, encode_group
from replay.redis_store import RedisStore
from replay.remote import RemoteStore, start_replay_server
from replay.store import ReplayStore, build_store

BACKENDS = ["memory", "redis", "ray"]  # "ray": the in-process store hosted in a Ray actor


def group(prompt: str = "p0", *, version: int = 0, rewards: tuple[float, ...] = (1.0, 0.0)) -> RolloutGroup:
    return RolloutGroup.new(
        prompt_id=prompt,
        prompt_token_ids=[1, 2],
        responses=[[3, 4, 2]] * len(rewards),
        behaviour_logprobs=[[-0.1, -0.2, -0.3]] * len(rewards),
        rewards=list(rewards),
        policy_version=version,
        actor_id="test",
    )


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A factory: make_store(**replay_options) -> a fresh, empty store of the parametrised backend."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        if request.param == "memory":
            store: Any = MemoryStore(MemoryReplayConfig(**options))
        elif request.param == "ray":
            request.getfixturevalue("ray_local")
            store = RemoteStore(start_replay_server(MemoryReplayConfig(**options)))
        else:
            server = request.getfixturevalue("redis_server")
            cfg = RedisReplayConfig(port=server.port, **options)
            store = build_store(cfg, run_name=f"test-{uuid.uuid4().hex[:8]}")
        made.append(store)
        return store

    yield make
    for store in made:
        if isinstance(store, RedisStore):
            store.clear()
        if isinstance(store, RemoteStore):
            import ray

            ray.kill(store.handle)
        store.close()


def test_groups_come_back_exactly_as_added(make_store: Any) -> None:
    store: ReplayStore = make_store(fresh_fraction=1.0)
    groups = [group(f"p{i}") for i in range(4)]
    assert store.add(groups, [0.5] * 4) == [g.group_id for g in groups]
    assert len(store) == 4
    batch = store.sample(4)
    assert sorted(g.group_id for g in batch.groups) == sorted(g.group_id for g in groups)
    by_id = {g.group_id: g for g in groups}
    assert all(g == by_id[g.group_id] for g in batch.groups)
    assert batch.fresh == [True] * 4 and batch.is_weights == [1.0] * 4 and batch.times_sampled == [1] * 4


def test_without_priorities_a_group_gets_the_error_of_the_stores_estimate(make_store: Any) -> None:
    """PACED-RL's e(x) = |N_correct/G - a(x)| against the a(x) the learner last wrote, computed by the store (no
    extra round trip for the writer); 1.0 for a prompt without an estimate."""
    store: ReplayStore = make_store(fresh_fraction=1.0)
    store.put_acc_estimates({"known": 0.25})
    known, unknown = group("known", rewards=(1.0, 0.0, 0.0, 0.0)), group("new", rewards=(1.0, 1.0))
    store.add([known, unknown])
    batch = store.sample(2)
    priorities = dict(zip((g.prompt_id for g in batch.groups), batch.priorities, strict=True))
    assert priorities == {"known": pytest.approx(0.0), "new": pytest.approx(1.0)}
    store.put_acc_estimates({"known": 0.75})
    again = group("known", rewards=(1.0, 0.0, 0.0, 0.0))
    store.add([again])
    batch = store.sample(1)
    assert batch.groups[0].group_id == again.group_id and batch.priorities == [pytest.approx(0.5)]


def test_adding_the_same_group_twice_keeps_one_copy(make_store: Any) -> None:
    store = make_store()
    g = group()
    store.add([g], [1.0])
    assert store.add([g], [1.0]) == []
    assert len(store) == 1
    assert store.stats().duplicates == 1 and store.stats().inserted == 1


def test_sampling_frequencies_follow_priority_to_the_exponent(make_store: Any) -> None:
    """Chi-square goodness of fit of 20,000 draws against max(p, 1e-6)^a / sum (seeded: deterministic)."""
    exponent = 0.6
    store = make_store(fresh_fraction=0.0, priority_exponent=exponent)
    groups = [group(f"p{i}") for i in range(6)]
    priorities = [0.0, 0.05, 0.2, 0.4, 0.8, 1.6]
    store.add(groups, priorities)
    index = {g.group_id: i for i, g in enumerate(groups)}
    counts = np.zeros(len(groups))
    reported: dict[int, float] = {}
    for seed in range(200):
        batch = store.sample(100, seed=seed)
        for key, p in zip(batch.keys, batch.probabilities, strict=True):
            counts[index[key]] += 1
            reported[index[key]] = p
    weights = np.power(np.maximum(priorities, 1e-6), exponent)
    expected = weights / weights.sum() * counts.sum()
    chi2 = float((((counts - expected) ** 2) / expected)[1:].sum())  # the p = 0 group has ~0.02 expected draws
    assert chi2 < 20.5, (counts, expected)  # 99.9% critical value for 4 degrees of freedom is 18.47
    for i, p in reported.items():
        assert p == pytest.approx(weights[i] / weights.sum(), rel=1e-6)
    assert counts[0] <= 8  # expected ~1.5 draws: floored, not zero, so it can still be replayed


def test_importance_weights_are_normalised_to_one(make_store: Any) -> None:
    store = make_store(fresh_fraction=0.0, priority_exponent=1.0)
    store.add([group("a"), group("b")], [1.0, 3.0])
    batch = store.sample(64, seed=0)
    assert max(batch.is_weights) == pytest.approx(1.0)
    ratio = {p: w for p, w in zip(batch.priorities, batch.is_weights, strict=True)}
    assert ratio[3.0] == pytest.approx(1 / 3)  # the 3x more likely group weighs 1/3 as much


@pytest.mark.parametrize("order", ["oldest", "newest"])
def test_fresh_groups_come_first_in_their_order_and_only_once(make_store: Any, order: str) -> None:
    store = make_store(fresh_fraction=0.5, priority_exponent=0.0, fresh_order=order)
    groups = [group(f"p{i}") for i in range(6)]
    for g in groups:
        store.add([g], [1.0])
    in_order = groups if order == "oldest" else groups[::-1]
    first = store.sample(4, seed=1)
    assert first.fresh == [True, True, False, False]
    assert first.keys[:2] == [in_order[0].group_id, in_order[1].group_id]
    second = store.sample(4, seed=2)
    unsampled_in_order = [g.group_id for g in in_order if g.group_id not in first.keys]
    assert second.keys[:2] == unsampled_in_order[:2]  # a prioritised draw also uses up freshness
    never_sampled = {g.group_id for g in groups} - set(first.keys) - set(second.keys)
    assert store.stats().fresh == len(never_sampled)


@pytest.mark.parametrize("eviction", ["lowest_priority", "oldest"])
def test_capacity_eviction(make_store: Any, eviction: str) -> None:
    store = make_store(capacity=5, eviction=eviction)
    groups = [group(f"p{i}") for i in range(8)]
    priorities = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]
    for g, p in zip(groups, priorities, strict=True):
        store.add([g], [p])
    remaining = set(store.keys())
    if eviction == "oldest":
        assert remaining == {g.group_id for g in groups[3:]}
    else:
        assert remaining == {g.group_id for g, p in zip(groups, priorities, strict=True) if p >= 0.4}
    assert store.stats().evicted_capacity == 3 and len(store) == 5


def test_stale_groups_are_evicted_by_policy_lag(make_store: Any) -> None:
    store = make_store(max_policy_lag=2, fresh_fraction=0.0)
    groups = [group(f"p{v}", version=v) for v in range(6)]
    store.add(groups, [1.0] * 6)
    store.set_policy_version(5)
    assert store.policy_version() == 5
    assert set(store.keys()) == {g.group_id for g in groups[3:]}
    assert store.stats().evicted_stale == 3
    batch = store.sample(50, seed=0)
    assert all(5 - g.policy_version <= 2 for g in batch.groups)


def test_fresh_groups_on_their_last_version_are_drawn_before_they_go_stale(make_store: Any) -> None:
    """Groups the next weight version would evict undrawn are drawn first, beyond the batch's fresh share if need
    be (the rest of the fresh queue waits its turn): generated rollouts are trained on, not thrown away."""
    store = make_store(max_policy_lag=2, fresh_fraction=0.5)
    store.set_policy_version(4)
    young = [group(f"young{i}", version=4) for i in range(3)]  # inserted first: the head of the fresh queue
    old = [group(f"old{i}", version=2) for i in range(3)]  # stale at version 5
    store.add(young + old, [1.0] * 6)
    batch = store.sample(4, seed=0)
    assert sum(batch.fresh) == 3 and {g.group_id for g, f in zip(batch.groups, batch.fresh, strict=True) if f} == {
        g.group_id for g in old
    }
    drawn = {g.group_id for g in batch.groups}  # the one priority draw may have taken a young group too
    store.set_policy_version(5)
    stats = store.stats()
    assert (stats.evicted_stale, stats.evicted_unsampled) == (3, 0)
    batch = store.sample(2, seed=1)  # nothing at risk now: the usual fresh share, oldest first
    still_fresh = [g.group_id for g in young if g.group_id not in drawn]
    assert batch.fresh == [True, False] and batch.groups[0].group_id == still_fresh[0]


def test_groups_stale_on_arrival_are_refused_and_counted_apart(make_store: Any) -> None:
    """An actor far behind the learner's weights: its groups are never inserted (no batch may train on them), are
    counted as stale on arrival rather than as inserted-then-evicted, and a retry of one is still a duplicate."""
    store = make_store(max_policy_lag=2, fresh_fraction=1.0)
    store.set_policy_version(10)
    behind, at_bound, current = group("behind", version=7), group("bound", version=8), group("now", version=10)
    assert store.add([behind, at_bound, current], [1.0] * 3) == [at_bound.group_id, current.group_id]
    assert store.add([behind], [1.0]) == []  # the actor's retry after a lost reply
    stats = store.stats()
    assert (stats.stale_on_arrival, stats.inserted, stats.duplicates) == (1, 2, 1)
    assert (stats.evicted_stale, stats.evicted_unsampled, stats.drawn_fraction) == (0, 0, 1.0)
    assert {g.group_id for g in store.sample(3).groups} == {at_bound.group_id, current.group_id}
    assert store.prompt_stats(["behind"])[0].num_samples == 2  # still counted for the prompt's accuracy


def test_evictions_count_the_groups_no_batch_drew(make_store: Any) -> None:
    """The rate limiter's measure: a group evicted (stale or over capacity) before any batch drew it was generated
    for nothing; one that was drawn once is not counted again when it leaves."""
    store = make_store(max_policy_lag=1, fresh_fraction=1.0, capacity=4, eviction="oldest")
    store.add([group(f"old{i}", version=0) for i in range(3)], [1.0] * 3)
    store.set_policy_version(1)
    store.sample(1)  # one of the three is drawn, on their last valid version
    store.set_policy_version(2)  # all three are stale now: two of them were never drawn
    stats = store.stats()
    assert (stats.evicted_stale, stats.evicted_unsampled, stats.evicted_late) == (3, 2, 0)
    store.add([group(f"new{i}", version=2) for i in range(6)], [1.0] * 6)  # 2 over capacity, both unsampled
    stats = store.stats()
    assert (stats.evicted_capacity, stats.evicted_unsampled, stats.fresh) == (2, 4, 4)
    assert stats.drawn_fraction == 1 / 5  # 1 drawn of the 5 whose fate is settled (4 are still fresh)


def test_groups_that_arrive_too_late_for_any_batch_are_counted_apart(make_store: Any) -> None:
    """A group that arrives on its last valid version (made max_policy_lag versions ago) can be caught by the
    learner's next draw alone; if it arrives mid-step, the next version evicts it first. It came too late: evicted
    unsampled, but counted in evicted_late, outside the drawn share (generation took max_policy_lag learner steps;
    no rate limit could have helped). One that arrived a version earlier and was left undrawn is the replay's loss."""
    store = make_store(max_policy_lag=1, fresh_fraction=1.0)
    store.set_policy_version(3)
    store.add([group("on-time", version=3), group("waited", version=3)], [1.0, 1.0])
    store.sample(1)  # the learner's draw for version 3 takes one of the two
    store.add([group("late", version=2)], [1.0])  # arrives mid-step, on its last valid version
    store.set_policy_version(4)
    stats = store.stats()
    assert (stats.evicted_stale, stats.evicted_unsampled, stats.evicted_late) == (1, 1, 1)
    assert stats.drawn_fraction == 1.0  # of the groups with more than one chance, all drawn or still fresh
    store.set_policy_version(5)  # the one left undrawn at version 3 goes stale: the replay's loss
    stats = store.stats()
    assert (stats.evicted_unsampled, stats.evicted_late, stats.drawn_fraction) == (2, 1, 0.5)


def test_updated_priorities_change_what_is_sampled(make_store: Any) -> None:
    store = make_store(fresh_fraction=0.0, priority_exponent=1.0)
    a, b = group("a"), group("b")
    store.add([a, b], [1.0, 1.0])
    store.update_priorities([b.group_id, "no-such-key"], [1000.0, 5.0])
    batch = store.sample(200, seed=3)
    assert Counter(batch.keys)[b.group_id] > 190
    assert store.sample(1, seed=4).priorities[0] in (1.0, 1000.0)


SUCCESS = {"capacity": 128, "insert_top_k": 4, "share": 0.25, "priority_exponent": 1.0}


def test_main_table_keeps_every_group_whole_and_the_success_buffer_the_top_k_successes(make_store: Any) -> None:
    """PACED-RL's data flow: fresh batches carry failed responses; the buffer holds the successful responses of
    the groups whose accuracy estimate was most wrong, one response per entry."""
    store = make_store(fresh_fraction=1.0, success_buffer=SUCCESS)
    offered = [
        group("a", rewards=(1.0, 0.0, 1.0)),
        group("b", rewards=(0.0, 0.0, 0.0)),  # largest error, but nothing to replay
        group("c", rewards=(1.0, 0.0, 0.0)),  # smallest error: its success does not make the top 4
        group("d", rewards=(1.0, 1.0, 1.0)),
    ]
    keys = store.add(offered, [0.9, 0.95, 0.1, 0.5])
    assert keys == [g.group_id for g in offered]  # every group enters the main table
    a, d = offered[0].group_id, offered[3].group_id
    assert store.stats().success_size == 4 and store.stats().success_inserted == 4
    batch = store.sample(4, num_success=30, seed=0)
    main = [(g, k) for g, k, s in zip(batch.groups, batch.keys, batch.success, strict=True) if not s]
    replayed = [(g, k) for g, k, s in zip(batch.groups, batch.keys, batch.success, strict=True) if s]
    assert sorted(k for _, k in main) == sorted(g.group_id for g in offered)
    assert all(g == next(o for o in offered if o.group_id == g.group_id) for g, _ in main)  # whole, failures kept
    assert sum(float(g.rewards.sum()) for g, _ in main) < sum(g.size for g, _ in main)
    assert len(replayed) == 30 and batch.fresh[4:] == [False] * 30
    assert {k for _, k in replayed} == {f"{a}/0", f"{a}/2", f"{d}/0", f"{d}/1"}
    assert all(g.size == 1 and g.rewards.tolist() == [1.0] for g, _ in replayed)
    assert {g.prompt_id for g, _ in replayed} == {"a", "d"}
    by_key = dict(zip(batch.keys, batch.priorities, strict=True))
    assert by_key[f"{a}/0"] == 0.9 and by_key[f"{d}/1"] == 0.5  # each response keeps its group's e(x)


def test_success_buffer_capacity_counts_responses_and_follows_the_staleness_bound(make_store: Any) -> None:
    store = make_store(max_policy_lag=1, success_buffer={**SUCCESS, "capacity": 5, "insert_top_k": 64})
    first = group("old", version=0, rewards=(1.0, 1.0, 1.0, 0.0))
    second = group("new", version=1, rewards=(1.0, 1.0, 1.0, 1.0))
    store.add([first], [0.5])
    store.add([second], [0.5])
    assert store.stats().success_size == 5  # 3 + 4 responses offered, the oldest two evicted
    batch = store.sample(1, num_success=50, seed=1)
    assert {g.prompt_id for g, s in zip(batch.groups, batch.success, strict=True) if s} == {"old", "new"}
    store.set_policy_version(2)  # version 0 is now 2 versions old
    assert store.stats().success_size == 4
    batch = store.sample(1, num_success=20, seed=2)
    assert {g.policy_version for g, s in zip(batch.groups, batch.success, strict=True) if s} == {1}


def test_success_draws_follow_the_error_priority(make_store: Any) -> None:
    store = make_store(success_buffer={**SUCCESS, "priority_exponent": 1.0})
    store.add([group("hard", rewards=(1.0,)), group("easy", rewards=(1.0,))], [0.9, 0.1])
    batch = store.sample(1, num_success=400, seed=3)
    counts = Counter(g.prompt_id for g, s in zip(batch.groups, batch.success, strict=True) if s)
    assert counts["hard"] + counts["easy"] == 400
    assert 320 < counts["hard"] < 400  # expected 360 (0.9 / (0.9 + 0.1))


def test_without_a_success_buffer_no_success_rows_are_drawn(make_store: Any) -> None:
    store = make_store()
    store.add([group("a")], [1.0])
    batch = store.sample(1, num_success=8, seed=0)
    assert len(batch.groups) == 1 and batch.success == [False]
    assert store.stats().success_size == 0


def test_prompt_statistics(make_store: Any) -> None:
    store = make_store(success_buffer=SUCCESS)
    store.add(
        [group("x", rewards=(1.0, 0.0)), group("x", rewards=(1.0, 1.0)), group("y", rewards=(0.0, 0.0))],
        [0.1, 0.1, 0.1],
    )
    store.put_acc_estimates({"x": 0.6})
    x, y, z = store.prompt_stats(["x", "y", "z"])
    assert (x.num_correct, x.num_samples, x.acc_estimate) == (3.0, 4, 0.6)  # the success buffer counts nothing
    assert x.empirical_accuracy == 0.75
    assert (y.num_correct, y.num_samples, y.acc_estimate) == (0.0, 2, None)
    assert z.num_samples == 0 and z.empirical_accuracy is None


def test_a_corrupt_record_is_skipped_counted_and_quarantined(make_store: Any) -> None:
    store = make_store(fresh_fraction=1.0)
    good = group("good")
    store.add([good], [1.0])
    store.add_encoded("bad-key", b"\x93\x01\x02\x03 definitely not a group", 1.0, 0)
    batch = store.sample(2)
    assert [g.group_id for g in batch.groups] == [good.group_id]
    assert batch.skipped_corrupt == 1
    assert store.stats().corrupt == 1
    assert store.keys() == [good.group_id]
    assert store.quarantined() == [b"\x93\x01\x02\x03 definitely not a group"]


class _MkdirWhenUnpickled:
    """Unpickling this calls os.mkdir(path): a marker proving that a payload was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.path,)


def test_a_planted_pickle_is_quarantined_and_never_unpickled(make_store: Any, tmp_path: Path) -> None:
    """A writer (or anyone with access to the replay) plants pickles that would run code when loaded: the reader
    skips them, counts them as corrupt and keeps them byte for byte for inspection, and never runs them."""
    store = make_store(fresh_fraction=1.0)
    good = group("good")
    store.add([good], [1.0])
    marker = tmp_path / "unpickled"
    protocols = (0, 2, pickle.HIGHEST_PROTOCOL)
    planted = {f"pickle-{p}": pickle.dumps(_MkdirWhenUnpickled(str(marker)), protocol=p) for p in protocols}
    assert all(b"mkdir" in payload for payload in planted.values())  # each one would call os.mkdir if loaded
    for key, payload in planted.items():
        store.add_encoded(key, payload, 1.0, 0)
    batch = store.sample(4)
    assert not marker.exists()
    assert [g.group_id for g in batch.groups] == [good.group_id] and batch.skipped_corrupt == len(planted)
    assert store.stats().corrupt == len(planted) and store.keys() == [good.group_id]
    assert sorted(store.quarantined()) == sorted(planted.values())
    assert not marker.exists()


def test_a_record_of_another_schema_is_quarantined_naming_the_field(make_store: Any) -> None:
    """Well-formed msgpack that is not a group of this schema (another version, a field missing): `decode_group`
    names the field, and the store treats the record like any corrupt one."""
    store = make_store(fresh_fraction=1.0)
    good = group("good")
    store.add([good], [1.0])
    fields = msgpack.unpackb(encode_group(group("foreign")))
    foreign = {
        "v": msgpack.packb({**fields, "v": SCHEMA_VERSION + 1}),
        "rtok": msgpack.packb({k: v for k, v in fields.items() if k != "rtok"}),
        "gid": msgpack.packb({k: v for k, v in fields.items() if k != "gid"}),
    }
    assert decode_group(msgpack.packb(fields)).prompt_id == "foreign"  # the intact record is valid
    for name, payload in foreign.items():
        with pytest.raises(RecordError, match=f"^{name}: ") as caught:
            decode_group(payload)
        assert caught.value.field == name
        store.add_encoded(f"foreign-{name}", payload, 1.0, 0)
    batch = store.sample(4)
    assert [g.group_id for g in batch.groups] == [good.group_id] and batch.skipped_corrupt == len(foreign)
    assert store.stats().corrupt == len(foreign) and store.keys() == [good.group_id]
    assert sorted(store.quarantined()) == sorted(foreign.values())


def test_a_store_is_claimed_by_one_run_identity(make_store: Any) -> None:
    """A second run that finds this replay (the same Redis prefix, or the same named Ray actor) is refused with
    every differing field named, both values given; the run itself may claim again."""
    store = make_store()
    identity = {"run": "exp-1", "run_dir": "/runs/exp", "objective": "paced"}
    store.claim(identity)
    store.claim(dict(identity))
    with pytest.raises(ValueError, match="is claimed by another run") as caught:
        store.claim({**identity, "run_dir": "/elsewhere", "objective": "grpo"})
    assert "objective is 'paced' there, 'grpo' here" in str(caught.value)
    assert "run_dir is '/runs/exp' there, '/elsewhere' here" in str(caught.value)
    assert "run is 'exp-1'" not in str(caught.value)
    store.claim(identity)  # the refused claim changed nothing


def test_bad_arguments_are_clear_errors(make_store: Any) -> None:
    store = make_store()
    with pytest.raises(ValueError, match="2 groups but 1 priorities"):
        store.add([group(), group()], [1.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        store.add([group()], [float("nan")])
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        store.sample(0)
    assert store.sample(3).groups == []  # empty store: an empty batch, not an error


# ------------------------------------------------------------------------------------ concurrency
def _redis_writer(port: int, run_name: str, writer: int, num: int) -> None:
    store = RedisStore(RedisReplayConfig(port=port, capacity=100_000), run_name=run_name)
    batch: list[RolloutGroup] = []
    for i in range(num):
        batch.append(group(f"w{writer}-{i}"))
        if len(batch) == 10:
            store.add(batch, [1.0] * len(batch))
            store.add(batch[:3], [1.0] * 3)  # a retry of part of the batch: must not duplicate
            batch = []
    store.add(batch, [1.0] * len(batch))


def test_several_writers_and_a_reader_lose_and_duplicate_nothing(make_store: Any) -> None:
    writers, per_writer = 3, 200
    store = make_store(capacity=100_000, fresh_fraction=1.0)
    expected = {f"w{w}-{i}" for w in range(writers) for i in range(per_writer)}
    if isinstance(store, RedisStore):
        run_name = store.prefix.split(":", 1)[1]
        ctx = multiprocessing.get_context("spawn")
        procs: list[Any] = [
            ctx.Process(target=_redis_writer, args=(store.cfg.port, run_name, w, per_writer)) for w in range(writers)
        ]
    else:
        procs = [threading.Thread(target=_memory_writer, args=(store, w, per_writer)) for w in range(writers)]
    for p in procs:
        p.start()
    seen: list[str] = []

    def read_fresh() -> None:
        batch = store.sample(25)
        seen.extend(g.prompt_id for g, fresh in zip(batch.groups, batch.fresh, strict=True) if fresh)

    while any(p.is_alive() for p in procs) or store.stats().fresh:
        read_fresh()
    for p in procs:
        p.join()
    read_fresh()
    assert len(seen) == len(set(seen)) == len(expected)  # every group read exactly once as fresh
    assert set(seen) == expected
    stats = store.stats()
    assert stats.inserted == len(expected) and stats.duplicates == writers * (per_writer // 10) * 3


def _memory_writer(store: ReplayStore, writer: int, num: int) -> None:
    batch: list[RolloutGroup] = []
    for i in range(num):
        batch.append(group(f"w{writer}-{i}"))
        if len(batch) == 10:
            store.add(batch, [1.0] * len(batch))
            store.add(batch[:3], [1.0] * 3)
            batch = []
    store.add(batch, [1.0] * len(batch))


# ------------------------------------------------------------------------------------ Redis only
@pytest.fixture
def aof_redis(tmp_path: Any) -> Iterator[tuple[int, Any]]:
    port = free_port()
    servers: list[Service] = []

    def start() -> Service:
        server = start_redis(port=port, appendonly=True, workdir=tmp_path)
        servers.append(server)
        return server

    yield port, start
    for server in servers:
        server.stop()


def test_redis_restart_with_aof_keeps_the_data(aof_redis: tuple[int, Any]) -> None:
    port, start = aof_redis
    server = start()
    store = RedisStore(RedisReplayConfig(port=port, fresh_fraction=0.0), run_name="aof")
    groups = [group(f"p{i}") for i in range(20)]
    store.add(groups, [float(i + 1) for i in range(20)])
    store.set_policy_version(3)
    store.client.bgrewriteaof()
    server.stop()
    start()
    assert len(store) == 20  # the same client reconnects by itself
    assert store.policy_version() == 3
    assert set(store.keys()) == {g.group_id for g in groups}
    assigned = {g.group_id: float(i + 1) for i, g in enumerate(groups)}
    batch = store.sample(200, seed=1)
    assert all(assigned[key] == p for key, p in zip(batch.keys, batch.priorities, strict=True))  # priorities too


def test_a_writer_survives_a_redis_restart_without_loss_or_duplicates(aof_redis: tuple[int, Any]) -> None:
    port, start = aof_redis
    server = start()
    store = RedisStore(RedisReplayConfig(port=port, capacity=10_000), run_name="restart")
    sent = [group(f"p{i}") for i in range(300)]
    restarted = threading.Event()

    def restart() -> None:
        server.stop()
        start()
        restarted.set()

    for i in range(0, len(sent), 10):
        if i == 100:
            threading.Thread(target=restart).start()
        store.add(sent[i : i + 10], [1.0] * 10)
    assert restarted.wait(30)
    assert sorted(store.keys()) == sorted(g.group_id for g in sent)


def test_redis_password_is_used(tmp_path: Any) -> None:
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    with start_redis(password="hunter2") as server:
        store = RedisStore(RedisReplayConfig(port=server.port, password_file=secret), run_name="auth")
        store.add([group()], [1.0])
        assert len(store) == 1
        with pytest.raises(ValueError, match=r"replay\.password: Redis at .* refused"):
            RedisStore(RedisReplayConfig(port=server.port, password="wrong"), run_name="auth")
    with pytest.raises(ConnectionError, match="cannot reach Redis"):
        RedisStore(RedisReplayConfig(port=free_port()), run_name="nowhere")


def test_the_ray_hosted_store_refuses_garbage_from_a_writer(ray_local: Any) -> None:
    store = RemoteStore(start_replay_server(MemoryReplayConfig()))
    good = group("good")
    keys = ray_local.get(store.handle.add.remote([b"garbage", encode_group(good)], [1.0, 1.0]))
    assert keys == [good.group_id]
    assert store.stats().corrupt == 1 and len(store) == 1
    ray_local.kill(store.handle)


def test_weight_announcements_set_the_version_and_round_trip(make_store: Any) -> None:
    from replay.records import WeightVersion

    store = make_store(max_policy_lag=1)
    assert store.latest_weights() is None
    store.add([group("old", version=0)], [1.0])
    w = WeightVersion(
        version=2, path="/dev/shm/paceflow/v2", step=7, probe_prompt=[1, 2], probe_response=[3], probe_logprobs=[-0.5]
    )
    store.announce_weights(w)
    assert store.latest_weights() == w
    assert store.policy_version() == 2
    assert len(store) == 0  # version 0 is now 2 versions old: evicted


def test_an_in_process_snapshot_keeps_the_success_buffer(tmp_path: Any) -> None:
    cfg = MemoryReplayConfig(success_buffer=SUCCESS)
    store = MemoryStore(cfg)
    store.add([group("a", rewards=(1.0, 0.0, 1.0))], [0.7])
    store.save(tmp_path / "replay.msgpack")
    restored = MemoryStore.load(tmp_path / "replay.msgpack", cfg)
    assert restored.stats() == store.stats()
    batch = restored.sample(1, num_success=4, seed=0)
    assert batch.success == [False, True, True, True, True]
    assert {k.split("/")[1] for k, s in zip(batch.keys, batch.success, strict=True) if s} == {"0", "2"}


def test_an_in_process_snapshot_keeps_the_fresh_queue_and_the_sampling_weights(tmp_path: Any) -> None:
    cfg = MemoryReplayConfig(fresh_fraction=0.5, priority_exponent=1.0, capacity=5, eviction="lowest_priority")
    store = MemoryStore(cfg)
    groups = [group(f"p{i}") for i in range(6)]
    for g, p in zip(groups, [1.0, 1.0, 0.1, 1.0, 1.0, 1.0], strict=True):
        store.add([g], [p])  # p2 leaves over capacity: the last row moves into its place, out of arrival order
    store.sample(2, seed=0)  # p0 fresh, one prioritised draw
    store.update_priorities([groups[5].group_id], [1000.0])
    store.save(tmp_path / "replay.msgpack")
    restored = MemoryStore.load(tmp_path / "replay.msgpack", cfg)
    assert restored.stats() == store.stats()
    a, b = store.sample(4, seed=3), restored.sample(4, seed=3)
    assert a.keys == b.keys and a.probabilities == b.probabilities  # same fresh order, same weights
