"""The DeepSpeed learner on a tiny model: real steps on real replay data, weight publishing, and checkpoints
that restore the exact training state (ZeRO stage 0) or the weights and counters (ZeRO 2/3)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from configs.load import load_config
from configs.schema import RunConfig
from learner.log_partition import LogZHead
from learner.loop import Learner
from learner.objectives import NonFiniteLossError
from replay.memory_store import MemoryStore
from replay.records import RolloutGroup
from tests.conftest import MODEL_CACHE


def _cfg(stage: int) -> RunConfig:
    return load_config(
        "tiny_cpu",
        [f"model.cache_dir={MODEL_CACHE}", f"learner.deepspeed.zero_stage={stage}", "replay.fresh_fraction=0.5"],
    )


def _filled_store(cfg: RunConfig, *, groups: int = 12, seed: int = 0, base_logprobs: bool = False) -> MemoryStore:
    """Random groups of 4 responses; with `base_logprobs`, base-model log-probs alternating -1 and -2 per token."""
    rng = random.Random(seed)
    store = MemoryStore(cfg.replay)
    made = []
    for i in range(groups):
        responses = [[rng.randrange(4, 100) for _ in range(rng.randrange(3, 10))] + [2] for _ in range(4)]
        made.append(
            RolloutGroup.new(
                prompt_id=f"p{i}",
                prompt_token_ids=[rng.randrange(4, 100) for _ in range(12)],
                responses=responses,
                behaviour_logprobs=[[-4.6] * len(r) for r in responses],
                rewards=[float(rng.random() < 0.3) for _ in range(4)],
                policy_version=0,
                actor_id="test",
                base_logprobs=[[-2.0 if t % 2 else -1.0 for t in range(len(r))] for r in responses]
                if base_logprobs
                else None,
            )
        )
    store.add(made, [1.0] * len(made))
    return store


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_checkpoint_restores_the_training_state(stage: int, tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(stage)
    store = _filled_store(cfg)
    first = Learner(cfg.learner_spec(), tiny_model_dir, store, weights_root=tmp_path / "w1")
    losses = [first.step().loss for _ in range(2)]  # type: ignore[union-attr]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert first.version == 2 and (tmp_path / "w1" / "v2").is_dir()  # published every step
    assert store.latest_weights() is not None and store.latest_weights().version == 2  # type: ignore[union-attr]
    first.save_checkpoint(tmp_path / "ckpt")
    store.save(tmp_path / "replay.msgpack")

    restored_store = MemoryStore.load(tmp_path / "replay.msgpack", cfg.replay)
    second = Learner(cfg.learner_spec(), tiny_model_dir, restored_store, weights_root=tmp_path / "w2")
    second.load_checkpoint(tmp_path / "ckpt")
    assert (second.step_count, second.version) == (2, 2)
    a, b = first.engine.full_state_dict(), second.engine.full_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Same weights and same replay state: the next step sees the same batch and computes the same loss.
    next_first, next_second = first.step(), second.step()
    assert next_first is not None and next_second is not None
    assert next_second.loss == pytest.approx(next_first.loss, rel=1e-6)
    if stage == 0:  # the optimizer moments were restored too, so the update after that is identical as well
        assert second.step().loss == pytest.approx(first.step().loss, rel=1e-5)  # type: ignore[union-attr]


def test_a_paced_step_trains_on_whole_fresh_groups_and_replayed_successes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """PACED-RL's data flow through a real learner step: fresh groups arrive whole (failures included), one
    group slot of successful responses comes from the success buffer, a(x) is reported against each fresh
    group's accuracy, and estimates for every training prompt reach the store for the scheduler."""
    from actors.tasks import build_task, encode_prompts

    cfg = load_config(
        "tiny_cpu",
        [
            f"model.cache_dir={MODEL_CACHE}",
            "objective={kind: paced, log_z_lr: 0.01}",
            "replay.fresh_fraction=1.0",
            "replay.success_buffer={capacity: 128, insert_top_k: 64, share: 0.25}",
        ],
    )
    store = MemoryStore(cfg.replay)
    rng = random.Random(1)
    groups = [
        RolloutGroup.new(
            prompt_id=f"p{i}",
            prompt_token_ids=[rng.randrange(4, 100) for _ in range(12)],
            responses=[[rng.randrange(4, 100) for _ in range(5)] + [2] for _ in range(4)],
            behaviour_logprobs=[[-4.6] * 6 for _ in range(4)],
            rewards=[1.0, 0.0, float(i % 2), 0.0],
            policy_version=0,
            actor_id="test",
            selection="explore" if i == 0 else "paced",
        )
        for i in range(6)
    ]
    store.add(groups, [0.5] * len(groups))
    prompts = encode_prompts(tiny_model_dir, build_task(cfg.task).train, cfg.tokenizer)
    learner = Learner(cfg.learner_spec(), tiny_model_dir, store, weights_root=tmp_path / "w", prompts=prompts)
    result = learner.step()
    assert result is not None
    assert result.metrics["rows_replayed"] == 4  # round(0.25 * 4 groups) = 1 slot of G = 4 responses
    assert result.metrics["groups_fresh"] == 3
    assert result.rows == 3 * 4 + 4
    assert 0.4 < result.metrics["failed_frac"] < 1  # the fresh groups keep their failed responses
    assert len(result.calibration) == 3 and {row[4] for row in result.calibration} <= {"explore", "paced"}
    assert all(row[1] == 0.0 for row in result.calibration)  # Z_phi starts at a(x) = 0 for every prompt
    assert result.metrics["calib_mae"] == pytest.approx(sum(row[2] for row in result.calibration) / 3)
    assert result.metrics["calib_mae_const"] != result.metrics["calib_mae_const"]  # NaN: no history yet
    estimates = [s.acc_estimate for s in store.prompt_stats(list(prompts))]
    assert len(estimates) == 128 and all(e is not None for e in estimates)  # prompts no actor has rolled out
    second = learner.step()
    assert second is not None and second.metrics["calib_mae_const"] >= 0  # now there is a history to compare with


