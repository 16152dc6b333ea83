"""The rollout loop with real engines and stores: groups stream into the replay, weights are picked up and
verified, and under Ray a killed actor is restarted and the stream resumes."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from actors.rollout_worker import RolloutWorker, WeightSyncError, start_rollout_actor
from actors.scheduler import PromptScheduler, start_scheduler_server
from actors.tasks import build_task
from configs.load import load_config
from configs.schema import MemoryReplayConfig, RunConfig
from learner.logprobs import token_logprobs
from replay.memory_store import MemoryStore
from replay.records import WeightVersion
from replay.remote import RemoteStore, start_replay_server
from tests.conftest import MODEL_CACHE, save_perturbed


def _cfg(*overrides: str) -> RunConfig:
    return load_config(
        "tiny_cpu",
        [
            f"model.cache_dir={MODEL_CACHE}",
            "rollout.prompts_per_batch=3",
            "rollout.sampling.num_samples=2",
            "rollout.sampling.max_new_tokens=8",
            "learner.micro_batch_size=2",
            *overrides,
        ],
    )


def _worker(cfg: RunConfig, model_dir: Path, store: Any) -> RolloutWorker:
    from actors.tasks import build_task

    scheduler = PromptScheduler([p.prompt_id for p in build_task(cfg.task).train], cfg.rollout.scheduler, seed=0)
    return RolloutWorker(
        actor_id="a0", spec=cfg.rollout_worker_spec(), model_dir=model_dir, store=store, scheduler=scheduler, seed=0
    )


def _perturbed_weights(model_dir: Path, out: Path, version: int, *, probe_ok: bool = True) -> WeightVersion:
    model = save_perturbed(model_dir, out, seed=version, scale=0.3)
    prompt, response = [5, 6, 7], [8, 9, 2]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids, torch.ones_like(ids), torch.tensor([[0, 0, 0, 1, 1, 1]]))
    expected = logp[0, 3:].tolist()
    if not probe_ok:
        expected = [x - 1.0 for x in expected]
    return WeightVersion(
        version=version, path=str(out), probe_prompt=prompt, probe_response=response, probe_logprobs=expected
    )


def test_a_step_streams_scored_groups_into_the_store(tiny_model_dir: Path) -> None:
    cfg = _cfg()
    store = MemoryStore(cfg.replay)
    worker = _worker(cfg, tiny_model_dir, store)
    assert worker.step() == 3
    assert len(store) == 3
    batch = store.sample(3)
    for group in batch.groups:
        assert group.size == 2 and group.policy_version == 0 and group.actor_id == "a0"
        assert all(
            len(lp) == len(t) > 0 for lp, t in zip(group.behaviour_logprobs, group.response_token_ids, strict=True)
        )
        assert set(group.rewards.tolist()) <= {0.0, 1.0}  # chain_sum has a verifier
        assert len(group.prompt_token_ids) > 0
    assert worker.counters.responses == 6 and worker.counters.tokens > 0
    assert all(s.num_samples == 2 for s in store.prompt_stats([g.prompt_id for g in batch.groups]))


def test_a_group_with_a_nan_logprob_is_dropped_and_counted_not_fatal(tiny_model_dir: Path) -> None:
    """Fault injection on the real engine's output: one response of the first prompt gets a NaN log-prob. Its
    group fails the record's validation and is dropped and counted; the other groups of the step go in."""
    cfg = _cfg()
    store = MemoryStore(cfg.replay)
    worker = _worker(cfg, tiny_model_dir, store)
    generate = worker.engine.generate

    def corrupted(prompts: list[list[int]], sampling: Any, *, seed: int) -> Any:
        out = generate(prompts, sampling, seed=seed)
        out[0][1].logprobs[0] = float("nan")
        return out

    worker.engine.generate = corrupted  # type: ignore[method-assign]
    assert worker.step() == 2 and len(store) == 2
    assert worker.counters.invalid_groups == 1 and "behaviour_logprobs" in worker.counters.last_invalid
    assert worker.step() == 2  # and the actor goes on


