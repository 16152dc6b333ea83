"""End-to-end pipeline throughput: `paceflow train` on the tiny preset with 1 and 2 rollout actors, async mode,
in the same run. Prints JSON.

    .venv/bin/python bench/pipeline.py            # 30 learner steps per setting
    .venv/bin/python bench/pipeline.py --steps 10

samples/s = trained responses per second of wall time after the first step (start-up excluded); the learner's
busy fraction = (time in compute and publishing) / wall time, its waiting fraction = (time waiting for the replay)
/ wall time; the rest is the driver's per-step round trip. With enough actors the learner should never wait
(target >= 90% busy).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import MODEL_CACHE


def run(actors: int, steps: int, out: Path) -> dict:
    from rich.console import Console

    from cluster.launch import train
    from configs.load import load_config

    cfg = load_config(
        "tiny_cpu",
        [
            f"model.cache_dir={MODEL_CACHE}",
            f"output_dir={out}",
            f"cluster.num_rollout_actors={actors}",
            f"learner.num_steps={steps}",
            "eval.every_steps=0",
        ],
    )
    summary = train(cfg, console=Console(file=sys.stderr))
    timed = summary.steps[1:]  # the first step includes actor start-up
    wall = timed[-1]["elapsed_s"] - summary.steps[0]["elapsed_s"]
    waited = sum(s["wait_s"] for s in timed)
    busy = sum(s["compute_s"] + s["publish_s"] for s in timed)
    return {
        "rollout_actors": actors,
        "steps": len(summary.steps),
        "samples_per_s": round(sum(s["rows"] for s in timed) / wall, 1),
        "tokens_per_s": round(sum(s["tokens"] for s in timed) / wall, 1),
        "learner_busy_fraction": round(busy / wall, 3),
        "learner_waiting_fraction": round(waited / wall, 3),
        "lag_mean": round(sum(s["lag_mean"] for s in timed) / len(timed), 2),
        "lag_max": max(s["lag_max"] for s in timed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(n, args.steps, Path(tmp) / f"a{n}") for n in (1, 2)]
    ray.shutdown()
    result = {
        "preset": "tiny_cpu",
        "results": rows,
        "samples_per_s_2_vs_1_actor": round(rows[1]["samples_per_s"] / rows[0]["samples_per_s"], 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
