"""Replay throughput and latency, against raw Redis on the same server in the same run. Prints JSON.

    .venv/bin/python bench/replay.py                 # 10k and 100k stored groups, Redis and in-process stores
    .venv/bin/python bench/replay.py --sizes 10000    # quicker
    .venv/bin/python bench/replay.py --profile --sizes 10000 --sample-batches 200   # where a sample's time goes

Each group is like a real one: 8 responses x 512 tokens (int32 ids, float32 behaviour log-probs), a 128-token
prompt. Writers add 64 groups per call (encoding included); the learner samples batches of 64 (decoding
included) with the default mix of 75% fresh and 25% prioritised groups. `raw_redis` is `redis-benchmark` SET/GET
with values of the same size, pipelined 16 deep, on the same server: the ceiling for what any Redis replay moves.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import machine
from cluster.services import start_redis
from configs.schema import MemoryReplayConfig, RedisReplayConfig
from replay.memory_store import MemoryStore
from replay.records import RolloutGroup, encode_group
from replay.redis_store import RedisStore

G, RESPONSE_TOKENS, PROMPT_TOKENS, BATCH = 8, 512, 128, 64


def make_groups(n: int, rng: np.random.Generator) -> list[RolloutGroup]:
    """n distinct groups that share a pool of token arrays (so building 100k of them costs no memory)."""
    tokens = [rng.integers(0, 50_000, RESPONSE_TOKENS).astype(np.int32) for _ in range(32)]
    logprobs = [(-rng.random(RESPONSE_TOKENS)).astype(np.float32) for _ in range(32)]
    prompt = rng.integers(0, 50_000, PROMPT_TOKENS).astype(np.int32)
    groups = []
    for i in range(n):
        picks = rng.integers(0, 32, G)
        groups.append(
            RolloutGroup(
                group_id=f"g{i:08d}",
                prompt_id=f"p{i % 5000}",
                prompt_token_ids=prompt,
                response_token_ids=[tokens[j] for j in picks],
                behaviour_logprobs=[logprobs[j] for j in picks],
                rewards=(rng.random(G) < 0.5).astype(np.float32),
                policy_version=0,
                actor_id="bench",
                created_at=time.time(),
                finish_reasons=["stop"] * G,
                parsed_answers=[None] * G,
            )
        )
    return groups


def bench_store(store: object, groups: list[RolloutGroup], rng: np.random.Generator, sample_batches: int) -> dict:
    start = time.perf_counter()
    for i in range(0, len(groups), BATCH):
        chunk = groups[i : i + BATCH]
        store.add(chunk, rng.random(len(chunk)).tolist())  # type: ignore[attr-defined]
    add_s = time.perf_counter() - start
    latencies = []
    start = time.perf_counter()
    for i in range(sample_batches):
        t = time.perf_counter()
        batch = store.sample(BATCH, seed=i)  # type: ignore[attr-defined]
        latencies.append(time.perf_counter() - t)
        assert len(batch.groups) == BATCH
    sample_s = time.perf_counter() - start
    lat_ms = np.array(latencies) * 1000
    return {
        "stored_groups": len(store),  # type: ignore[arg-type]
        "add_groups_per_s": round(len(groups) / add_s),
        "sample_batches_per_s": round(sample_batches / sample_s, 1),
        "sample_groups_per_s": round(sample_batches * BATCH / sample_s),
        "sample_latency_ms_p50": round(float(np.percentile(lat_ms, 50)), 2),
        "sample_latency_ms_p99": round(float(np.percentile(lat_ms, 99)), 2),
    }


def profile_sampling(groups: list[RolloutGroup], rng: np.random.Generator, batches: int) -> None:
    """Where a sample's time goes: the in-process store's draw and decode, the functions by own time."""
    import cProfile
    import pstats

    store = MemoryStore(MemoryReplayConfig(capacity=len(groups)))
    for i in range(0, len(groups), BATCH):
        chunk = groups[i : i + BATCH]
        store.add(chunk, rng.random(len(chunk)).tolist())
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(batches):
        store.sample(BATCH, seed=i)
    profiler.disable()
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(12)


def raw_redis(port: int, value_bytes: int) -> dict:
    out = subprocess.run(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-t",
            "set,get",
            "-n",
            "20000",
            "-d",
            str(value_bytes),
            "-P",
            "16",
            "-c",
            "4",
            "--csv",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rates = {}
    for line in out.splitlines()[1:]:
        cells = [c.strip('"') for c in line.split(",")]
        rates[cells[0].lower() + "_ops_per_s"] = round(float(cells[1]))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="stored groups")
    parser.add_argument("--backends", nargs="+", default=["redis", "memory"], choices=["redis", "memory"])
    parser.add_argument("--sample-batches", type=int, default=500, help="batches of 64 sampled per size")
    parser.add_argument("--profile", action="store_true", help="cProfile the in-process sample (to stderr) and exit")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.profile:
        profile_sampling(make_groups(args.sizes[0], rng), rng, args.sample_batches)
        return
    record_bytes = len(encode_group(make_groups(1, rng)[0]))
    result: dict = {
        "machine": machine(),
        "record_bytes": record_bytes,
        "group_shape": f"{G} x {RESPONSE_TOKENS} tokens + {PROMPT_TOKENS}-token prompt",
        "batch_groups": BATCH,
        "results": [],
    }
    with start_redis() as server:
        result["raw_redis"] = raw_redis(server.port, record_bytes)
        for size in args.sizes:
            groups = make_groups(size, rng)
            for backend in args.backends:
                if backend == "redis":
                    server_cfg = RedisReplayConfig(port=server.port, capacity=size)
                    store: object = RedisStore(server_cfg, run_name=f"bench{size}")
                    store.clear()  # type: ignore[attr-defined]
                else:
                    store = MemoryStore(MemoryReplayConfig(capacity=size))
                row = {"backend": backend, **bench_store(store, groups, rng, args.sample_batches)}
                if backend == "redis":
                    raw = result["raw_redis"]
                    row["add_vs_raw_set"] = round(row["add_groups_per_s"] / raw["set_ops_per_s"], 3)
                    row["sample_vs_raw_get"] = round(row["sample_groups_per_s"] / raw["get_ops_per_s"], 3)
                    store.clear()  # type: ignore[attr-defined]
                result["results"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                del store
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