def test_the_rate_limit_pauses_the_loop_until_the_learner_draws(tiny_model_dir: Path) -> None:
    """rollout.max_ahead_batches: the loop stops generating while the replay holds that many learner batches of
    undrawn groups, and generates again once a batch takes them."""
    # A batch takes 4 fresh groups (groups_per_step 4, fresh_fraction 1): the limit is ceil(1.5 * 4) = 6.
    cfg = _cfg("rollout.max_ahead_batches=1.5", "learner.groups_per_step=4", "replay.fresh_fraction=1.0")
    store = MemoryStore(cfg.replay)
    worker = _worker(cfg, tiny_model_dir, store)
    stop = threading.Event()
    loop = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    loop.start()
    try:

        def settle(steps: int) -> None:
            deadline = time.monotonic() + 60
            while worker.counters.steps < steps and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # long enough for a tiny-model step: had it not waited, it would have made another

        settle(2)
        assert worker.counters.steps == 2 and store.stats().fresh == 6  # 3 + 3 reached the limit: it waits
        batch = store.sample(4)  # the learner takes a batch: the oldest four
        assert batch.fresh == [True] * 4
        settle(4)
        assert worker.counters.steps == 4 and store.stats().fresh == 8  # 2 left + 3 + 3: at the limit again
    finally:
        stop.set()
        loop.join(timeout=60)
    stats = store.stats()
    assert stats.evicted_unsampled == 0 and stats.inserted == 12 and worker.counters.wait_s > 1.0


def test_free_running_actors_never_wait(tiny_model_dir: Path) -> None:
    cfg = _cfg("rollout.max_ahead_batches=null", "learner.groups_per_step=4")
    store = MemoryStore(cfg.replay)
    worker = _worker(cfg, tiny_model_dir, store)
    worker.run(threading.Event(), max_steps=4)
    assert store.stats().fresh == 12 and worker.counters.wait_s == 0.0


def test_powerflow_groups_carry_base_model_logprobs(tiny_model_dir: Path) -> None:
    cfg = _cfg(
        "task={kind: creative, num_prompts: 20, eval_size: 4}",
        "objective={kind: powerflow, alpha: 0.5}",
        "eval.every_steps=0",
    )
    store = MemoryStore(cfg.replay)
    _worker(cfg, tiny_model_dir, store).step()
    group = store.sample(1).groups[0]
    assert group.base_logprobs is not None
    assert all(math.isnan(r) for r in group.rewards.tolist())  # unsupervised: no verifier
    # The base model is the initial policy, so its log-probs equal the behaviour ones at temperature 1.
    for base, behaviour in zip(group.base_logprobs, group.behaviour_logprobs, strict=True):
        assert np.allclose(base, behaviour, atol=1e-4)


def test_new_weights_are_loaded_verified_and_stamped(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg()
    store = MemoryStore(cfg.replay)
    worker = _worker(cfg, tiny_model_dir, store)
    worker.step()
    store.announce_weights(_perturbed_weights(tiny_model_dir, tmp_path / "v1", 1))
    worker.step()
    assert worker.engine.weight_version == 1 and worker.counters.weight_updates == 1
    versions = {g.policy_version for g in store.sample(6, seed=0).groups}
    assert 1 in versions


def test_a_sync_that_does_not_take_effect_is_an_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg()
    store = MemoryStore(cfg.replay)
    worker = _worker(cfg, tiny_model_dir, store)
    store.announce_weights(_perturbed_weights(tiny_model_dir, tmp_path / "v1", 1, probe_ok=False))
    with pytest.raises(WeightSyncError, match="probe log-probs differ"):
        worker.sync_weights()


@pytest.mark.slow
def test_ray_actor_streams_and_resumes_after_being_killed(ray_local: Any, tiny_model_dir: Path) -> None:
    # No learner draws here, so the actor runs free (the rate limit would pause it after one batch's worth).
    cfg = _cfg(
        "cluster.max_actor_restarts=2", "cluster.rollout_resources.num_cpus=0.5", "rollout.max_ahead_batches=null"
    )
    assert isinstance(cfg.replay, MemoryReplayConfig)
    server = start_replay_server(cfg.replay)
    store = RemoteStore(server)
    scheduler = start_scheduler_server(cfg, [p.prompt_id for p in build_task(cfg.task).train], server)
    actor = start_rollout_actor("a0", cfg, tiny_model_dir, scheduler, server, seed=0)

    def wait_for(count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(store) < count:
            assert time.monotonic() < deadline, f"only {len(store)} groups after {timeout_s} s"
            time.sleep(0.2)

    wait_for(6)
    assert ray_local.get(actor.counters.remote())["restarted"] is False
    ray_local.kill(actor, no_restart=False)  # a crash: Ray must bring the actor back
    before = len(store)
    wait_for(before + 6)  # the restarted incarnation resumed the loop by itself
    counters = ray_local.get(actor.counters.remote())
    assert counters["restarted"] is True and counters["alive"] and counters["groups"] >= 1
    final = ray_local.get(actor.stop.remote())
    assert not final["alive"]
    assert ray_local.get(scheduler.leased.remote()) == {}
    for handle in (actor, scheduler, server):
        ray_local.kill(handle)
