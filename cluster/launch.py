"""`paceflow train`: start (or join) Ray, the replay, the prompt scheduler, N rollout actors and the learner,
then drive the learner step by step with a live progress display, periodic evaluation and a final checkpoint.

The whole config is seen only here; every component receives its own part. Rollout actors never wait for the
learner (async mode) unless `learner.sync` is set; the learner waits only while the replay is empty.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from actors.rollout_worker import start_rollout_actor
from actors.scheduler import start_scheduler_server
from cluster.models import resolve_model_dir
from configs.load import to_yaml
from configs.schema import RunConfig
from replay.remote import RemoteStore, start_replay_server
from replay.store import ReplayStore, build_store


class LearnerServer:
    """The learner as a Ray actor (placed with `cluster.learner_resources`); returns plain dicts."""

    def __init__(self, cfg_json: str, model_dir: str, replay_server: Any, weights_root: str) -> None:
        from learner.loop import Learner
        from replay.store import connect_store

        cfg = RunConfig.model_validate_json(cfg_json)
        store = connect_store(cfg.replay, run_name=cfg.replay_namespace, server=replay_server)
        self.learner = Learner(cfg, Path(model_dir), store, weights_root=Path(weights_root))

    def step(self, wait_timeout_s: float) -> dict[str, Any] | None:
        result = self.learner.step(wait_timeout_s=wait_timeout_s)
        return asdict(result) if result is not None else None

    def publish(self) -> int:
        self.learner.publish()
        return self.learner.version

    def save_pretrained(self, directory: str) -> str:
        self.learner.save_pretrained(Path(directory))
        return directory


@dataclass
class TrainSummary:
    run_dir: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    actor_counters: list[dict[str, Any]] = field(default_factory=list)
    final_dir: Path | None = None
    replay_stats: dict[str, Any] = field(default_factory=dict)


def train(cfg: RunConfig, *, console: Console | None = None, max_steps: int | None = None) -> TrainSummary:
    import ray

    console = console or Console()
    if cfg.run_id is None:
        cfg = cfg.model_copy(update={"run_id": time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]})
    run_dir = Path(cfg.output_dir).expanduser() / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    with console.status("Preparing the model..."):
        model_dir = resolve_model_dir(cfg.model)
    _start_ray(cfg)
    server = (
        start_replay_server(cfg.replay, name=f"{cfg.replay_namespace}-replay", namespace=cfg.cluster.namespace)
        if (cfg.replay.kind == "memory")
        else None
    )
    store: ReplayStore = (
        RemoteStore(server) if server is not None else build_store(cfg.replay, run_name=cfg.replay_namespace)
    )
    weights_root = _weights_root(cfg)
    worker_json = cfg.to_worker_json()
    scheduler = start_scheduler_server(worker_json, server)
    learner_res = cfg.cluster.learner_resources
    learner = (
        ray.remote(LearnerServer)
        .options(num_cpus=learner_res.num_cpus, num_gpus=learner_res.num_gpus, resources=learner_res.custom or None)
        .remote(worker_json, str(model_dir), server, str(weights_root))
    )
    actors = [
        start_rollout_actor(f"rollout-{i}", cfg, model_dir, scheduler, server, seed=cfg.seed * 1000 + i)
        for i in range(cfg.cluster.num_rollout_actors)
    ]
    summary = TrainSummary(run_dir=run_dir)
    num_steps = min(cfg.learner.num_steps, max_steps or cfg.learner.num_steps)
    console.print(
        f"[bold]paceflow train[/] {cfg.name}: {cfg.objective.kind} on {cfg.task.kind}, "
        f"{cfg.cluster.num_rollout_actors} rollout actor(s) ({cfg.rollout.engine.kind}), replay {cfg.replay.kind}, "
        f"{num_steps} steps -> {run_dir}"
    )
    try:
        _drive(cfg, learner, actors, store, summary, num_steps, console)
        summary.final_dir = Path(ray.get(learner.save_pretrained.remote(str(run_dir / "final"))))
        console.print(f"saved the policy to {summary.final_dir} (loads with transformers and vLLM)")
    finally:
        for actor in actors:
            try:
                summary.actor_counters.append(ray.get(actor.stop.remote(), timeout=120))
            except Exception as exc:  # a dead actor must not hide the run's result
                summary.actor_counters.append({"error": f"{type(exc).__name__}: {exc}"})
        summary.replay_stats = asdict(store.stats())
        for handle in [*actors, learner, scheduler, *([server] if server is not None else [])]:
            ray.kill(handle)
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "steps": summary.steps,
                "evals": summary.evals,
                "actors": summary.actor_counters,
                "replay": summary.replay_stats,
            },
            indent=2,
            default=str,
        )
    )
    return summary


def _drive(
    cfg: RunConfig,
    learner: Any,
    actors: list[Any],
    store: ReplayStore,
    summary: TrainSummary,
    num_steps: int,
    console: Console,
) -> None:
    import ray

    metrics_path = summary.run_dir / "metrics.jsonl"
    started = time.perf_counter()
    with metrics_path.open("w") as metrics_file, Live(console=console, refresh_per_second=4, transient=False) as live:
        for step in range(1, num_steps + 1):
            result = ray.get(learner.step.remote(600.0))
            if result is None:
                raise RuntimeError("the replay stayed empty for 600 s: are the rollout actors alive? see ray logs")
            elapsed = time.perf_counter() - started
            result["elapsed_s"] = elapsed
            summary.steps.append(result)
            result["samples_per_s"] = sum(r["rows"] for r in summary.steps) / elapsed
            result["tokens_per_s"] = sum(r["tokens"] for r in summary.steps) / elapsed
            metrics_file.write(json.dumps(result) + "\n")
            metrics_file.flush()
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                version = result["version"] if result["published"] else ray.get(learner.publish.remote())
                summary.evals.append(_evaluate(cfg, version, store, step))
            if step % cfg.metrics.log_every_steps == 0 or step == num_steps:
                live.update(_progress_table(result, num_steps, summary.evals))


def _progress_table(r: dict[str, Any], num_steps: int, evals: list[dict[str, Any]]) -> Table:
    table = Table(title=f"step {r['step']}/{num_steps}  weights v{r['version']}", show_header=True)
    for column in ("loss", "reward", "lag (mean/max)", "samples/s", "tokens/s", "learner wait", "grad norm", "eval"):
        table.add_column(column, justify="right")
    reward = "-" if math.isnan(r["reward_mean"]) else f"{r['reward_mean']:.3f}"
    last_eval = f"{evals[-1]['accuracy']:.3f}" if evals and evals[-1].get("accuracy") is not None else "-"
    table.add_row(
        f"{r['loss']:.4g}",
        reward,
        f"{r['lag_mean']:.2f}/{r['lag_max']}",
        f"{r['samples_per_s']:.1f}",
        f"{r['tokens_per_s']:.0f}",
        f"{r['wait_s']:.2f}s",
        f"{r['grad_norm']:.3g}",
        last_eval,
    )
    return table


def _evaluate(cfg: RunConfig, version: int, store: ReplayStore, step: int) -> dict[str, Any]:
    """Held-out accuracy of the newest weights (HF engine in the driver; avg@k over eval.num_samples)."""
    from cluster.evaluate import evaluate

    weights = store.latest_weights()
    result = evaluate(cfg, Path(weights.path) if weights else resolve_model_dir(cfg.model))
    return {"step": step, "version": version, **result}


def _start_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, namespace=cfg.cluster.namespace, log_to_driver=False)
        return
    # The embedded default: a local Ray sized to what the run asks for (logical CPUs may exceed the cores).
    asked = cfg.cluster.num_rollout_actors * cfg.cluster.rollout_resources.num_cpus
    asked += cfg.cluster.learner_resources.num_cpus
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(asked)),
        namespace=cfg.cluster.namespace,
        include_dashboard=False,
        log_to_driver=False,
    )


def _weights_root(cfg: RunConfig) -> Path:
    """Shared memory on one machine (fast, nothing on disk); the run directory when joining a cluster."""
    if cfg.cluster.address is None and Path("/dev/shm").is_dir():
        return Path("/dev/shm") / "paceflow" / cfg.replay_namespace
    return Path(cfg.output_dir).expanduser() / cfg.name / "weights" / cfg.replay_namespace
