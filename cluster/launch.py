"""`paceflow train`: start (or join) Ray, the replay, the prompt scheduler, N rollout actors and the learner,
then drive the learner step by step with a live progress display, periodic evaluation and a final checkpoint.

The whole config is seen only here; every component receives its own part. Rollout actors never wait for the
learner (async mode) unless `learner.sync` is set; the learner waits only while the replay is empty.
"""

from __future__ import annotations

import json
import math
import os
import shutil
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

    def __init__(
        self, cfg_json: str, model_dir: str, replay_server: Any, weights_root: str, resume: str | None = None
    ) -> None:
        from learner.loop import Learner
        from replay.store import connect_store

        cfg = RunConfig.model_validate_json(cfg_json)
        store = connect_store(cfg.replay, run_name=cfg.replay_namespace, server=replay_server)
        self.learner = Learner(cfg, Path(model_dir), store, weights_root=Path(weights_root))
        if resume:
            self.learner.load_checkpoint(Path(resume))
            if self.learner.version:  # the old weight files are gone: publish the restored weights again
                self.learner.publish(bump=False)

    def step_count(self) -> int:
        return self.learner.step_count

    def save_checkpoint(self, directory: str) -> None:
        self.learner.save_checkpoint(Path(directory))

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


def train(
    cfg: RunConfig, *, console: Console | None = None, max_steps: int | None = None, resume: Path | None = None
) -> TrainSummary:
    """Run (or with `resume`, continue) the experiment; `max_steps` caps the steps taken by this call."""
    import ray

    console = console or Console()
    checkpoint = None
    if resume is not None:
        checkpoint = Path(resume).expanduser() / "checkpoint"
        if not (checkpoint / "run.json").is_file():
            raise FileNotFoundError(f"--resume: {resume} has no checkpoint/run.json (is it a paceflow run directory?)")
        cfg = cfg.model_copy(update={"run_id": json.loads((checkpoint / "run.json").read_text())["run_id"]})
    elif cfg.run_id is None:
        cfg = cfg.model_copy(update={"run_id": time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]})
    run_dir = Path(cfg.output_dir).expanduser() / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    with console.status("Preparing the model..."):
        model_dir = resolve_model_dir(cfg.model)
    _start_ray(cfg)
    snapshot = checkpoint / "replay.msgpack" if checkpoint is not None else None
    server = (
        start_replay_server(
            cfg.replay,
            name=f"{cfg.replay_namespace}-replay",
            namespace=cfg.cluster.namespace,
            snapshot=snapshot if snapshot is not None and snapshot.is_file() else None,
        )
        if cfg.replay.kind == "memory"
        else None
    )
    store: ReplayStore = (
        RemoteStore(server) if server is not None else build_store(cfg.replay, run_name=cfg.replay_namespace)
    )
    weights_root = _weights_root(cfg)
    worker_json = cfg.to_worker_json()
    scheduler = start_scheduler_server(worker_json, server)
    if checkpoint is not None:
        ray.get(scheduler.restore.remote(json.loads((checkpoint / "scheduler.json").read_text())))
    learner_res = cfg.cluster.learner_resources
    learner = (
        ray.remote(LearnerServer)
        .options(num_cpus=learner_res.num_cpus, num_gpus=learner_res.num_gpus, resources=learner_res.custom or None)
        .remote(worker_json, str(model_dir), server, str(weights_root), str(checkpoint) if checkpoint else None)
    )
    done = ray.get(learner.step_count.remote())  # also waits for a resumed learner to re-publish its weights
    actors = [
        start_rollout_actor(f"rollout-{i}", cfg, model_dir, scheduler, server, seed=cfg.seed * 1000 + i)
        for i in range(cfg.cluster.num_rollout_actors)
    ]
    summary = TrainSummary(run_dir=run_dir)
    num_steps = min(cfg.learner.num_steps, done + (max_steps or cfg.learner.num_steps))
    console.print(
        f"[bold]paceflow train[/] {cfg.name}: {cfg.objective.kind} on {cfg.task.kind}, "
        f"{cfg.cluster.num_rollout_actors} rollout actor(s) ({cfg.rollout.engine.kind}), replay {cfg.replay.kind}, "
        f"{num_steps} steps -> {run_dir}"
    )
    try:
        _drive(
            cfg,
            learner,
            actors,
            store,
            summary,
            range(done + 1, num_steps + 1),
            console,
            lambda: _checkpoint(cfg, run_dir / "checkpoint", learner, scheduler, server),
        )
        _stop_actors(actors, summary)  # first, so the checkpoint holds every group they finished
        _checkpoint(cfg, run_dir / "checkpoint", learner, scheduler, server)
        summary.final_dir = Path(ray.get(learner.save_pretrained.remote(str(run_dir / "final"))))
        console.print(f"saved the policy to {summary.final_dir} (loads with transformers and vLLM)")
    finally:
        if not summary.actor_counters:
            _stop_actors(actors, summary)
        summary.replay_stats = asdict(store.stats())
        for handle in [*actors, learner, scheduler, *([server] if server is not None else [])]:
            ray.kill(handle)
        if str(weights_root).startswith("/dev/shm/"):  # the published versions only served this run's actors
            shutil.rmtree(weights_root, ignore_errors=True)
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


def _stop_actors(actors: list[Any], summary: TrainSummary) -> None:
    import ray

    for actor in actors:
        try:
            summary.actor_counters.append(ray.get(actor.stop.remote(), timeout=120))
        except Exception as exc:  # a dead actor must not hide the run's result
            summary.actor_counters.append({"error": f"{type(exc).__name__}: {exc}"})


def _checkpoint(cfg: RunConfig, directory: Path, learner: Any, scheduler: Any, server: Any) -> None:
    """Learner state, the in-process replay (Redis persists itself), the scheduler position and the run id,
    written next to the previous checkpoint and swapped in only when complete."""
    import ray

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ray.get(learner.save_checkpoint.remote(str(tmp)))
    if server is not None:
        ray.get(server.save.remote(str(tmp / "replay.msgpack")))
    (tmp / "scheduler.json").write_text(json.dumps(ray.get(scheduler.state.remote())))
    step = ray.get(learner.step_count.remote())
    (tmp / "run.json").write_text(json.dumps({"run_id": cfg.run_id, "step": step, "name": cfg.name}))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _drive(
    cfg: RunConfig,
    learner: Any,
    actors: list[Any],
    store: ReplayStore,
    summary: TrainSummary,
    steps: range,
    console: Console,
    checkpoint: Any,
) -> None:
    import ray

    metrics_path = summary.run_dir / "metrics.jsonl"
    started = time.perf_counter()
    mode = "a" if steps.start > 1 else "w"  # a resumed run continues the file
    with metrics_path.open(mode) as metrics_file, Live(console=console, refresh_per_second=4, transient=False) as live:
        num_steps = steps.stop - 1
        for step in steps:
            if cfg.learner.sync and step == num_steps:  # the actors make this step's batch, then stop cleanly
                ray.get([actor.finish_after.remote(step - 1) for actor in actors])
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
            if cfg.learner.checkpoint_every_steps and step % cfg.learner.checkpoint_every_steps == 0:
                checkpoint()
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
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")  # `ray job submit` sets RAY_ADDRESS
    if address:
        ray.init(address=address, namespace=cfg.cluster.namespace, log_to_driver=False)
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
    if cfg.cluster.address is None and not os.environ.get("RAY_ADDRESS") and Path("/dev/shm").is_dir():
        return Path("/dev/shm") / "paceflow" / cfg.replay_namespace
    return Path(cfg.output_dir).expanduser() / cfg.name / "weights" / cfg.replay_namespace
