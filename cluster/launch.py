"""`paceflow train`: start (or join) Ray, the replay, the prompt scheduler, N rollout actors, the learner and a
held-out evaluator, then drive the learner step by step with a live progress display, evaluations before,
during and after training, checkpoints, and at the end the run's plots and markdown report.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from actors.rollout_worker import start_rollout_actor
from actors.scheduler import start_scheduler_server
from actors.tasks import Prompt, build_task, drop_long_prompts, encode_prompts
from cluster.control import start_control
from cluster.evaluate import estimates_to_json, pick_engine, results_from_json, start_evaluator, summarize
from cluster.metrics import MetricsServer, Poller, RunMetrics
from cluster.models import resolve_model_dir
from configs.load import to_yaml
from configs.schema import RunConfig
from learner.server import start_learner
from replay.remote import RemoteStore, start_replay_server
from replay.store import ReplayStore, build_store
from replay.weight_store import start_weight_store


@dataclass
class TrainSummary:
    run_dir: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Per evaluation: step, rollouts so far and every metric with its 95% CI (per-prompt results: evals.jsonl)."""
    actor_counters: list[dict[str, Any]] = field(default_factory=list)
    final_dir: Path | None = None
    replay_stats: dict[str, Any] = field(default_factory=dict)
    report: Path | None = None


def train(
    cfg: RunConfig,
    *,
    console: Console | None = None,
    max_steps: int | None = None,
    resume: Path | None = None,
    command: str | None = None,
) -> TrainSummary:
    """Run (or with `resume`, continue) the experiment; `max_steps` caps the steps taken by this call. `command`
    (the command line that started the run) goes into the report."""
    import ray

    console = console or Console()
    cfg, checkpoint = _run_identity(cfg, resume)
    cfg = resolve_weight_transport(resolve_replay_host(cfg))
    run_dir = Path(cfg.output_dir).expanduser() / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    cfg = resolve_replay_password(cfg)  # after config.yaml: only the variable or file name is ever written
    with console.status("Preparing the model and the task..."):
        model_dir = resolve_model_dir(cfg.model)
        task = build_task(cfg.task)
        drop_long_prompts(task, model_dir, cfg.tokenizer)
    console.print(f"task {task.name}: {len(task.train)} training / {len(task.eval)} held-out prompts")
    if task.skipped_rows:
        console.print(f"[yellow]warning[/] skipped {task.skipped_rows} malformed rows: {'; '.join(task.skip_reasons)}")
    for note in task.warnings:
        console.print(f"[yellow]warning[/] {note}")
    with console.status("Starting Ray, the replay, the learner, the rollout actors and the evaluator..."):
        run = start_processes(cfg, model_dir, task.train, checkpoint, run_dir)
    _warn_if_unschedulable(cfg, console)
    summary = TrainSummary(run_dir=run_dir)
    num_steps = min(cfg.learner.num_steps, run.steps_done + (max_steps or cfg.learner.num_steps))
    console.print(
        f"[bold]paceflow train[/] {cfg.name}: {cfg.objective.kind} on {cfg.task.kind}, "
        f"{cfg.cluster.num_rollout_actors} rollout actor(s) ({cfg.rollout.engine.kind}), replay {cfg.replay.kind}, "
        f"{num_steps} steps -> {run_dir}"
    )
    metrics = RunMetrics(cfg.name)
    poller = Poller(cfg.metrics.poll_s, lambda: _poll(run, metrics))  # one read of actors and replay for all
    exporter = _serve_metrics(cfg, metrics, run_dir, console)
    try:
        with RunRecorder(cfg, run_dir, run.store, resumed_at=run.steps_done, metrics=metrics) as recorder:
            steps = range(run.steps_done + 1, num_steps + 1)
            _drive(cfg, run, recorder, metrics, steps, console, run_dir / "checkpoint", summary)
        summary.steps, summary.evals = recorder.steps, recorder.evals
        _stop_actors(run.actors, summary)  # first, so the checkpoint holds every group they finished
        _checkpoint(cfg, run, run_dir / "checkpoint", console)
        summary.final_dir = Path(ray.get(run.learner.save_pretrained.remote(str(run_dir / "final"))))
        console.print(f"saved the policy to {summary.final_dir} (loads with transformers and vLLM)")
    finally:
        if not summary.actor_counters:
            _stop_actors(run.actors, summary)
        summary.replay_stats = asdict(run.store.stats())
        poller.close()
        if exporter is not None:
            exporter.close()
        run.stop()
        _write_summary(summary, command)
    summary.report = _report(summary, console)
    return summary


