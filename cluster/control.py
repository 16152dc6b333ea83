"""Talking to a running training job from another process: `paceflow scale`, `paceflow status`, `paceflow stop`.

The driver of a run starts a small named Ray actor, `RunControl`, and writes where to find it into the run
directory (`control.json`: the Ray address and namespace, the actor's name). `paceflow scale RUN --actors N` sets
the number of rollout actors the driver should keep; the driver applies it between learner steps (new actors
join by loading the newest weights; removed ones finish their current step first, so every group they produced
is in the replay). `paceflow status RUN` reads the snapshot the driver publishes after every step.
`paceflow stop RUN` ends the run cleanly after the current step (resumable with `paceflow train --resume`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTROL_FILE = "control.json"


class RunControl:
    """The run's control actor: the desired rollout actor count and the driver's latest status snapshot."""

    def __init__(self, actors: int, max_actors: int, sync: bool) -> None:
        self._desired = actors
        self._max = max_actors
        self._sync = sync
        self._status: dict[str, Any] = {}
        self._stop = False

    def set_actors(self, n: int) -> int:
        if self._sync:
            raise ValueError(
                "learner.sync: every batch is made of prompts_per_batch x num_rollout_actors groups, so this run "
                "cannot change its actor count; use an asynchronous run (learner.sync: false) to scale"
            )
        if not 1 <= n <= self._max:
            raise ValueError(f"--actors: {n} is not between 1 and {self._max}")
        self._desired = int(n)
        return self._desired

    def requests(self) -> dict[str, Any]:
        """What the driver is asked to do after its current step: the rollout actor count, and whether to stop."""
        return {"actors": self._desired, "stop": self._stop}

    def request_stop(self) -> None:
        """End the run after the current learner step, as if it had reached learner.num_steps (checkpoint, final
        policy and report included), so that `--resume` continues it."""
        self._stop = True

    def publish_status(self, status: dict[str, Any]) -> None:
        self._status = status

    def status(self) -> dict[str, Any]:
        return {**self._status, "desired_actors": self._desired}


@dataclass(frozen=True)
class ControlAddress:
    address: str
    """The Ray (GCS) address of the run's cluster."""
    namespace: str
    name: str
    """The control actor's name."""


def start_control(run_dir: Path, *, name: str, namespace: str, actors: int, sync: bool) -> Any:
    """Start the run's RunControl and write control.json into the run directory."""
    import ray

    handle = ray.remote(num_cpus=0)(RunControl).options(name=name, namespace=namespace).remote(actors, 4096, sync)
    address = ray.get_runtime_context().gcs_address
    record = {"address": address, "namespace": namespace, "name": name}
    (run_dir / CONTROL_FILE).write_text(json.dumps(record) + "\n")
    return handle


def find_control(run_dir: Path) -> ControlAddress:
    path = Path(run_dir).expanduser() / CONTROL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CONTROL_FILE}; is it the run directory of a paceflow train job?")
    raw = json.loads(path.read_text())
    return ControlAddress(str(raw["address"]), str(raw["namespace"]), str(raw["name"]))


class RunUnavailable(RuntimeError):
    """RUN is not a run directory, or its job is not running (any more)."""


def connect_control(run_dir: Path) -> Any:
    """The running job's RunControl handle; `RunUnavailable`, saying why, when there is none to reach."""
    import ray

    try:
        where = find_control(run_dir)
    except FileNotFoundError as exc:
        raise RunUnavailable(str(exc)) from None
    try:
        if not ray.is_initialized():
            ray.init(address=where.address, namespace=where.namespace, log_to_driver=False)
        return ray.get_actor(where.name, namespace=where.namespace)
    except ConnectionError as exc:
        raise RunUnavailable(f"{run_dir}: cannot reach the run's Ray cluster at {where.address} ({exc})") from None
    except ValueError:
        raise RunUnavailable(
            f"{run_dir}: the run is not running (no actor {where.name!r} at {where.address})"
        ) from None


def ask(run_dir: Path, method: str, *args: Any, timeout_s: float = 30.0) -> Any:
    """Call RunControl.<method>(*args) of the job running in `run_dir` and return its answer."""
    import ray

    return ray.get(getattr(connect_control(run_dir), method).remote(*args), timeout=timeout_s)


def status_table(status: dict[str, Any]) -> Any:
    """A running job at a glance: progress and learner numbers, then one row per rollout actor."""
    from rich.console import Group
    from rich.table import Table

    replay = status.get("replay", {})
    actors = status.get("actors", [])
    head = (
        f"[bold]{status.get('name', '?')}[/]  step {status.get('step', 0)}/{status.get('num_steps', '?')}  "
        f"weights v{status.get('version', 0)}  {status.get('elapsed_s', 0.0):.0f}s elapsed  "
        f"actors {sum(bool(a.get('alive')) for a in actors)} running / {status.get('desired_actors', '?')} wanted"
    )
    learner = Table("loss", "reward", "lag mean/max", "step s", "wait s", "samples/s", "tokens/s", box=None)
    learner.add_row(
        f"{status.get('loss', float('nan')):.4g}",
        f"{status.get('reward', float('nan')):.3f}",
        f"{status.get('lag_mean', 0.0):.1f}/{status.get('lag_max', 0)}",
        f"{status.get('step_s', 0.0):.1f}",
        f"{status.get('wait_s', 0.0):.1f}",
        f"{status.get('samples_per_s', 0.0):.1f}",
        f"{status.get('tokens_per_s', 0.0):.0f}",
    )
    replay_line = (
        f"replay: {replay.get('size', 0)} groups ({replay.get('fresh', 0)} fresh), "
        f"{replay.get('inserted', 0)} inserted, {replay.get('sampled', 0)} sampled, "
        f"{replay.get('evicted_stale', 0)} stale + {replay.get('evicted_capacity', 0)} over capacity evicted "
        f"({replay.get('evicted_unsampled', 0)} never drawn), {replay.get('stale_on_arrival', 0)} refused stale, "
        f"success buffer {replay.get('success_size', 0)}"
    )
    table = Table("actor", "alive", "weights", "groups", "responses", "tokens", "s in engine", "s waiting", box=None)
    for a in actors:
        table.add_row(
            str(a.get("actor_id", "?")),
            "yes" if a.get("alive") else "no",
            f"v{a.get('weight_version', 0)}",
            str(a.get("groups", 0)),
            str(a.get("responses", 0)),
            str(a.get("tokens", 0)),
            f"{a.get('generate_s', 0.0):.1f}",
            f"{a.get('wait_s', 0.0):.1f}",
        )
    return Group(head, learner, replay_line, table)
