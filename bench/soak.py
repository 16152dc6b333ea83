"""Soak: writer processes and a learner against one Redis replay for minutes. Prints JSON; exit code 1 if an
invariant fails.

    .venv/bin/python bench/soak.py                      # 8 writers, 300 s (+ a 30 s 1-writer baseline)
    .venv/bin/python bench/soak.py --seconds 50 --baseline-seconds 8      # about what the CI test runs
    .venv/bin/python bench/soak.py --port 6390          # against a redis-server already on 127.0.0.1:6390

Loopback only: unless --port names one, it starts its own redis-server on 127.0.0.1 and stops it by PID. Every
process it starts ends by a deadline of its own, so a run is bounded in time even if this script is killed.

Each writer is an OS process that adds groups like real ones (G=8 responses of 100-600 tokens with float32
log-probs, ~26 KB encoded, a 50-250-token prompt, 2,000 prompt ids, tagged with the store's policy version: some
behind, a few beyond max_policy_lag so the store refuses them on arrival) in batches of --add-batch, each group
with a unique id. An add that fails is sent again with the same ids until the store acknowledges it. Faults: every
--kill-every seconds the writers' connections are killed server-side (the client reconnects and retries), and a
--lose-replies fraction of the acknowledged adds have their reply dropped by the writer, which sends the same ids
again, as after a connection error that hides whether the add went through. The learner, its own process, loops
like a real one: sample a batch (fresh first), set new priorities, publish estimates, and bump the policy version
every --version-every seconds (so staleness eviction runs beside capacity eviction). At the deadline the writers
stop, the learner drains the fresh groups, and the run checks:

  no loss        acknowledged ids == inserted + refused as stale on arrival; size == inserted - evicted (capacity
                 + stale); the store holds only acknowledged ids; each stored group decodes and equals what its
                 writer made
  no duplicates  no id acknowledged twice; the duplicates counter is at least the resends of dropped replies and
                 at most the ids of every add that may have been sent twice; inserts not acknowledged as new are
                 lost replies; no group reaches the learner as new twice (first draw, fresh or by priority), and
                 each inserted group was drawn or evicted undrawn (but for draws evicted before their payload
                 was read, which the learner cannot see: at most the batches' shortfall)
  bounded memory sampled each second: Redis used_memory (less the key tables and the dedupe markers, see below),
                 Redis's key count less the markers, and every process's RSS. Once the store is full (within
                 the first third), each series' last-third peak is at most --memory-tolerance x its middle-third
                 peak, or 8 MiB above it, whichever is larger (key counts: the tolerance only). A leak grows with
                 the work, so it would add as much in the last third as in any other; the report gives the
                 smallest leak per group each bound would have caught

Dedupe markers (one small key per id the store took, so a retry never inserts twice) expire after an hour
(replay/redis_store.DEDUPE_TTL_S), not at capacity: they grow with every insert for the length of a soak. The run
measures their bytes at the end (what deleting them frees), takes them out of the judged series, and reports the
raw series, the bytes per marker and what the markers would hold at their expiry at the measured insert rate.

Throughput (groups inserted per second, batches sampled per second) is compared with a 1-writer baseline
measured first in the same run, on the same server.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections import Counter
from pathlib import Path
from typing import Any, cast

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import machine
from cluster.services import Service, start_redis
from configs.schema import RedisReplayConfig
from replay.records import RecordError, RolloutGroup, decode_group
from replay.redis_store import DEDUPE_TTL_S, RedisStore

G, MIN_TOKENS, MAX_TOKENS, MIN_PROMPT, MAX_PROMPT, PROMPTS, POOL = 8, 100, 600, 50, 250, 2000, 257
WRITER_CLIENT = "soak-writer-"
MIB = 1 << 20
MEMORY_SLACK = 8 * MIB
"""Allocator noise a bounded process still shows: a batch in flight (64 groups of ~25 KB, twice: wire and
decoded), a client output buffer, jemalloc/pymalloc arenas."""
READY_TIMEOUT_S = 120.0
STORE_FIELDS = ("size", "fresh", "policy_version", "inserted", "stale_on_arrival", "duplicates", "sampled", "corrupt")
EVICTIONS = ("evicted_capacity", "evicted_stale", "evicted_unsampled")
CHILD_OPTIONS = {"role", "run_name", "workdir", "index", "replay_json"}
ID = re.compile(r"^w(\d+)-(\d+)$")


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ groups
def group_id(writer: int, seq: int) -> str:
    return f"w{writer}-{seq:09d}"


@functools.cache
def token_pool(seed: int, writer: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """A writer's responses, their log-probs and prompts, made once: building each group's arrays afresh would
    spend the writers' CPU on random numbers instead of on the replay (a real writer's tokens come from an engine)."""
    rng = np.random.default_rng([seed, writer, 1 << 32])
    lengths = rng.integers(MIN_TOKENS, MAX_TOKENS + 1, POOL)
    responses = [rng.integers(0, 50_000, n).astype(np.int32) for n in lengths]
    logprobs = [np.log(rng.uniform(1e-4, 1.0, n)).astype(np.float32) for n in lengths]
    prompts = [rng.integers(0, 50_000, n).astype(np.int32) for n in rng.integers(MIN_PROMPT, MAX_PROMPT + 1, POOL)]
    return responses, logprobs, prompts


def make_group(seed: int, writer: int, seq: int, policy_version: int) -> RolloutGroup:
    """The group a writer adds as its seq-th: the content is a function of (seed, writer, seq), so the checker can
    rebuild it and compare; the policy version is whatever the store said when it was made."""
    responses, logprobs, prompts = token_pool(seed, writer)
    rng = np.random.default_rng([seed, writer, seq])
    picks = rng.integers(0, POOL, G)
    prompt = int(rng.integers(PROMPTS))
    truncated = [len(responses[i]) == MAX_TOKENS for i in picks]
    return RolloutGroup(
        group_id=group_id(writer, seq),
        prompt_id=f"p{prompt}",
        prompt_token_ids=prompts[prompt % POOL],
        response_token_ids=[responses[i] for i in picks],
        behaviour_logprobs=[logprobs[i] for i in picks],
        rewards=(rng.random(G) < 0.4).astype(np.float32),
        policy_version=policy_version,
        actor_id=f"soak-writer-{writer}",
        created_at=time.time(),
        finish_reasons=["length" if t else "stop" for t in truncated],
        parsed_answers=[None if t else str(int(a)) for t, a in zip(truncated, rng.integers(0, 1000, G), strict=True)],
    )


def same_content(a: RolloutGroup, b: RolloutGroup) -> bool:
    """Equal in everything the writer chose (the policy version and the creation time vary from run to run)."""
    return (
        a.group_id == b.group_id
        and a.prompt_id == b.prompt_id
        and a.actor_id == b.actor_id
        and np.array_equal(a.prompt_token_ids, b.prompt_token_ids)
        and np.array_equal(a.rewards, b.rewards)
        and len(a.response_token_ids) == len(b.response_token_ids)
        and all(np.array_equal(x, y) for x, y in zip(a.response_token_ids, b.response_token_ids, strict=True))
        and all(np.array_equal(x, y) for x, y in zip(a.behaviour_logprobs, b.behaviour_logprobs, strict=True))
        and a.finish_reasons == b.finish_reasons
        and a.parsed_answers == b.parsed_answers
    )


# ------------------------------------------------------------------------------------- child processes
def wait_for_go(workdir: Path, name: str) -> float:
    """Tell the parent this process is ready, then wait for the common start; returns the deadline. Every child
    starts together, so the baseline and the main phase time the same thing (not Python's start-up)."""
    (workdir / f"ready-{name}").touch()
    give_up = time.time() + READY_TIMEOUT_S
    go = workdir / "go"
    while not go.exists():
        if time.time() > give_up:
            raise SystemExit(f"{name}: no start signal in {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.01)
    return float(json.loads(go.read_text())["until"])


def run_writer(args: argparse.Namespace, cfg: RedisReplayConfig) -> dict[str, Any]:
    store = RedisStore(cfg, run_name=args.run_name)
    # connect() takes no client name; the pool hands this one to every (re)connection, so CLIENT SETNAME is sent
    # again after each kill and the parent kills exactly the writers' connections, never the learner's.
    store.client.connection_pool.connection_kwargs["client_name"] = f"{WRITER_CLIENT}{args.index}"
    rng = np.random.default_rng([args.seed, args.index, 1 << 30])
    until = wait_for_go(args.workdir, f"writer-{args.index}")
    acked = array("Q")
    refused: list[str] = []
    retries = resent = dropped = 0
    while time.time() < until:
        version = store.policy_version()
        # Mostly current, some behind; at the bound they are evicted stale at the next version, beyond it the store
        # refuses them on arrival (a slow actor).
        lag = int(rng.choice([0, 0, 0, 0, 1, 1, 2, cfg.max_policy_lag, cfg.max_policy_lag + 1]))
        seqs = range(len(acked), len(acked) + args.add_batch)
        groups = [make_group(args.seed, args.index, s, max(0, version - lag)) for s in seqs]
        # A killed connection rarely loses a reply the server already sent (the add is then retried by the client
        # itself), so some replies are dropped here on purpose, after the server took the add: the writer sends the
        # same ids again, as it does when a connection error hides whether the add went through.
        lose = rng.random() < args.lose_replies
        for attempt in range(10):
            try:
                present = set(store.add(groups))
                if lose:
                    lose = False
                    dropped += 1
                    raise redis.ConnectionError("reply dropped on purpose (--lose-replies)")
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # The client already retried 20 times; the same ids again, so a lost reply cannot duplicate.
                retries += 1
                resent += len(groups)
                if not str(exc).startswith("reply dropped"):
                    log(f"writer {args.index}: add failed ({exc}); retry {attempt + 1} with the same ids")
                time.sleep(min(2.0, 0.1 * 2**attempt))
        else:
            raise SystemExit(f"writer {args.index}: gave up after 10 retries")
        acked.extend(seqs)
        # With eviction 'oldest' a new group is never the victim of its own add, so an acknowledged id missing from
        # the returned keys was refused: already taken (a retry whose first reply was lost), or stale on arrival.
        refused += [g.group_id for g in groups if g.group_id not in present]
    store.close()
    return {
        "writer": args.index,
        "acknowledged": [group_id(args.index, s) for s in acked],
        "refused": refused,
        "writer_retries": retries,
        "replies_dropped": dropped,
        "resent_groups": resent,
    }


def run_learner(args: argparse.Namespace, cfg: RedisReplayConfig) -> dict[str, Any]:
    store = RedisStore(cfg, run_name=args.run_name)
    until = wait_for_go(args.workdir, "learner")
    done = args.workdir / "writers-done"
    hard_stop = until + args.drain_timeout
    estimates: dict[str, float] = {}
    latencies: list[float] = []
    batches = in_window = groups = fresh = vanished = corrupt = version = 0
    drained = False
    start = time.time()
    next_bump = start + args.version_every
    with (args.workdir / "first-draws.txt").open("w") as first_log:
        while True:
            now = time.time()
            if now >= hard_stop:
                break
            if now >= until and done.exists() and store.stats().fresh == 0:
                drained = True
                break
            t = time.perf_counter()
            batch = store.sample(args.learner_batch)
            latencies.append(time.perf_counter() - t)
            if not batch.keys and not batch.skipped_corrupt:
                time.sleep(0.005)  # empty store: the writers have not started yet or staleness emptied it
                continue
            batches += 1
            in_window += now < until
            groups += len(batch.groups)
            corrupt += batch.skipped_corrupt
            # Prioritised draws are with replacement and always fill the batch; a short batch means a drawn group
            # was evicted between the draw and the read of its payload.
            vanished += args.learner_batch - len(batch.groups) - batch.skipped_corrupt
            # A group's first draw (fresh, or by priority before its fresh turn came) is the one with times_sampled 1:
            # logged, not kept, so the learner's memory stays flat; the parent checks none comes twice.
            draws = list(zip(batch.keys, batch.fresh, batch.times_sampled, strict=True))
            fresh += sum(f for _, f, _ in draws)
            first_log.write("".join(f"{k} {'fresh' if f else 'prio'}\n" for k, f, n in draws if n == 1 or f))
            # "Training": PACED-RL's e(x) against a running estimate of each prompt's accuracy.
            priorities = []
            for g in batch.groups:
                accuracy = float(np.nanmean(g.rewards))
                estimate = estimates.get(g.prompt_id, 0.5)
                priorities.append(abs(accuracy - estimate))
                estimates[g.prompt_id] = 0.9 * estimate + 0.1 * accuracy
            store.update_priorities(batch.keys, priorities)
            if batches % 10 == 0:
                store.put_acc_estimates({g.prompt_id: estimates[g.prompt_id] for g in batch.groups})
            if now >= next_bump and now < until:
                version += 1
                store.set_policy_version(version)
                next_bump = now + args.version_every
    lat_ms = np.array(latencies or [0.0]) * 1000
    store.close()
    return {
        "batches": batches,
        "batches_before_deadline": in_window,
        "groups_sampled": groups,
        "fresh_drawn": fresh,
        "vanished_draws": vanished,
        "corrupt_skipped": corrupt,
        "policy_version": version,
        "drained": drained,
        "drain_s": round(time.time() - until, 2),
        "sample_ms_p50": round(float(np.percentile(lat_ms, 50)), 2),
        "sample_ms_p99": round(float(np.percentile(lat_ms, 99)), 2),
    }


# ---------------------------------------------------------------------------------------------- the parent
def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def kill_writer_connections(client: redis.Redis) -> int:
    killed = 0
    for conn in client.client_list():
        if str(conn.get("name", "")).startswith(WRITER_CLIENT):
            with contextlib.suppress(redis.ResponseError):  # it closed by itself meanwhile
                killed += int(client.client_kill_filter(_id=conn["id"]))
    return killed


def spawn(
    role: str, args: argparse.Namespace, cfg: RedisReplayConfig, run_name: str, wd: Path, index: int = 0
) -> subprocess.Popen[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--run-name", run_name]
    argv += ["--workdir", str(wd), "--index", str(index), "--replay-json", cfg.model_dump_json()]
    argv += ["--seed", str(args.seed), "--add-batch", str(args.add_batch), "--learner-batch", str(args.learner_batch)]
    argv += ["--lose-replies", str(args.lose_replies)]
    argv += ["--version-every", str(args.version_every), "--drain-timeout", str(args.drain_timeout)]
    # Same process group as this script: whoever kills the group (the CI test) kills the children too.
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None, text=True)


def run_phase(name: str, writers: int, seconds: float, args: argparse.Namespace, port: int, root: Path) -> dict:
    run_name = f"soak-{name}-{uuid.uuid4().hex[:8]}"
    cfg = RedisReplayConfig(
        port=port,
        capacity=args.capacity,
        eviction="oldest",
        max_policy_lag=args.max_policy_lag,
        fresh_order=args.fresh_order,
    )
    store = RedisStore(cfg, run_name=run_name)
    wd = root / name
    wd.mkdir()
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        procs["learner"] = spawn("learner", args, cfg, run_name, wd)
        for i in range(writers):
            procs[f"writer-{i}"] = spawn("writer", args, cfg, run_name, wd, i)
        give_up = time.time() + READY_TIMEOUT_S
        while not all((wd / f"ready-{n}").exists() for n in procs):
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead or time.time() > give_up:
                raise RuntimeError(f"{name}: {dead or 'children'} did not start")
            time.sleep(0.05)
        go = time.time()
        until = go + seconds
        (wd / "go.tmp").write_text(json.dumps({"until": until}))
        (wd / "go.tmp").rename(wd / "go")  # atomic: a child never reads half a file
        log(f"{name}: {writers} writer(s) and the learner started; {seconds:.0f} s")
        samples, killed = monitor(store, procs, go, until, args.kill_every)
        outputs: dict[str, dict] = {}
        failed: list[str] = []
        for n, p in procs.items():
            if n == "learner":
                continue
            out, _ = p.communicate(timeout=max(0.0, until - time.time()) + 120)
            if p.returncode != 0:
                failed.append(f"{n} exited {p.returncode}")
                continue
            outputs[n] = json.loads(out)
        (wd / "writers-done").touch()
        out, _ = procs["learner"].communicate(timeout=args.drain_timeout + 120)
        if procs["learner"].returncode != 0:
            failed.append(f"learner exited {procs['learner'].returncode}")
            learner: dict = {}
        else:
            learner = json.loads(out)
        log(f"{name}: writers and the learner finished; checking")
        retries = sum(w["writer_retries"] for w in outputs.values())
        dropped = sum(w["replies_dropped"] for w in outputs.values())
        # A dropped reply's resend is all duplicates; a killed connection or a failed add may have resent one batch.
        duplicates = (dropped * args.add_batch, (killed + retries) * args.add_batch)
        result = check(store, cfg, args.seed, outputs, learner, wd / "first-draws.txt", duplicates, writers, failed)
        result["connections_killed"] = killed
        result["learner"] = learner
        result["throughput"] = throughput(outputs, learner, go, until)
        if name == "main":  # the baseline is too short for thirds to mean anything
            result["memory"] = memory(store, samples, go, until, args.capacity, args.memory_tolerance)
        result["pids"] = [p.pid for p in procs.values()]
        return result
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        store.clear()
        store.close()


def monitor(
    store: RedisStore, procs: dict[str, subprocess.Popen[str]], go: float, until: float, kill_every: float
) -> tuple[list[dict], int]:
    """Once a second until the deadline: Redis memory, the store's counters, every child's RSS; kill the writers'
    connections every `kill_every` seconds."""
    samples: list[dict] = []
    killed = 0
    next_kill = go + kill_every if kill_every > 0 else float("inf")
    next_log = go + 10
    while (now := time.time()) < until:
        stats = store.stats()
        used, tables = redis_memory(store.client)
        samples.append(
            {
                "t": now,
                "used_memory": used,
                "key_tables": tables,
                "keys": int(store.client.dbsize()),
                "markers": stats.inserted + stats.stale_on_arrival,  # every id the store took or refused stale
                "size": stats.size,
                "rss": {n: rss_bytes(p.pid) for n, p in procs.items() if p.poll() is None},
            }
        )
        if now >= next_kill:
            killed += kill_writer_connections(store.client)
            next_kill = now + kill_every
        if now >= next_log:
            log(
                f"t={now - go:.0f}s inserted={stats.inserted} size={stats.size} fresh={stats.fresh} "
                f"sampled={stats.sampled} duplicates={stats.duplicates} used_memory={used / MIB:.0f} MiB"
            )
            next_log = now + 10
        time.sleep(max(0.0, min(1.0, until - time.time())))
    return samples, killed


def check(
    store: RedisStore,
    cfg: RedisReplayConfig,
    seed: int,
    writers: dict[str, dict],
    learner: dict,
    first_draws_path: Path,
    duplicates: tuple[int, int],
    expected_writers: int,
    failed: list[str],
) -> dict:
    """The invariants of one phase, from the writers' acknowledgements, the learner's log and the store itself.
    `duplicates`: the least and the most the duplicates counter may hold, from the resends the writers made."""
    acknowledged = [k for w in writers.values() for k in w["acknowledged"]]
    acked = set(acknowledged)
    refused = sum(len(w["refused"]) for w in writers.values())
    stats = store.stats()
    keys = store.keys()
    stored = set(keys)
    evicted = stats.evicted_capacity + stats.evicted_stale
    bad: list[str] = []
    for i in range(0, len(keys), 256):
        chunk = keys[i : i + 256]
        payloads = cast(list[bytes | None], store.client.mget([f"{store.prefix}:g:{k}" for k in chunk]))
        for key, payload in zip(chunk, payloads, strict=True):
            match = ID.match(key)
            ok = False
            if payload is not None and match is not None:
                with contextlib.suppress(RecordError):
                    ok = same_content(decode_group(payload), make_group(seed, int(match[1]), int(match[2]), 0))
            if not ok:
                bad.append(key)
    lines = first_draws_path.read_text().splitlines() if first_draws_path.exists() else []
    first = Counter(line.split()[0] for line in lines)
    fresh = Counter(line.split()[0] for line in lines if line.endswith(" fresh"))
    first_twice = sum(n - 1 for n in first.values() if n > 1)
    # Every inserted group is drawn for the first time once, or evicted before any draw, or still fresh; a drawn
    # group evicted between the draw and the read of its payload (vanished) is the only one the learner cannot see.
    unaccounted = stats.inserted - len(first) - stats.evicted_unsampled - stats.fresh
    lost = len(acked - stored) - evicted - stats.stale_on_arrival
    duplicated = max(0, stats.inserted + stats.stale_on_arrival - len(acked)) + len(acknowledged) - len(acked)
    returned = len(acknowledged) - refused  # acknowledged as new inserts
    checks = {
        "all_processes_exited_cleanly": not failed,
        "every_writer_acknowledged_groups": len(writers) == expected_writers
        and all(w["acknowledged"] for w in writers.values()),
        "no_id_acknowledged_twice": len(acknowledged) == len(acked),
        "acknowledged_equals_inserted_plus_stale_on_arrival": stats.inserted + stats.stale_on_arrival == len(acked),
        "size_equals_inserted_minus_evicted": stats.size == stats.inserted - evicted,
        "store_holds_only_acknowledged_ids": stored <= acked,
        "every_stored_group_decodes_and_matches_its_writer": not bad and stats.corrupt == 0 and not store.quarantined(),
        # An insert not acknowledged as new had its reply lost; the retry that was acknowledged counted a duplicate.
        "inserts_not_returned_as_new_were_lost_replies": 0 <= stats.inserted - returned <= stats.duplicates,
        "duplicates_counted_for_every_resend_and_only_for_them": duplicates[0] <= stats.duplicates <= duplicates[1],
        "no_group_drawn_for_the_first_time_twice": first_twice == 0,
        "no_fresh_group_drawn_twice": all(n == 1 for n in fresh.values()),
        "first_draws_were_acknowledged": set(first) <= acked,
        "each_insert_drawn_or_evicted_unsampled": 0 <= unaccounted <= learner.get("vanished_draws", -1),
        "learner_drained_the_fresh_groups": bool(learner.get("drained")),
        "learner_sampled_batches": learner.get("batches", 0) > 0,
    }
    return {
        "writers": expected_writers,
        "acknowledged": len(acknowledged),
        "lost": lost,
        "duplicated": duplicated + first_twice,
        "failures": failed,
        "bad_payloads": bad[:10],
        "writer_retries": sum(w["writer_retries"] for w in writers.values()),
        "resent_groups": sum(w["resent_groups"] for w in writers.values()),
        "acknowledged_as_new": returned,
        "first_draws": len(first),
        "fresh_draws": sum(fresh.values()),
        "draws_unaccounted_within_vanished": unaccounted,
        "store": {"capacity": cfg.capacity, "max_policy_lag": cfg.max_policy_lag}
        | {k: getattr(stats, k) for k in STORE_FIELDS + EVICTIONS},
        "checks": checks,
    }


def throughput(writers: dict[str, dict], learner: dict, go: float, until: float) -> dict:
    window = until - go
    groups = sum(len(w["acknowledged"]) for w in writers.values())
    return {
        "window_s": round(window, 1),
        "groups_inserted_per_s": round(groups / window, 1),
        "batches_sampled_per_s": round(learner.get("batches_before_deadline", 0) / window, 2),
        "sample_ms_p50": learner.get("sample_ms_p50"),
        "sample_ms_p99": learner.get("sample_ms_p99"),
    }


def redis_memory(client: redis.Redis) -> tuple[int, int]:
    """(used_memory, bytes of the key tables): the tables (entries and buckets of every database's key and expiry
    dicts) double in steps as keys are added, so they are tracked apart from what the keys themselves hold."""
    stats = client.memory_stats()
    tables = sum(
        int(db.get("overhead.hashtable.main", 0)) + int(db.get("overhead.hashtable.expires", 0))
        for name, db in stats.items()
        if name.startswith("db.") and isinstance(db, dict)
    )
    return int(stats["total.allocated"]), tables


def delete_dedupe_markers(store: RedisStore) -> tuple[int, int, int]:
    """(markers, bytes freed, of which key-table bytes): what the markers held, measured by deleting them."""
    before, tables_before = redis_memory(store.client)
    count = 0
    batch: list[bytes] = []
    for key in store.client.scan_iter(match=f"{store.prefix}:seen:*", count=5000):
        batch.append(key)
        if len(batch) == 5000:
            count += int(store.client.delete(*batch))
            batch = []
    if batch:
        count += int(store.client.delete(*batch))
    time.sleep(1.5)  # Redis shrinks the emptied key tables in its cron, ten times a second per database
    after, tables_after = redis_memory(store.client)
    return count, max(0, before - after), max(0, tables_before - tables_after)


def memory(store: RedisStore, samples: list[dict], go: float, until: float, capacity: int, tolerance: float) -> dict:
    """The memory series by thirds of the phase and whether each stayed flat once the store was full.

    A leak grows with the work done, which goes on at a steady rate, so it adds as much from the middle third to
    the last as over any third; a bounded process has reached its plateau by the middle third (the store fills in
    the first) and peaks no higher in the last. The allowance is what noise needs, and the report says what it lets
    through: the smallest leak per group the run would have caught.

    Redis is judged on what the store holds: used_memory less the key tables (they double in steps with the key
    count) and less the dedupe markers' own bytes; and, exactly, on its key count less the markers."""
    markers, marker_bytes, marker_tables = delete_dedupe_markers(store)
    per_marker = (marker_bytes - marker_tables) / markers if markers else 0.0
    third = (until - go) / 3
    full = next((s["t"] for s in samples if s["size"] >= 0.9 * capacity), None)
    series: dict[str, list[tuple[float, int]]] = {
        "redis_used_memory": [
            (s["t"], int(s["used_memory"] - s["key_tables"] - per_marker * s["markers"])) for s in samples
        ],
        "redis_keys_less_markers": [(s["t"], s["keys"] - s["markers"]) for s in samples],
        "redis_used_memory_raw": [(s["t"], s["used_memory"]) for s in samples],
    }
    for s in samples:
        for name, value in s["rss"].items():
            if value is not None:
                series.setdefault(f"rss_{name}", []).append((s["t"], value))
    in_last = [s["markers"] for s in samples if s["t"] >= go + 2 * third]
    taken_last = in_last[-1] - in_last[0] if len(in_last) > 1 else 0
    bounded = full is not None and full <= go + third
    report: dict[str, Any] = {
        "bounded": bounded,
        "criterion": f"store full within the first third; then each series' last-third peak <= its middle-third "
        f"peak x {tolerance} or + 8 MiB, whichever is more (key counts: x {tolerance}); "
        "redis_used_memory_raw, which holds the dedupe markers, is only reported",
        "store_full_after_s": round(full - go, 1) if full is not None else None,
        "groups_taken_in_last_third": taken_last,
        "dedupe_markers": markers,
        "dedupe_bytes_per_marker": round(marker_bytes / markers, 1) if markers else None,
        "dedupe_mib_at_ttl_at_this_rate": round(marker_bytes / markers * taken_last / third * DEDUPE_TTL_S / MIB)
        if markers
        else None,
        "series": {},
    }
    for name, points in series.items():
        thirds = [[v for t, v in points if go + k * third <= t < go + (k + 1) * third] for k in range(3)]
        if not all(thirds):  # a process that ended early, or a run too short for a sample in each third
            report["series"][name] = {"bounded": False, "samples_per_third": [len(t) for t in thirds]}
            bounded = bounded and name == "redis_used_memory_raw"
            continue
        keys = name == "redis_keys_less_markers"
        middle, last = max(thirds[1]), max(thirds[2])
        allowed = tolerance * middle if keys else max(tolerance * middle, middle + MEMORY_SLACK)
        unit, scale = ("", 1) if keys else ("_mib", MIB)
        row = {
            f"end_of_first_third{unit}": round(thirds[0][-1] / scale, 1),
            f"middle_third_peak{unit}": round(middle / scale, 1),
            f"last_third_peak{unit}": round(last / scale, 1),
            f"end_of_last_third{unit}": round(thirds[2][-1] / scale, 1),
            f"allowed{unit}": round(allowed / scale, 1),
            "bounded": last <= allowed,
        }
        if name.startswith("redis_") and name != "redis_used_memory_raw" and taken_last:
            row[f"detectable_leak_{'keys' if keys else 'bytes'}_per_group"] = round((allowed - middle) / taken_last, 3)
        if name != "redis_used_memory_raw":  # the markers expire after an hour: bounded by time, not capacity
            bounded = bounded and bool(row["bounded"])
        report["series"][name] = row
    report["bounded"] = bounded
    return report


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=8, help="writer processes in the main phase (default 8)")
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the main phase (default 300)")
    parser.add_argument(
        "--baseline-seconds",
        type=float,
        default=None,
        help="length of the 1-writer baseline run first (default: a tenth of --seconds, at least 5; 0: none)",
    )
    parser.add_argument("--capacity", type=int, default=2048, help="replay capacity in groups (default 2048)")
    parser.add_argument("--add-batch", type=int, default=16, help="groups per add call (default 16)")
    parser.add_argument("--learner-batch", type=int, default=64, help="groups per sampled batch (default 64)")
    parser.add_argument("--max-policy-lag", type=int, default=4, help="staleness bound in versions (default 4)")
    parser.add_argument("--version-every", type=float, default=2.0, help="seconds between version bumps (default 2)")
    parser.add_argument(
        "--fresh-order",
        choices=["oldest", "newest"],
        default="newest",
        help="replay.fresh_order; 'newest' is the setting for free-running writers like these (default)",
    )
    parser.add_argument(
        "--kill-every", type=float, default=10.0, help="seconds between killing the writers' connections (0: never)"
    )
    parser.add_argument(
        "--lose-replies",
        type=float,
        default=0.02,
        help="fraction of acknowledged adds whose reply a writer drops and resends, same ids (default 0.02)",
    )
    parser.add_argument(
        "--memory-tolerance", type=float, default=1.1, help="last-third peak / middle-third peak allowed (default 1.1)"
    )
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds the learner may take to drain")
    parser.add_argument("--port", type=int, default=None, help="use the redis-server on 127.0.0.1:PORT")
    parser.add_argument("--seed", type=int, default=0)
    # The children's own options: this script started as a writer or the learner.
    parser.add_argument("--role", choices=["main", "writer", "learner"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--run-name", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--replay-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_seconds is None:
        args.baseline_seconds = max(5.0, args.seconds / 10)
    if args.writers < 1 or args.seconds <= 0 or args.capacity < args.add_batch:
        parser.error("need --writers >= 1, --seconds > 0 and --capacity >= --add-batch")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role != "main":
        cfg = RedisReplayConfig.model_validate_json(args.replay_json)
        out = run_writer(args, cfg) if args.role == "writer" else run_learner(args, cfg)
        print(json.dumps(out))
        return 0
    # A SIGTERM (a CI timeout) unwinds through the finally blocks: children killed, redis-server stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    server: Service | None = None
    root = Path(tempfile.mkdtemp(prefix="paceflow-soak-"))
    try:
        if args.port is None:
            server = start_redis()
        port = server.port if server is not None else args.port
        phases: dict[str, dict] = {}
        if args.baseline_seconds > 0:
            phases["baseline"] = run_phase("baseline", 1, args.baseline_seconds, args, port, root)
        phases["main"] = run_phase("main", args.writers, args.seconds, args, port, root)
    finally:
        if server is not None:
            server.stop()
        for path in sorted(root.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        root.rmdir()
    main_phase = phases["main"]
    invariants = {f"{p}.{k}": v for p, r in phases.items() for k, v in r["checks"].items()}
    invariants["main.memory_bounded"] = main_phase["memory"]["bounded"]
    base = phases.get("baseline", {}).get("throughput", {})
    result = {
        "machine": machine(),
        "options": {k: v for k, v in vars(args).items() if k not in CHILD_OPTIONS},
        "group_shape": f"{G} responses x {MIN_TOKENS}-{MAX_TOKENS} tokens + {MIN_PROMPT}-{MAX_PROMPT}-token prompt",
        "redis_pid": server.pid if server is not None else None,
        "phases": phases,
        "vs_baseline": {
            "groups_inserted_per_s": ratio(
                main_phase["throughput"]["groups_inserted_per_s"], base.get("groups_inserted_per_s", 0)
            ),
            "batches_sampled_per_s": ratio(
                main_phase["throughput"]["batches_sampled_per_s"], base.get("batches_sampled_per_s", 0)
            ),
        },
        "lost": sum(r["lost"] for r in phases.values()),
        "duplicated": sum(r["duplicated"] for r in phases.values()),
        "invariants": invariants,
        "ok": all(invariants.values()),
        "run_s": round(time.time() - started, 1),
    }
    print(json.dumps(result, indent=2))
    failed = [k for k, v in invariants.items() if not v]
    log("all invariants hold" if not failed else f"FAILED: {', '.join(failed)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