def _poll(run: RunProcesses, metrics: RunMetrics) -> None:
    """Every actor's counters and the replay's statistics, for the endpoint and for `paceflow status`."""
    import ray

    metrics.observe_actors(ray.get([a.counters.remote() for a in list(run.actors)], timeout=30))
    metrics.observe_replay(asdict(run.store.stats()))


def _serve_metrics(cfg: RunConfig, metrics: RunMetrics, run_dir: Path, console: Console) -> MetricsServer | None:
    """The run's Prometheus endpoint (cluster/metrics.py), unless metrics.enabled is off."""
    if not cfg.metrics.enabled:
        return None
    exporter = MetricsServer(cfg.metrics, metrics)
    (run_dir / "metrics_url.txt").write_text(exporter.url + "\n")
    console.print(f"metrics: {exporter.url} (Prometheus; dashboards in cluster/grafana/)")
    return exporter


def _run_identity(cfg: RunConfig, resume: Path | None) -> tuple[RunConfig, Path | None]:
    """The run id (a resumed run keeps its own, so it finds its Redis keys) and the checkpoint to resume from."""
    if resume is None:
        if cfg.run_id is None:
            cfg = cfg.model_copy(update={"run_id": time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]})
        return cfg, None
    checkpoint = Path(resume).expanduser() / "checkpoint"
    if not (checkpoint / "run.json").is_file():
        raise FileNotFoundError(f"--resume: {resume} has no checkpoint/run.json (is it a paceflow run directory?)")
    saved = checkpoint / "config.yaml"  # checkpoints before this file existed: the run's own config.yaml
    check_resumable(cfg, saved if saved.is_file() else checkpoint.parent / "config.yaml")
    return cfg.model_copy(update={"run_id": json.loads((checkpoint / "run.json").read_text())["run_id"]}), checkpoint


RESUME_MUST_MATCH = ("model.", "tokenizer.", "task.", "objective.kind", "learner.dtype", "learner.deepspeed.zero_stage")
"""Config fields a checkpoint is bound to (its weights, optimizer layout, log Z per prompt id); the others (steps,
learning rate, evaluation, actors) may change on --resume."""


def check_resumable(cfg: RunConfig, saved_config: Path) -> None:
    """Refuse, naming each field and both values, to resume a checkpoint with a config of another model, task or
    objective: its weights would not load, or would load and train on prompts its log Z never saw."""
    if not saved_config.is_file():
        return
    from configs.load import read_yaml

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, sub in node.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    before, now = flat(read_yaml(saved_config)), flat(json.loads(cfg.model_dump_json()))
    bound = [k for k in sorted(set(before) | set(now)) if k.startswith(RESUME_MUST_MATCH) and k != "model.cache_dir"]
    differ = [
        f"{k}: checkpoint {before.get(k)!r}, this config {now.get(k)!r}" for k in bound if before.get(k) != now.get(k)
    ]
    if differ:
        raise ValueError(
            f"--resume: the checkpoint in {saved_config.parent} was trained with another config; these fields "
            "must match to resume it:\n  " + "\n  ".join(differ) + "\nStart a new run (another name or output_dir) "
            "to train with these settings."
        )


