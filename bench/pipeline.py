"""End-to-end pipeline throughput: `paceflow train` in asynchronous mode with 1 and with 2 rollout actors, on the
tiny model and on SmolLM2-135M (the smollm2_cpu preset with learner.sync=false), each setting in the same run.
Prints JSON.

    .venv/bin/python bench/pipeline.py                          # both presets, 1 and 2 actors
    .venv/bin/python bench/pipeline.py --presets tiny_cpu --steps 10

Per setting, over the wall time after the first learner step (start-up excluded):
- completions_per_s: responses the actors generated; trained_per_s: responses the learner trained on;
- learner_tokens_per_s: tokens in the learner's batches;
- learner_busy_fraction: (compute + publishing) / wall; learner_waiting_fraction: waiting for the replay / wall;
- actor_idle_fraction: time the actors waited (rollout.max_ahead_batches, the rate limit) / (actors x wall);
- drawn_fraction: of the groups whose fate is settled, the share a batch drew before they went stale (the rate
  limiter's target: >= 0.9 at the default setting);
- lag_mean / lag_max: policy lag of the trained responses.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import MODEL_CACHE, machine, stdout_to_stderr

STEPS = {"tiny_cpu": 30, "smollm2_cpu": 8}


def run(preset: str, actors: int, steps: int, out: Path) -> dict:
    from rich.console import Console

    from cluster.launch import train
    from configs.load import load_config

    cfg = load_config(
        preset,
        [
            f"model.cache_dir={MODEL_CACHE}",
            f"output_dir={out}",
            f"cluster.num_rollout_actors={actors}",
            f"learner.num_steps={steps}",
            "learner.sync=false",
            "eval.every_steps=0",
        ],
    )
    summary = train(cfg, console=Console(file=sys.stderr))
    timed = summary.steps[1:]  # the first step includes actor start-up
    wall = timed[-1]["elapsed_s"] - summary.steps[0]["elapsed_s"]
    busy = sum(s["compute_s"] + s["publish_s"] for s in timed)
    counters = summary.actor_counters
    stats = summary.replay_stats
    settled = stats.get("inserted", 0) - stats.get("fresh", 0)
    return {
        "preset": preset,
        "rollout_actors": actors,
        "steps": len(summary.steps),
        "wall_s": round(wall, 1),
        "completions_per_s": round(sum(c["responses"] for c in counters) / timed[-1]["elapsed_s"], 2),
        "trained_per_s": round(sum(s["rows"] for s in timed) / wall, 2),
        "learner_tokens_per_s": round(sum(s["tokens"] for s in timed) / wall, 1),
        "learner_busy_fraction": round(busy / wall, 3),
        "learner_waiting_fraction": round(sum(s["wait_s"] for s in timed) / wall, 3),
        "actor_idle_fraction": round(sum(c["wait_s"] for c in counters) / (len(counters) * timed[-1]["elapsed_s"]), 3),
        "actor_generate_fraction": round(
            sum(c["generate_s"] for c in counters) / (len(counters) * timed[-1]["elapsed_s"]), 3
        ),
        "groups_inserted": stats.get("inserted", 0),
        "groups_evicted_unsampled": stats.get("evicted_unsampled", 0),
        "drawn_fraction": round((settled - stats.get("evicted_unsampled", 0)) / settled, 3) if settled > 0 else 1.0,
        "lag_mean": round(sum(s["lag_mean"] for s in timed) / len(timed), 2),
        "lag_max": max(s["lag_max"] for s in timed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--actors", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=None, help="learner steps per setting (default: per preset)")
    args = parser.parse_args()
    import ray

    rows = []
    with stdout_to_stderr(), tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        for preset in args.presets:
            for n in args.actors:
                rows.append(run(preset, n, args.steps or STEPS[preset], Path(tmp) / f"{preset}-a{n}"))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        ray.shutdown()
    print(json.dumps({"machine": machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
