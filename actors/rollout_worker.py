"""The rollout loop: ask for prompts, generate, score, push groups into the replay, pick up newer weights.

One `RolloutWorker.step()` is one engine call: lease `prompts_per_batch` prompts from the scheduler, sample G
responses each, score them (verifier rewards under a timeout; base-model log-likelihoods for PowerFlow), build
one `RolloutGroup` per prompt stamped with the engine's weight version, and add them to the store with
priority e(x) = |N_correct/G - a(x)| (PACED-RL; 1 while the learner has no estimate yet, so unseen prompts are
replayed first). Between steps it checks the store's latest weight announcement, loads it in place and verifies
it with the announcement's teacher-forced probe. Asynchronous (the default), the worker never waits on the
learner; with `learner.sync` the two take turns through the replay (replay/handshake.py).

A worker is built from a `RolloutWorkerSpec` (configs/schema.py): its own section plus the few facts from other
sections that the launcher resolves once; it never sees the rest of the run's config.

`RolloutActor` runs the loop on a thread inside a Ray actor. Ray restarts a dead actor (max_restarts); the
constructor then reloads the newest weights, frees the leases the old incarnation held, and resumes the loop.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from actors.engines.base import Engine, build_engine
from actors.scoring import BaseModelScorer, RewardScorer
from actors.tasks import Prompt, build_task, encode_prompt
from actors.weight_client import BroadcastClient
from configs.schema import RolloutWorkerSpec, RunConfig
from replay.handshake import wait_for_room, wait_for_turn
from replay.records import RecordError, RolloutGroup, WeightVersion
from replay.store import ReplayStore, connect_store, split_batch
from replay.weight_broadcast import is_broadcast_uri
from replay.weight_store import VersionReplaced, load_published

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """An engine did not end up with the announced weights (its probe log-probs disagree)."""


class Scheduler(Protocol):
    def acquire(self, actor_id: str, n: int) -> list[tuple[str, str]]:
        """Up to n leases: (prompt id, how it was chosen)."""
        ...

    def release(self, actor_id: str, prompt_ids: list[str]) -> None: ...


@dataclass
class WorkerCounters:
    steps: int = 0
    groups: int = 0
    responses: int = 0
    tokens: int = 0
    truncated: int = 0
    prompts_too_long: int = 0
    invalid_groups: int = 0
    """Groups dropped because they failed the record's validation (a NaN or positive log-prob from the engine)."""
    last_invalid: str = ""
    reward_errors: int = 0
    reward_timeouts: int = 0
    reward_last_error: str = ""
    """The verifier's last error message (what went wrong, for the run's summary.json)."""
    weight_updates: int = 0
    weight_version: int = 0
    generate_s: float = 0.0
    last_generate_s: float = 0.0
    """Seconds of the last engine call (the generation latency of one batch of prompts)."""
    wait_s: float = 0.0
    """Seconds spent waiting: on the rate limit (rollout.max_ahead_batches) or, synchronous, for its turn."""