def resolve_replay_host(cfg: RunConfig) -> RunConfig:
    """replay.host 'auto' -> this machine's address as the other nodes see it (Ray's own choice of node IP)."""
    if cfg.replay.kind != "redis" or cfg.replay.host != "auto":
        return cfg
    import ray

    replay = cfg.replay.model_copy(update={"host": ray.util.get_node_ip_address()})
    return cfg.model_copy(update={"replay": replay})


def resolve_replay_password(cfg: RunConfig) -> RunConfig:
    """replay.password_env / password_file -> the password itself, read once here, where `paceflow train` runs.
    The run's workers get it in memory with their config section (masked in anything printed or saved), so the
    variable need only be set in this process's environment, not on every node."""
    replay = cfg.replay
    if replay.kind != "redis" or (replay.password_env is None and replay.password_file is None):
        return cfg
    from pydantic import SecretStr

    from replay.redis_store import resolve_password

    secret = SecretStr(resolve_password(replay) or "")
    resolved = replay.model_copy(update={"password": secret, "password_env": None, "password_file": None})
    return cfg.model_copy(update={"replay": resolved})


def resolve_weight_transport(cfg: RunConfig) -> RunConfig:
    """cluster.weight_transport 'auto' -> object_store when the run joins a cluster (its nodes share no path),
    shared_memory on one machine (the fastest hand-over; a directory per version where there is no /dev/shm);
    cluster.weight_broadcast_host 'auto' -> the learner node's address on a cluster, loopback on one machine."""
    joins = cfg.cluster.address is not None or bool(os.environ.get("RAY_ADDRESS"))
    update: dict[str, str] = {}
    if cfg.cluster.weight_transport == "auto":
        local = "shared_memory" if Path("/dev/shm").is_dir() else "filesystem"
        update["weight_transport"] = "object_store" if joins else local
    if cfg.cluster.weight_broadcast_host == "auto":  # loopback unless other nodes must reach the learner
        update["weight_broadcast_host"] = "node" if joins else "127.0.0.1"
    return cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update=update)}) if update else cfg


@dataclass
class RunProcesses:
    """The run's Ray actors and its view of the replay."""

    store: ReplayStore
    server: Any
    """The Ray-hosted in-process replay (None with Redis)."""
    scheduler: Any
    learner: Any
    actors: list[Any]
    evaluator: Any
    """None when evaluation is off."""
    weights_root: Path
    steps_done: int
    """Learner steps already taken (a resumed run)."""
    model_dir: Path
    control: Any
    """The run's RunControl (cluster/control.py): `paceflow scale`, `status` and `stop` talk to it."""
    started_actors: int = 0
    """Rollout actors started so far (new ones get the next index, so ids are never reused)."""
    weight_store: Any = None
    """The run's WeightStore actor (cluster.weight_transport: object_store)."""

    def start_actor(self, cfg: RunConfig) -> None:
        i = self.started_actors
        self.actors.append(
            start_rollout_actor(
                f"rollout-{i}", cfg, self.model_dir, self.scheduler, self.server, seed=cfg.seed * 1000 + i
            )
        )
        self.started_actors += 1

    def rescale(self, cfg: RunConfig, want: int, summary: TrainSummary) -> None:
        """Start or stop rollout actors to the count `paceflow scale` asked for. A stopped actor finishes its
        current step first, so every group it made is in the replay; its counters go into the summary."""
        import ray

        while len(self.actors) < want:
            self.start_actor(cfg)
        if len(self.actors) > want:
            leaving, self.actors[:] = self.actors[want:], self.actors[:want]
            _stop_actors(leaving, summary)
            for actor in leaving:
                ray.kill(actor)

    def stop(self) -> None:
        import ray

        handles = [*self.actors, self.learner, self.scheduler, self.server, self.evaluator, self.control]
        for handle in [*handles, self.weight_store]:
            if handle is not None:
                ray.kill(handle)
        if str(self.weights_root).startswith("/dev/shm/"):  # the published versions only served this run's actors
            shutil.rmtree(self.weights_root, ignore_errors=True)