def test_autocast_runs_the_forward_in_bf16_and_keeps_float32_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """learner.autocast: the policy's matmuls in bfloat16, its weights, gradients and optimizer in float32, so an
    update smaller than bf16's resolution still lands; the loss is that of the float32 learner up to bf16
    rounding."""
    losses = {}
    for name, extra in (("fp32", []), ("autocast", ["learner.autocast=bfloat16"])):
        cfg = load_config("tiny_cpu", [f"model.cache_dir={MODEL_CACHE}", "replay.fresh_fraction=1.0", *extra])
        learner = Learner(cfg.learner_spec(), tiny_model_dir, _filled_store(cfg), weights_root=tmp_path / name)
        seen: list[torch.dtype] = []
        linear = next(m for m in learner.engine.module.modules() if isinstance(m, torch.nn.Linear))
        hook = linear.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.dtype))
        before = {k: v.clone() for k, v in learner.engine.module.state_dict().items()}
        losses[name] = learner.step().loss  # type: ignore[union-attr]
        hook.remove()
        # The training forward (the publish's probe after it runs in float32, like the engines it is checked on).
        assert seen[0] == (torch.bfloat16 if name == "autocast" else torch.float32)
        after = learner.engine.module.state_dict()
        assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
        assert any(not torch.equal(before[k], after[k]) for k in before)  # the step changed the weights
    assert losses["autocast"] == pytest.approx(losses["fp32"], rel=0.05)


def test_autocast_needs_float32_weights() -> None:
    from configs.load import ConfigError

    with pytest.raises(ConfigError, match=r"learner\.autocast=bfloat16 runs float32 weights"):
        load_config("tiny_cpu", ["learner.dtype=bfloat16", "learner.autocast=bfloat16"])


def test_powerflow_measures_its_log_z_offset_on_the_first_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """log_z_offset_per_token 'auto': before the first update the head's offset is (alpha - 1) x the batch's base
    NLL per token, so log Z' starts where the first residuals are centred; the offset is then checkpointed, and a
    resumed learner keeps it rather than measuring again."""
    overrides = [
        f"model.cache_dir={MODEL_CACHE}",
        "replay.fresh_fraction=1.0",
        "objective={kind: powerflow, alpha: 0.5, log_z_offset_per_token: auto}",
    ]
    cfg = load_config("tiny_cpu", overrides)
    store = _filled_store(cfg, groups=6, seed=1, base_logprobs=True)
    learner = Learner(cfg.learner_spec(), tiny_model_dir, store, weights_root=tmp_path / "w")
    assert isinstance(learner.log_z, LogZHead) and float(learner.log_z.offset) == 0.0
    first = learner.step()
    assert first is not None
    offset = float(learner.log_z.offset)
    assert -1.0 < offset < -0.5  # per-token NLL between 1 and 2 (alternating -1/-2), times alpha - 1 = -0.5
    assert first.metrics["log_z_mean"] == pytest.approx(-offset, abs=1e-4)  # the head's zero-initialised output
    learner.save_checkpoint(tmp_path / "ckpt")
    resumed = Learner(cfg.learner_spec(), tiny_model_dir, store, weights_root=tmp_path / "w2")
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert isinstance(resumed.log_z, LogZHead) and float(resumed.log_z.offset) == pytest.approx(offset)
    resumed.step()
    assert float(resumed.log_z.offset) == pytest.approx(offset)  # not measured again on a resumed run


def test_a_step_whose_loss_is_not_finite_changes_nothing_and_is_counted(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An overflow in the learner's own forward (planted here as one inf weight) makes the loss NaN: that step updates
    no other weight, no log Z and no priority, says so in its metrics, and the next finite step trains as usual."""
    cfg = _cfg(0)
    store = _filled_store(cfg)
    learner = Learner(cfg.learner_spec(), tiny_model_dir, store, weights_root=tmp_path / "w")
    assert learner.step() is not None
    weights = {k: v.clone() for k, v in learner.engine.module.state_dict().items()}
    log_z = {k: v.clone() for k, v in learner.log_z.state_dict().items()}  # type: ignore[union-attr]
    priorities = dict(zip(store.keys(), store._priority.tolist(), strict=False))
    planted = next(p for name, p in learner.engine.module.named_parameters() if "layers.0" in name and p.dim() == 2)
    with torch.no_grad():
        saved, planted[0, 0] = planted[0, 0].item(), float("inf")
    result = learner.step()
    assert result is not None and not math.isfinite(result.loss)  # refused by the objective, naming the samples
    assert result.metrics["nonfinite_steps"] == 1 and math.isnan(result.grad_norm)
    with torch.no_grad():
        planted[0, 0] = saved
    after = learner.engine.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert all(torch.equal(learner.log_z.state_dict()[k], v) for k, v in log_z.items())  # type: ignore[union-attr]
    assert dict(zip(store.keys(), store._priority.tolist(), strict=False)) == priorities
    healthy = learner.step()
    assert healthy is not None and math.isfinite(healthy.loss) and healthy.metrics["nonfinite_steps"] == 1
    assert not all(torch.equal(learner.engine.module.state_dict()[k], v) for k, v in weights.items())
    with torch.no_grad():
        planted[0, 0] = float("inf")  # a policy that stays broken: after 5 such steps in a row, the run stops
    for _ in range(4):
        learner.step()
    with pytest.raises(NonFiniteLossError, match="5 steps in a row had a non-finite loss"):
        learner.step()
