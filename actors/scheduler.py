"""Which prompts the rollout actors work on next.

`uniform` walks the training prompts in a seeded random order, epoch after epoch. `paced` is PACED-RL's
difficulty-aware selection: draw a candidate pool (pool_factor x the prompts needed), read each candidate's
accuracy estimate a(x) = clip(beta log Z_phi(x), 0, 1) that the learner writes into the replay's prompt
statistics, and take the prompts with |a(x) - tau| smallest, plus a fraction epsilon drawn uniformly so Z_phi
keeps seeing prompts it would not pick. A prompt the learner has not scored yet counts as a(x) = tau
(most informative until known).

Prompts are leased: a prompt handed to one actor is not handed to another until released, so two actors never
work on the same prompt at once. Each lease says how the prompt was chosen ('uniform', 'paced', or 'explore'
for PACED-RL's epsilon picks), so the run can compare the informative share of PACED picks with uniform ones.
One `PromptScheduler` serves all actors (inside a Ray actor when they are separate processes); only prompt ids
and those labels (strings) cross that boundary.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

from configs.schema import PacedSchedulerConfig, RunConfig, SchedulerConfig

EstimateLookup = Callable[[Sequence[str]], list[float | None]]


Lease = tuple[str, str]
"""(prompt id, how it was chosen: 'uniform', 'paced' or 'explore')."""


def select_paced(
    candidates: Sequence[str],
    estimates: Sequence[float | None],
    n: int,
    *,
    tau: float,
    epsilon: float,
    rng: random.Random,
) -> list[Lease]:
    """n prompts: round(epsilon * n) uniformly from the candidates ('explore'), the rest closest to tau."""
    n = min(n, len(candidates))
    explore = rng.sample(list(candidates), min(round(epsilon * n), n))
    chosen = set(explore)
    ranked = sorted(
        (abs((tau if est is None else est) - tau), rng.random(), pid)
        for pid, est in zip(candidates, estimates, strict=True)
        if pid not in chosen
    )
    return [(pid, "explore") for pid in explore] + [(pid, "paced") for _, _, pid in ranked[: n - len(explore)]]


class PromptScheduler:
    def __init__(
        self,
        prompt_ids: Sequence[str],
        cfg: SchedulerConfig,
        *,
        seed: int = 0,
        estimates: EstimateLookup | None = None,
    ) -> None:
        if not prompt_ids:
            raise ValueError("the task has no training prompts to schedule")
        self.prompt_ids = list(dict.fromkeys(prompt_ids))
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.estimates = estimates
        self.leases: dict[str, str] = {}  # prompt id -> actor id
        self._order: list[str] = []
        self._lock = threading.Lock()

    def acquire(self, actor_id: str, n: int) -> list[Lease]:
        """Up to n prompts no other actor holds; they stay leased to `actor_id` until released."""
        with self._lock:
            free = [p for p in self._candidates(n) if p not in self.leases]
            if isinstance(self.cfg, PacedSchedulerConfig):
                scores = self.estimates(free) if self.estimates is not None else [None] * len(free)
                picked = select_paced(free, scores, n, tau=self.cfg.tau, epsilon=self.cfg.epsilon, rng=self.rng)
            else:
                picked = [(pid, "uniform") for pid in free[:n]]
            for pid, _ in picked:
                self.leases[pid] = actor_id
            return picked

    def _candidates(self, n: int) -> list[str]:
        """The next prompts in epoch order: n of them (uniform) or a pool of pool_factor x n (paced)."""
        want = n * self.cfg.pool_factor if isinstance(self.cfg, PacedSchedulerConfig) else n
        want = min(want + len(self.leases), len(self.prompt_ids))
        out: list[str] = []
        while len(out) < want:
            if not self._order:
                self._order = self.prompt_ids[:]
                self.rng.shuffle(self._order)
            pid = self._order.pop()
            if pid not in out:
                out.append(pid)
        return out

    def release(self, actor_id: str, prompt_ids: Sequence[str]) -> None:
        with self._lock:
            for pid in prompt_ids:
                if self.leases.get(pid) == actor_id:
                    del self.leases[pid]

    def release_actor(self, actor_id: str) -> int:
        """Free everything an actor held (it restarted or left); returns how many prompts were freed."""
        with self._lock:
            held = [p for p, a in self.leases.items() if a == actor_id]
            for pid in held:
                del self.leases[pid]
            return len(held)

    def leased(self) -> dict[str, str]:
        with self._lock:
            return dict(self.leases)

    def state(self) -> dict[str, Any]:
        """JSON-able position of the scheduler (random state and epoch order), for checkpoints."""
        with self._lock:
            version, internal, gauss = self.rng.getstate()
            return {"rng": [version, list(internal), gauss], "order": list(self._order)}

    def restore(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        with self._lock:
            self.rng.setstate((version, tuple(internal), gauss))
            known = set(self.prompt_ids)
            self._order = [p for p in state["order"] if p in known]


class SchedulerServer:
    """One PromptScheduler for every rollout actor of a run, as a Ray actor; PACED estimates come from the store."""

    def __init__(
        self,
        scheduler_json: str,
        prompt_ids: list[str],
        seed: int,
        replay_json: str,
        replay_namespace: str,
        replay_server: object | None = None,
    ) -> None:
        from pydantic import TypeAdapter

        from configs.schema import ReplayConfig
        from replay.store import connect_store

        cfg: SchedulerConfig = TypeAdapter(SchedulerConfig).validate_json(scheduler_json)
        lookup: EstimateLookup | None = None
        if isinstance(cfg, PacedSchedulerConfig):
            replay: ReplayConfig = TypeAdapter(ReplayConfig).validate_json(replay_json)
            store = connect_store(replay, run_name=replay_namespace, server=replay_server)

            def lookup(ids: Sequence[str]) -> list[float | None]:
                return [s.acc_estimate for s in store.prompt_stats(list(ids))]

        self.scheduler = PromptScheduler(prompt_ids, cfg, seed=seed, estimates=lookup)

    def acquire(self, actor_id: str, n: int) -> list[Lease]:
        return self.scheduler.acquire(actor_id, n)

    def release(self, actor_id: str, prompt_ids: list[str]) -> None:
        self.scheduler.release(actor_id, prompt_ids)

    def release_actor(self, actor_id: str) -> int:
        return self.scheduler.release_actor(actor_id)

    def leased(self) -> dict[str, str]:
        return self.scheduler.leased()

    def state(self) -> dict[str, Any]:
        return self.scheduler.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.scheduler.restore(state)


def start_scheduler_server(cfg: RunConfig, prompt_ids: list[str], replay_server: object | None = None) -> Any:
    """The run's SchedulerServer over the training prompts' ids, built from rollout.scheduler (and, for PACED
    selection, the replay that holds the accuracy estimates)."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_concurrency=16)(SchedulerServer)
    scheduler_json, replay_json = cfg.rollout.scheduler.to_worker_json(), cfg.replay.to_worker_json()
    return actor_cls.remote(scheduler_json, prompt_ids, cfg.seed, replay_json, cfg.replay_namespace, replay_server)