def start_processes(
    cfg: RunConfig, model_dir: Path, train_prompts: Sequence[Prompt], checkpoint: Path | None, run_dir: Path
) -> RunProcesses:
    """Ray, then the run's control actor (control.json in `run_dir`), the replay, the prompt scheduler, the
    learner, the rollout actors and the evaluator, each built from its own part of the config (restored from
    `checkpoint` when resuming)."""
    import ray

    _start_ray(cfg)
    snapshot = checkpoint / "replay.msgpack" if checkpoint is not None else None
    server = None
    if cfg.replay.kind == "memory":
        server = start_replay_server(
            cfg.replay,
            name=f"{cfg.replay_namespace}-replay",
            namespace=cfg.cluster.namespace,
            snapshot=snapshot if snapshot is not None and snapshot.is_file() else None,
        )
    store = RemoteStore(server) if server is not None else build_store(cfg.replay, run_name=cfg.replay_namespace)
    # One run per replay prefix: another run's keys (a reused run_id, a name that collides) are an error, not data.
    identity = {"name": cfg.name, "run_id": cfg.run_id or "", "run_dir": str(run_dir.resolve())}
    try:
        store.claim({**identity, "objective": cfg.objective.kind})
    except ValueError:
        if server is not None:
            ray.kill(server)
        raise
    control = start_control(
        run_dir,
        name=f"{cfg.replay_namespace}-control",
        namespace=cfg.cluster.namespace,
        actors=cfg.cluster.num_rollout_actors,
        sync=cfg.learner.sync,
    )
    weights_root = _weights_root(cfg)
    scheduler = start_scheduler_server(cfg, [p.prompt_id for p in train_prompts], server)
    if checkpoint is not None:
        ray.get(scheduler.restore.remote(json.loads((checkpoint / "scheduler.json").read_text())))
    weight_store = None
    if cfg.cluster.weight_transport == "object_store":
        weight_store = start_weight_store(cfg.weight_store_name, cfg.cluster.namespace)
    prompts = encode_prompts(model_dir, train_prompts, cfg.tokenizer) if cfg.objective.kind == "paced" else None
    learner = start_learner(cfg, model_dir, server, weights_root, prompts=prompts, resume=checkpoint)
    done = ray.get(learner.step_count.remote())  # also waits for a resumed learner to re-publish its weights
    evaluator = start_evaluator(cfg, model_dir, pick_engine(cfg.rollout.engine.kind)) if cfg.eval.every_steps else None
    run = RunProcesses(store, server, scheduler, learner, [], evaluator, weights_root, done, model_dir, control)
    run.weight_store = weight_store
    for _ in range(cfg.cluster.num_rollout_actors):
        run.start_actor(cfg)
    return run


def _write_summary(summary: TrainSummary, command: str | None) -> None:
    (summary.run_dir / "summary.json").write_text(
        json.dumps(
            {
                "command": command,
                "steps": summary.steps,
                "evals": summary.evals,
                "actors": summary.actor_counters,
                "replay": summary.replay_stats,
            },
            indent=2,
            default=str,
        )
    )


def _report(summary: TrainSummary, console: Console) -> Path | None:
    """Plots and report.md; the before/after table on the console. A failed plot never fails the run."""
    from cluster.report import before_after_table, read_evals, write_report

    evals = read_evals(summary.run_dir)
    if len(evals) >= 2:
        console.print(before_after_table(evals[0], evals[-1], f"Held-out, {summary.run_dir.name}"))
    try:
        report = write_report(summary.run_dir)
    except Exception as exc:  # the run itself succeeded; say what went wrong with its report
        console.print(f"[yellow]could not write the report[/]: {type(exc).__name__}: {exc}")
        return None
    console.print(f"report: {report} (plots beside it)")
    return report


