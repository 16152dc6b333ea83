"""Prompt selection (uniform and PACED-RL), prompt leases, and verifier failures that must not kill an actor."""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from typing import Any

import pytest

from actors.scheduler import PromptScheduler, select_paced
from actors.scoring import RewardScorer
from actors.tasks import Prompt, Task, Verdict
from configs.schema import PacedSchedulerConfig, UniformSchedulerConfig

IDS = [f"p{i}" for i in range(40)]


def test_paced_selection_prefers_prompts_near_tau_and_explores() -> None:
    estimates = {pid: i / 39 for i, pid in enumerate(IDS)}  # accuracy estimates from 0 to 1
    leases = select_paced(IDS, [estimates[p] for p in IDS], 10, tau=0.5, epsilon=0.2, rng=random.Random(0))
    picked = [p for p, _ in leases]
    assert len(picked) == len(set(picked)) == 10
    assert [how for _, how in leases] == ["explore"] * 2 + ["paced"] * 8  # round(0.2 * 10) = 2 drawn uniformly
    exploit = picked[2:]
    assert all(abs(estimates[p] - 0.5) <= 4.5 / 39 for p in exploit)


def test_paced_selection_treats_unscored_prompts_as_most_informative() -> None:
    picked = select_paced(["a", "b", "c"], [0.0, None, 1.0], 1, tau=0.5, epsilon=0.0, rng=random.Random(0))
    assert picked == [("b", "paced")]


def test_uniform_scheduler_covers_every_prompt_each_epoch() -> None:
    scheduler = PromptScheduler(IDS, UniformSchedulerConfig(), seed=1)
    seen: list[str] = []
    for _ in range(10):
        leases = scheduler.acquire("a0", 4)
        assert {how for _, how in leases} == {"uniform"}
        batch = [p for p, _ in leases]
        seen += batch
        scheduler.release("a0", batch)
    assert sorted(seen) == sorted(IDS)


def test_no_prompt_is_leased_to_two_actors_at_once() -> None:
    scheduler = PromptScheduler(
        IDS, PacedSchedulerConfig(pool_factor=2), seed=0, estimates=lambda ids: [None] * len(ids)
    )
    held: dict[str, list[str]] = {}
    for actor in ("a0", "a1", "a2"):
        held[actor] = [p for p, _ in scheduler.acquire(actor, 8)]
    owners = Counter(p for batch in held.values() for p in batch)
    assert sum(len(b) for b in held.values()) == 24 and max(owners.values()) == 1
    assert scheduler.release_actor("a1") == 8  # a restarted actor's leases are freed
    assert len(scheduler.leased()) == 16


def test_concurrent_actors_never_share_a_prompt() -> None:
    scheduler = PromptScheduler(IDS, UniformSchedulerConfig(), seed=0)
    clashes: list[str] = []
    active: dict[str, str] = {}
    lock = threading.Lock()

    def actor(name: str) -> None:
        for _ in range(50):
            batch = [p for p, _ in scheduler.acquire(name, 5)]
            with lock:
                clashes.extend(p for p in batch if p in active)
                active.update(dict.fromkeys(batch, name))
            time.sleep(0.0005)
            with lock:
                for p in batch:
                    active.pop(p, None)
            scheduler.release(name, batch)

    threads = [threading.Thread(target=actor, args=(f"a{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clashes == []


def test_scheduler_without_prompts_is_an_error() -> None:
    with pytest.raises(ValueError, match="no training prompts"):
        PromptScheduler([], UniformSchedulerConfig())


def _task(verifier: Any) -> Task:
    return Task(name="t", train=[Prompt("p", "q", "1")], eval=[], verifier=verifier)


def test_raising_and_hanging_verifiers_give_invalid_rewards_not_dead_actors() -> None:
    release = threading.Event()

    def verifier(prompt: Prompt, response: str) -> Verdict:
        if response == "boom":
            raise RuntimeError("parser crashed")
        if response == "hang":
            release.wait(10)
        return Verdict(reward=1.0 if response == "1" else 0.0, parsed=response)

    scorer = RewardScorer(_task(verifier), timeout_s=0.2, workers=2)
    scores = scorer.score(Prompt("p", "q", "1"), ["1", "boom", "hang", "2"])
    release.set()
    assert scores.rewards[0] == 1.0 and scores.rewards[3] == 0.0
    assert math.isnan(scores.rewards[1]) and math.isnan(scores.rewards[2])
    assert scorer.counters.errors == 1 and scorer.counters.timeouts == 1
    assert "parser crashed" in scorer.counters.last_error
    scorer.close()


def test_unsupervised_tasks_have_nan_rewards() -> None:
    scores = RewardScorer(_task(None), timeout_s=1).score(Prompt("p", "q"), ["a", "b"])
    assert all(math.isnan(r) for r in scores.rewards)