class RolloutWorker:
    def __init__(
        self,
        *,
        actor_id: str,
        spec: RolloutWorkerSpec,
        model_dir: Path,
        store: ReplayStore,
        scheduler: Scheduler,
        seed: int,
    ) -> None:
        self.actor_id = actor_id
        self.spec = spec
        self.cfg = spec.rollout
        self.model_dir = Path(model_dir)
        self.store = store
        self.scheduler = scheduler
        self.seed = seed
        self.task = build_task(spec.task)
        self.prompts: dict[str, Prompt] = {p.prompt_id: p for p in self.task.train}
        self.engine: Engine = build_engine(self.cfg.engine, self.model_dir, dtype=spec.dtype, seed=seed)
        self.tokenizer = self.engine.tokenizer
        self.rewards = RewardScorer.for_task(self.task, spec.task, self.cfg)
        self.base = BaseModelScorer(self.model_dir) if spec.need_base_logprobs else None
        self.counters = WorkerCounters()
        self._token_cache: dict[str, list[int]] = {}
        self._steps_at_version = 0
        self._weights = BroadcastClient(actor_id, spec.ray_namespace)  # used with the broadcast transport only

    # ------------------------------------------------------------------------------------------ the loop
    def run(
        self, stop: threading.Event, max_steps: int | None = None, last_version: Callable[[], int | None] = lambda: None
    ) -> None:
        """Loop until `stop` is set (after the current step). In synchronous mode the loop also ends by itself once
        it has produced the batch for `last_version()`, so a run that stops leaves no half-consumed batch."""
        sync = self.spec.sync
        ahead = self.cfg.max_ahead_batches
        # In units of what one learner batch takes fresh, so the backlog drains at the pace it is consumed.
        fresh_per_batch = max(1, split_batch(self.spec.batch_groups, self.spec.replay.fresh_fraction)[0])
        max_fresh = max(1, math.ceil(ahead * fresh_per_batch)) if ahead is not None else None
        used = -1  # the weight version of this worker's last batch
        while not stop.is_set() and (max_steps is None or self.counters.steps < max_steps):
            if sync:
                final = last_version()
                if final is not None and used >= final:
                    return
                start = time.monotonic()
                turn = wait_for_turn(
                    self.store, after_version=used, batch_groups=self.spec.batch_groups, stop=stop, timeout_s=1.0
                )
                self.counters.wait_s += time.monotonic() - start
                if not turn:
                    continue  # look at `stop` and the last version again
            elif max_fresh is not None:
                self.counters.wait_s += wait_for_room(self.store, max_fresh=max_fresh, stop=stop)
                if stop.is_set():
                    return
            self.step()
            used = self.engine.weight_version

    def step(self) -> int:
        self.sync_weights()
        leases = self.scheduler.acquire(self.actor_id, self.cfg.prompts_per_batch)
        try:
            groups = self._rollout([(self.prompts[p], how) for p, how in leases if p in self.prompts])
            if groups:
                self.store.add(groups)  # priority e(x) against the store's a(x) (replay/store.py)
        finally:
            self.scheduler.release(self.actor_id, [p for p, _ in leases])
        self.counters.steps += 1
        self.counters.groups += len(groups)
        return len(groups)

    def _rollout(self, prompts: list[tuple[Prompt, str]]) -> list[RolloutGroup]:
        tokenised = [(p, how, self._tokens(p)) for p, how in prompts]
        kept = [(p, how, ids) for p, how, ids in tokenised if len(ids) <= self.spec.tokenizer.max_prompt_tokens]
        self.counters.prompts_too_long += len(tokenised) - len(kept)
        if not kept:
            return []
        version = self.engine.weight_version
        start = time.perf_counter()
        # Seeded by weight version and the step within it, so a resumed synchronous run samples what an
        # uninterrupted one would have.
        seed = (self.seed * 1_000_003 + version * 1_009 + self._steps_at_version) % 2**31
        outputs = self.engine.generate([ids for _, _, ids in kept], self.cfg.sampling, seed=seed)
        self._steps_at_version += 1
        self.counters.last_generate_s = time.perf_counter() - start
        self.counters.generate_s += self.counters.last_generate_s
        groups = []
        for (prompt, how, ids), samples in zip(kept, outputs, strict=True):
            scores = self.rewards.score(prompt, [s.text for s in samples])
            responses = [s.token_ids for s in samples]
            try:
                group = RolloutGroup.new(
                    prompt_id=prompt.prompt_id,
                    prompt_token_ids=ids,
                    responses=responses,
                    behaviour_logprobs=[s.logprobs for s in samples],
                    rewards=scores.rewards,
                    policy_version=version,
                    actor_id=self.actor_id,
                    finish_reasons=[s.finish_reason for s in samples],
                    parsed_answers=scores.parsed,
                    base_logprobs=self.base.score(ids, responses) if self.base is not None else None,
                    selection=how,
                )
            except RecordError as exc:  # e.g. a NaN log-prob from the engine: drop this group, keep the actor
                self.counters.invalid_groups += 1
                self.counters.last_invalid = f"prompt {prompt.prompt_id}: {exc}"
                log.warning("%s dropped a group it could not record: %s", self.actor_id, self.counters.last_invalid)
                continue
            groups.append(group)
            self.counters.responses += len(samples)
            self.counters.tokens += sum(len(r) for r in responses)
            self.counters.truncated += sum(s.finish_reason == "length" for s in samples)
        self.counters.reward_errors = self.rewards.counters.errors
        self.counters.reward_timeouts = self.rewards.counters.timeouts
        self.counters.reward_last_error = self.rewards.counters.last_error
        return groups

    def _tokens(self, prompt: Prompt) -> list[int]:
        if prompt.prompt_id not in self._token_cache:
            self._token_cache[prompt.prompt_id] = encode_prompt(self.tokenizer, prompt.text, self.spec.tokenizer)
        return self._token_cache[prompt.prompt_id]

    # ------------------------------------------------------------------------------------------ weights
    def sync_weights(self) -> bool:
        """Load the newest announced weights if they are newer than the engine's; verify them by the probe."""
        latest = self.store.latest_weights()
        if latest is None or latest.version <= self.engine.weight_version:
            return False
        try:
            if is_broadcast_uri(latest.path):  # the learner sends its newest version; verify what arrived
                latest = self._weights.receive(latest.path, self.engine)
            else:
                load_published(
                    latest.path,
                    self.spec.ray_namespace,
                    lambda d: self.engine.load_weights(d, latest.version),
                    version=latest.version,
                )
        except VersionReplaced:  # a newer version replaced it meanwhile: take that one at the next step
            return False
        verify_weights(self, latest)
        self._steps_at_version = 0
        self.counters.weight_updates += 1
        self.counters.weight_version = latest.version
        return True

    def close(self) -> None:
        self.rewards.close()
        self.engine.close()