class RunRecorder:
    """The run's files, one line per event: metrics.jsonl (steps), calibration.jsonl (PACED-RL's fresh groups)
    and evals.jsonl (held-out evaluations with per-prompt results). A run resumed at step `resumed_at` keeps the
    rows up to that step and drops later ones: a run that crashed after its last checkpoint redoes those steps,
    and each step must appear once."""

    FILES = ("metrics", "calibration", "evals")

    def __init__(
        self, cfg: RunConfig, run_dir: Path, store: ReplayStore, *, resumed_at: int, metrics: RunMetrics
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        if resumed_at:
            for name in self.FILES:
                _keep_rows_up_to(run_dir / f"{name}.jsonl", resumed_at)
        mode = "a" if resumed_at else "w"
        self._files: dict[str, IO[str]] = {name: (run_dir / f"{name}.jsonl").open(mode) for name in self.FILES}
        self.steps: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files.values():
            f.close()

    def rollouts(self) -> int:
        """Responses generated so far (groups that entered the main table x G)."""
        return self.store.stats().inserted * self.cfg.rollout.sampling.num_samples

    def step(self, result: dict[str, Any]) -> dict[str, Any]:
        for prompt_id, estimate, accuracy, samples, selection in result.pop("calibration", []):
            row = {"step": result["step"], "prompt_id": prompt_id, "estimate": estimate, "accuracy": accuracy}
            self._write("calibration", {**row, "samples": samples, "selection": selection})
        elapsed = time.perf_counter() - self.started
        self.steps.append(result)
        result["elapsed_s"] = elapsed
        result["samples_per_s"] = sum(r["rows"] for r in self.steps) / elapsed
        result["tokens_per_s"] = sum(r["tokens"] for r in self.steps) / elapsed
        result["rollouts"] = self.rollouts()
        self._write("metrics", result)
        self.metrics.observe_step(result)
        return result

    def evaluation(self, step: int, version: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        samples = len(rows[0]["rewards"]) if rows else 0
        metrics = summarize(results_from_json(rows), (1, samples) if samples > 1 else (1,))
        record = {
            "step": step,
            "version": version,
            "rollouts": self.rollouts() if step else 0,  # the baseline has learned from none
            "elapsed_s": time.perf_counter() - self.started,
            "prompts": len(rows),
            "samples": samples,
            "metrics": estimates_to_json(metrics),
        }
        self._write("evals", {**record, "per_prompt": rows})
        self.evals.append(record)
        self.metrics.observe_eval(record)
        return record

    def _write(self, name: str, row: dict[str, Any]) -> None:
        self._files[name].write(json.dumps(row) + "\n")
        self._files[name].flush()


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the JSON lines of `path` whose step is after `step` (and a torn last line), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line a crash cut short
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _stop_actors(actors: list[Any], summary: TrainSummary) -> None:
    import ray

    for actor in actors:
        try:
            summary.actor_counters.append(ray.get(actor.stop.remote(), timeout=120))
        except Exception as exc:  # a dead actor must not hide the run's result
            summary.actor_counters.append({"error": f"{type(exc).__name__}: {exc}"})


def _checkpoint(cfg: RunConfig, run: RunProcesses, directory: Path, console: Console) -> bool:
    """Learner state, the in-process replay (Redis persists itself), the scheduler position, the config and the run
    id, written to `<directory>-<step>` and then made current by atomically replacing the `directory` symlink, so a
    crash at any moment leaves a complete checkpoint behind. A write that fails (a full disk) is reported, its
    partial files removed, and the run goes on with the previous checkpoint intact; False then."""
    import ray

    step = ray.get(run.learner.step_count.remote())
    target = directory.with_name(f"{directory.name}-{step:06d}")
    if directory.is_symlink() and directory.resolve() == target.resolve():
        return True  # this step is checkpointed already (the run's last step on a checkpoint_every_steps boundary)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        ray.get(run.learner.save_checkpoint.remote(str(tmp)))
        if run.server is not None:
            ray.get(run.server.save.remote(str(tmp / "replay.msgpack")))
        (tmp / "scheduler.json").write_text(json.dumps(ray.get(run.scheduler.state.remote())))
        (tmp / "config.yaml").write_text(to_yaml(cfg))  # what --resume checks a config against (secrets masked)
        (tmp / "run.json").write_text(json.dumps({"run_id": cfg.run_id, "step": step, "name": cfg.name}))
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    except OSError as exc:  # Ray re-raises a worker's OSError as one, so a learner-side ENOSPC lands here too
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the checkpoint of step {_checkpoint_step(directory)} is intact" if directory.exists() else "none"
        console.print(
            f"[red]checkpoint of step {step} failed[/] ({type(exc).__name__}: {exc}); {kept}; training goes on"
        )
        return False
    if directory.exists() and not directory.is_symlink():  # a run directory from before checkpoints were symlinks
        os.rename(directory, directory.with_name(f"{directory.name}-{_checkpoint_step(directory):06d}"))
    link = directory.with_name(directory.name + ".link")
    link.unlink(missing_ok=True)
    os.symlink(target.name, link)
    os.replace(link, directory)  # the atomic step: resume now finds this checkpoint
    for old in directory.parent.glob(f"{directory.name}-*"):
        if old.is_dir() and old.resolve() != target.resolve():
            shutil.rmtree(old, ignore_errors=True)
    return True


def _checkpoint_step(directory: Path) -> int:
    return int(json.loads((directory / "run.json").read_text())["step"])


def _drive(
    cfg: RunConfig,
    run: RunProcesses,
    recorder: RunRecorder,
    metrics: RunMetrics,
    steps: range,
    console: Console,
    checkpoint_dir: Path,
    summary: TrainSummary,
) -> None:
    """The learner's steps, one at a time, with evaluations, checkpoints, the live display, the actor count that
    `paceflow scale` asks for and the snapshot `paceflow status` shows."""
    import ray

    learner, actors, evaluator, store = run.learner, run.actors, run.evaluator, run.store
    num_steps = steps.stop - 1

    def evaluate(step: int, version: int, weights: str | None) -> None:
        e = cfg.eval
        with console.status(f"Evaluating step {step} on {e.num_prompts} held-out prompts x {e.num_samples}..."):
            rows = ray.get(evaluator.evaluate.remote(weights, e.num_prompts, e.num_samples, e.temperature, version))
        recorder.evaluation(step, version, rows)

    if evaluator is not None and steps.start == 1:  # the baseline every later evaluation is compared with
        evaluate(0, 0, None)
    with Live(console=console, refresh_per_second=2, transient=False) as live:
        for step in steps:
            if cfg.learner.sync and step == num_steps:  # the actors make this step's batch, then stop cleanly
                ray.get([actor.finish_after.remote(step - 1) for actor in actors])
            result = ray.get(learner.step.remote(600.0))
            if result is None:
                raise RuntimeError("the replay stayed empty for 600 s: are the rollout actors alive? see ray logs")
            recorder.step(result)
            if evaluator is not None and (step % cfg.eval.every_steps == 0 or step == num_steps):
                version = result["version"] if result["published"] else ray.get(learner.publish.remote())
                weights = store.latest_weights()
                live.update(_progress(recorder, num_steps, cfg))
                evaluate(step, version, weights.path if weights is not None else None)
            if cfg.learner.checkpoint_every_steps and step % cfg.learner.checkpoint_every_steps == 0:
                _checkpoint(cfg, run, checkpoint_dir, console)
            if step % cfg.metrics.log_every_steps == 0 or step == num_steps:
                live.update(_progress(recorder, num_steps, cfg))
            _publish_status(cfg, run, recorder, metrics, num_steps)
            asked = ray.get(run.control.requests.remote())
            if asked["stop"]:
                console.print(f"stopping after step {step} as asked (paceflow stop); resume with --resume")
                break
            if step < num_steps:
                run.rescale(cfg, int(asked["actors"]), summary)
    console.print()


def _publish_status(
    cfg: RunConfig, run: RunProcesses, recorder: RunRecorder, metrics: RunMetrics, num_steps: int
) -> None:
    """What `paceflow status` shows: the last step, and the actors and replay as last polled."""
    r = recorder.steps[-1]
    actors, replay = metrics.latest()
    status = {
        "name": cfg.name,
        "step": r["step"],
        "num_steps": num_steps,
        "version": r["version"],
        "elapsed_s": r["elapsed_s"],
        "loss": r["loss"],
        "reward": r["reward_mean"],
        "lag_mean": r["lag_mean"],
        "lag_max": r["lag_max"],
        "step_s": r["compute_s"] + r["publish_s"],
        "wait_s": r["wait_s"],
        "samples_per_s": r["samples_per_s"],
        "tokens_per_s": r["tokens_per_s"],
        "actors": actors,
        "replay": replay,
    }
    run.control.publish_status.remote(status)


def _progress(recorder: RunRecorder, num_steps: int, cfg: RunConfig) -> Group:
    """The live display: where the run is, and the last step's numbers (fits an 80-column terminal)."""
    r = recorder.steps[-1]
    per_step = r["elapsed_s"] / max(1, len(recorder.steps))
    eta = per_step * (num_steps - r["step"])
    header = (
        f"[bold]step {r['step']}/{num_steps}[/]  weights v{r['version']}  "
        f"{_duration(r['elapsed_s'])} elapsed, ~{_duration(eta)} to go  {r['rollouts']} responses generated"
    )
    table = Table(show_header=True, box=None, padding=(0, 1))
    columns = {
        "loss": f"{r['loss']:.4g}",
        "reward": "-" if math.isnan(r["reward_mean"]) else f"{r['reward_mean']:.3f}",
        "lag": f"{r['lag_mean']:.1f}/{r['lag_max']}",
        "samples/s": f"{r['samples_per_s']:.1f}",
        "wait": f"{r['wait_s']:.1f}s",
    }
    m = r["metrics"]
    if "calib_mae" in m:
        const = m.get("calib_mae_const", math.nan)
        columns["|a(x)-acc|"] = f"{m['calib_mae']:.3f}" + ("" if math.isnan(const) else f" ({const:.3f})")
    if recorder.evals:
        e = recorder.evals[-1]
        name = f"avg@{e['samples']}"
        est = e["metrics"].get(name) or {}
        if est.get("mean") is not None:
            columns[f"held-out {name}"] = f"{est['mean']:.3f}±{(est['high'] - est['low']) / 2:.3f} @{e['step']}"
    for name in columns:
        table.add_column(name, justify="right")
    table.add_row(*columns.values())
    return Group(header, table)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _warn_if_unschedulable(cfg: RunConfig, console: Console) -> None:
    """A run that asks Ray for more CPUs than the cluster has waits for actors that never start; say so now
    (an autoscaling cluster may still add nodes, so this is a warning, not an error)."""
    import ray

    c = cfg.cluster
    asked = c.learner_resources.num_cpus + c.num_rollout_actors * c.rollout_resources.num_cpus
    have = ray.cluster_resources().get("CPU", 0.0)
    if asked > have:
        console.print(
            f"[yellow]warning[/] the run asks Ray for {asked:g} CPUs (learner {c.learner_resources.num_cpus:g} + "
            f"{c.num_rollout_actors} x rollout {c.rollout_resources.num_cpus:g}) but the cluster has {have:g}: "
            "actors that do not fit wait until resources appear. Lower cluster.*_resources.num_cpus or add nodes."
        )


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
    if cfg.cluster.weight_transport == "shared_memory" or (
        cfg.cluster.address is None and not os.environ.get("RAY_ADDRESS") and Path("/dev/shm").is_dir()
    ):
        return Path("/dev/shm") / "paceflow" / cfg.replay_namespace
    return Path(cfg.output_dir).expanduser() / cfg.name / "weights" / cfg.replay_namespace