def verify_weights(worker: RolloutWorker, weights: WeightVersion) -> None:
    """Teacher-force the announcement's probe through the engine's own weights and compare log-probs."""
    if not weights.probe_response:
        return
    got = worker.engine.logprobs(weights.probe_prompt, weights.probe_response)
    # The mean, not the max: in bf16 single unlikely tokens differ by up to ~0.2 nats even with identical weights.
    gap = sum(abs(a - b) for a, b in zip(got, weights.probe_logprobs, strict=True)) / len(got)
    if not math.isfinite(gap) or gap > weights.probe_tolerance:
        raise WeightSyncError(
            f"{worker.actor_id}: after loading weights v{weights.version} from {weights.path} the probe log-probs "
            f"differ by {gap:.3g} on average (> {weights.probe_tolerance}); the engine does not hold the new weights"
        )


class RolloutActor:
    """The Ray actor around a RolloutWorker: the loop runs on its own thread from construction on."""

    def __init__(
        self,
        actor_id: str,
        spec_json: str,
        model_dir: str,
        scheduler: Any,
        replay_server: Any = None,
        seed: int = 0,
        autostart: bool = True,
    ) -> None:
        import ray

        spec = RolloutWorkerSpec.model_validate_json(spec_json)
        self.actor_id = actor_id
        self.scheduler = scheduler
        store = connect_store(spec.replay, run_name=spec.replay_namespace, server=replay_server)
        ray.get(scheduler.release_actor.remote(actor_id))  # a restarted incarnation frees its predecessor's leases
        self.worker = RolloutWorker(
            actor_id=actor_id,
            spec=spec,
            model_dir=Path(model_dir),
            store=store,
            scheduler=_RemoteScheduler(scheduler),
            seed=seed,
        )
        self.worker.sync_weights()
        self.error: str | None = None
        self._last_version: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"rollout-{actor_id}", daemon=True)
        if autostart:
            self._thread.start()

    def _loop(self) -> None:
        try:
            self.worker.run(self._stop, last_version=lambda: self._last_version)
        except Exception as exc:  # surface it to the driver, then die so Ray restarts a clean incarnation
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("rollout loop of %s failed", self.actor_id)
            os._exit(1)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def finish_after(self, version: int) -> None:
        """Synchronous mode: produce the batch for `version`, then stop (the run's last learner step needs it)."""
        self._last_version = version

    def stop(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Finish the current step, then stop; returns the final counters."""
        self._stop.set()
        self._thread.join(timeout_s)
        return self.counters()

    def counters(self) -> dict[str, Any]:
        import ray

        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        return {
            "pid": os.getpid(),  # which process to look at (or, in the fault tests, to kill)
            **asdict(self.worker.counters),
            "actor_id": self.actor_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "alive": self._thread.is_alive(),
            "error": self.error,
            "restarted": restarted,
        }


class _RemoteScheduler:
    """The Scheduler protocol over a SchedulerServer actor handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def acquire(self, actor_id: str, n: int) -> list[tuple[str, str]]:
        import ray

        return [(pid, how) for pid, how in ray.get(self.handle.acquire.remote(actor_id, n))]

    def release(self, actor_id: str, prompt_ids: list[str]) -> None:
        import ray

        ray.get(self.handle.release.remote(actor_id, list(prompt_ids)))


def start_rollout_actor(
    actor_id: str, cfg: RunConfig, model_dir: Path, scheduler: Any, replay_server: Any = None, *, seed: int
) -> Any:
    """A RolloutActor with the run's resources; Ray restarts it up to cluster.max_actor_restarts times."""
    import ray

    res = cfg.cluster.rollout_resources
    actor_cls = ray.remote(RolloutActor).options(
        name=f"{cfg.replay_namespace}-{actor_id}",
        namespace=cfg.cluster.namespace,
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus,
        resources=res.custom or None,
        max_restarts=cfg.cluster.max_actor_restarts,
        max_concurrency=4,  # counters()/stop() answer while the loop thread works
    )
    spec = cfg.rollout_worker_spec().to_worker_json()
    return actor_cls.remote(actor_id, spec, str(model_dir), scheduler, replay_server, seed)
