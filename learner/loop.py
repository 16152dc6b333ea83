"""The learner: sample a batch from the replay, recompute log-probs under the current weights, apply the
configured objective, step, write back accuracy estimates and priorities, and publish weights.

One `Learner.step()`:
  store.sample(main groups, success responses) -> collate -> per micro-batch of whole groups: token_logprobs
  (+ hidden states or frozen prompt embeddings for log Z) -> ObjectiveInputs -> OBJECTIVES[kind] -> backward
  -> DeepSpeed step + log Z step -> PACED-RL: a(x) for every training prompt into the store (the scheduler reads
  them) -> store.update_priorities -> every publish_every steps: publish_weights + store.announce_weights.
The learner never waits for a particular actor; it waits only while the replay is empty. Groups older than
`replay.max_policy_lag` versions never reach it (the store evicts them), and the lag of what it trains on is
reported every step, with PACED-RL's calibration of a(x) against the accuracy of each fresh group.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from configs.dtypes import torch_dtype
from configs.schema import LearnerSpec, PacedObjectiveConfig, PowerFlowObjectiveConfig, TBObjectiveConfig
from learner.batching import TrainBatch, collate, micro_batches
from learner.calibration import GroupOutcome, calibration_metrics, informative_counts
from learner.checkpoint import io_errors_as_os_errors, load_state, save_state
from learner.deepspeed_engine import PolicyEngine
from learner.log_partition import LogZHead, ZPhi, accuracy_estimate, measured_offset, power_offset
from learner.logprobs import token_logprobs
from learner.objectives import NonFiniteLossError, ObjectiveInputs, compute_objective, tb_log_reward
from learner.weights import WeightSlots, announcement, publish_weights
from replay.handshake import wait_for_batch
from replay.priority import estimate_error
from replay.records import SampledBatch, encode_weight_version
from replay.store import ReplayStore
from replay.weight_broadcast import WeightSender, broadcast_uri
from replay.weight_store import ship

log = logging.getLogger(__name__)

MAX_NONFINITE_IN_A_ROW = 5
"""A single non-finite batch is skipped; this many in a row mean the policy diverged, and the run stops."""

# PACED-RL embeds the training prompts once with the frozen reference model: this many before the first step
# (their statistics standardise Z_phi's inputs), the rest this many per step, so a large dataset costs no
# long pause at start (SmolLM2-135M embeds ~2,000 prompt tokens/s on 2 CPU cores).
_EMBED_AT_START = 512
CONSTANT_WINDOW_STEPS = 4
_EMBED_PER_STEP = 64


@dataclass
class StepResult:
    step: int
    version: int
    loss: float
    metrics: dict[str, float]
    groups: int
    rows: int
    tokens: int
    reward_mean: float
    lag_mean: float
    lag_max: int
    wait_s: float
    compute_s: float
    publish_s: float
    grad_norm: float
    published: bool = False
    calibration: list[list[Any]] = field(default_factory=list)
    """PACED-RL: [prompt id, a(x) before the step, group accuracy, samples, selection] per fresh group."""


def _batch_prompts(batch: TrainBatch) -> dict[str, list[int]]:
    """Each group's prompt token ids, by prompt id."""
    prompts: dict[str, list[int]] = {}
    for row, gid in enumerate(batch.group_B.tolist()):
        n = int(batch.prompt_mask_BT[row].sum())
        prompts.setdefault(batch.prompt_ids[gid], batch.input_ids_BT[row, :n].tolist())
    return prompts


class Learner:
    """`prompts` are the training prompts' token ids by prompt id, as the actors encode them: PACED-RL writes a(x)
    for all of them after every step, so the scheduler can rank prompts no actor has rolled out yet. Without
    them, a(x) covers the prompts the learner has trained on."""

    def __init__(
        self,
        cfg: LearnerSpec,
        model_dir: Path,
        store: ReplayStore,
        *,
        weights_root: Path,
        prompts: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.store = store
        self.weights_root = weights_root
        torch.manual_seed(cfg.seed)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(cfg.learner.dtype))
        self.log_z = self._build_log_z(policy.config.hidden_size)
        self.reference = None
        self._normalised = False
        self._embeddings: dict[str, Tensor] = {}
        self.train_prompts: dict[str, list[int]] = {}
        if isinstance(cfg.objective, PacedObjectiveConfig):  # Z_phi reads frozen reference prompt embeddings
            # The base model without its LM head: the last hidden states are all Z_phi needs.
            self.reference = AutoModel.from_pretrained(model_dir, dtype=torch_dtype(cfg.learner.dtype)).eval()
            self.reference.requires_grad_(False)
            self.train_prompts = {pid: list(ids) for pid, ids in (prompts or {}).items()}
        self.engine = PolicyEngine(policy, cfg.learner)
        # DeepSpeed put the policy on the learner's accelerator (or left it on the CPU): everything the learner
        # computes with lives there too. Batches are collated on the CPU and moved per micro-batch (`_inputs`).
        self.device = next(self.engine.module.parameters()).device
        if self.log_z is not None:
            self.log_z.to(self.device)
        if self.reference is not None:
            self.reference.to(self.device)
        if self.train_prompts:
            first = dict(list(self.train_prompts.items())[:_EMBED_AT_START])
            self._normalise(self._embed(first))
        # The log Z parameters have their own optimizer and learning rate, no weight decay; they live outside the
        # DeepSpeed-wrapped policy, so they are never part of the published weights.
        self.log_z_opt = None
        if self.log_z is not None:
            lr = cfg.objective.log_z_lr  # type: ignore[union-attr]
            self.log_z_opt = torch.optim.AdamW(self.log_z.parameters(), lr=lr, weight_decay=0.0)
        self.step_count = 0
        self.nonfinite_steps = 0
        """Steps whose loss was not finite: counted, their update skipped."""
        self._nonfinite_in_a_row = 0
        self.version = 0
        self._probe: tuple[list[int], list[int]] | None = None
        self._slots: WeightSlots | None = None
        self.sender: WeightSender | None = None
        """broadcast transport: the newest version's snapshot, served to clients by LearnerServer."""
        # Accuracies of the fresh groups of the last few steps: their mean is the constant estimate that a(x) is
        # compared with (recent, so that it follows a policy that improves, as a(x) has to).
        self._recent_accuracy: deque[list[float]] = deque(maxlen=CONSTANT_WINDOW_STEPS)

    def _calibrate_log_z(self, batch: TrainBatch) -> None:
        """PowerFlow with log_z_offset_per_token 'auto': the head's offset from the first batch, before any update
        (a resumed run has its measured offset in the checkpoint, and a step count above 0)."""
        obj = self.cfg.objective
        if not (isinstance(obj, PowerFlowObjectiveConfig) and obj.log_z_offset_per_token == "auto"):
            return
        assert isinstance(self.log_z, LogZHead) and batch.base_logp_BT is not None  # PowerFlow's rows carry them
        offset = measured_offset(batch.base_logp_BT, batch.response_mask_BT, obj.alpha)
        self.log_z.offset.fill_(offset)
        log.info("log Z' offset measured on the first batch: %.3f (alpha %.2f)", offset, obj.alpha)

    def _build_log_z(self, hidden: int) -> nn.Module | None:
        obj = self.cfg.objective
        if isinstance(obj, TBObjectiveConfig):
            return LogZHead(hidden, clamp=obj.log_z_clamp) if obj.log_z == "head" else None
        if isinstance(obj, PowerFlowObjectiveConfig):
            per_token = 0.0 if obj.log_z_offset_per_token == "auto" else obj.log_z_offset_per_token  # auto: step 1
            return LogZHead(hidden, offset=power_offset(per_token, obj.alpha), clamp=obj.log_z_clamp)
        if isinstance(obj, PacedObjectiveConfig):
            return ZPhi(hidden, obj.z_phi_hidden, beta=obj.beta, clamp=obj.log_z_clamp)
        return None

    # ----------------------------------------------------------------------------------------- one step
    def step(self, *, wait_timeout_s: float = 600.0) -> StepResult | None:
        """One optimizer step; None when the replay had no usable batch within `wait_timeout_s`."""
        start = time.perf_counter()
        batch = self._next_batch(time.monotonic() + wait_timeout_s)
        if batch is None:
            return None
        wait_s = time.perf_counter() - start

        start = time.perf_counter()
        self._probe = self._probe or self._make_probe(batch)
        if self.step_count == 0:
            self._calibrate_log_z(batch)
        outcomes = self._outcomes(batch)  # before the update: the estimates the scheduler picked prompts with
        try:
            metrics, deltas = self._accumulate(batch)
            finite, why = True, ""
        except NonFiniteLossError as exc:  # names the samples; earlier micro-batches' gradients are dropped below
            metrics, deltas, finite, why = {"loss": math.nan}, torch.empty(0), False, str(exc)
        if finite:
            grad_norm = self.engine.step()
            if self.log_z_opt is not None:
                torch.nn.utils.clip_grad_norm_(self.log_z.parameters(), self.cfg.learner.grad_clip)  # type: ignore[union-attr]
                self.log_z_opt.step()
            self._nonfinite_in_a_row = 0
        else:  # one bad batch must not write NaN into every weight, log Z and priority, nor end a days-long run
            self.engine.discard_gradients()
            self.nonfinite_steps += 1
            self._nonfinite_in_a_row += 1
            grad_norm = math.nan
            if self._nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise NonFiniteLossError(
                    f"{self._nonfinite_in_a_row} steps in a row had a non-finite loss: the policy itself has likely "
                    f"diverged (lower learner.lr, check learner.dtype); the last: {why}"
                )
            log.warning("step %d: no update, gradients dropped: %s", self.step_count + 1, why)
        if self.log_z_opt is not None:
            self.log_z_opt.zero_grad(set_to_none=True)
        self.step_count += 1
        metrics.update(self._batch_metrics(batch, outcomes))
        metrics["nonfinite_steps"] = float(self.nonfinite_steps)
        if finite:
            self._write_back(batch, deltas)
        compute_s = time.perf_counter() - start

        start = time.perf_counter()
        published = self.step_count % self.cfg.learner.publish_every_steps == 0
        if published:
            self.publish()
        publish_s = time.perf_counter() - start
        on_policy = batch.reward_B[(batch.replayed_B == 0) & ~torch.isnan(batch.reward_B)]
        return StepResult(
            step=self.step_count,
            version=self.version,
            loss=metrics["loss"],
            metrics=metrics,
            groups=len(batch.keys),
            rows=batch.num_rows,
            tokens=batch.num_tokens,
            reward_mean=float(on_policy.mean()) if len(on_policy) else float("nan"),
            lag_mean=float(batch.policy_lag_B.float().mean()),
            lag_max=int(batch.policy_lag_B.max()),
            wait_s=wait_s,
            compute_s=compute_s,
            publish_s=publish_s,
            grad_norm=grad_norm,
            published=published,
            calibration=[[o.prompt_id, o.estimate, o.accuracy, o.samples, o.selection] for o in outcomes],
        )

    def _next_batch(self, deadline: float) -> TrainBatch | None:
        """Sample until a batch with at least one usable row arrives (a batch whose every reward is invalid is
        dropped and drawn again), or the deadline passes."""
        main, success = self.cfg.main_groups, self.cfg.success_responses
        seed = self.cfg.seed * 100_003 + self.step_count
        while True:
            sampled = self._sample(main, success, seed, deadline)
            if sampled is None:
                return None
            batch = collate(
                sampled,
                pad_id=self.pad_id,
                current_version=self.version,
                drop_invalid_rewards=self.cfg.objective.kind != "powerflow",
            )
            if batch.num_rows:
                return batch
            log.warning("every reward in a batch of %d groups was invalid; drawing another", len(sampled.groups))
            seed += 1

    def _sample(self, main: int, success: int, seed: int, deadline: float) -> SampledBatch | None:
        if self.cfg.learner.sync and not wait_for_batch(self.store, num_groups=main, deadline=deadline):
            return None
        while True:
            sampled = self.store.sample(main, num_success=success, seed=seed)
            if sampled.groups:
                return sampled
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def _accumulate(self, batch: TrainBatch) -> tuple[dict[str, float], Tensor]:
        """Forward/backward every micro-batch; the losses are scaled so the gradient is that of the batch mean."""
        chunks = micro_batches(batch, self.cfg.learner.micro_batch_size)
        totals: dict[str, float] = {}
        deltas: list[Tensor] = []
        for i, mb in enumerate(chunks):
            out = compute_objective(self._inputs(mb), self.cfg.objective)
            weight = mb.num_rows / batch.num_rows
            self.engine.backward(out.loss * weight, last=i == len(chunks) - 1)
            for name, value in out.metrics.items():
                totals[name] = totals.get(name, 0.0) + value * weight
            deltas.append(out.delta_B.detach().cpu())
        return totals, torch.cat(deltas)

    def _inputs(self, mb: TrainBatch) -> ObjectiveInputs:
        obj = self.cfg.objective
        want_hidden = isinstance(self.log_z, LogZHead)
        autocast = self.cfg.learner.autocast
        mb = mb.to(self.device)
        with torch.autocast(self.device.type, dtype=torch_dtype(autocast or "bfloat16"), enabled=autocast is not None):
            logp_BT, hidden = token_logprobs(
                self.engine.module,
                mb.input_ids_BT,
                mb.attention_mask_BT,
                mb.response_mask_BT,
                return_hidden=want_hidden,
            )
        log_z_B = None
        if isinstance(self.log_z, LogZHead):
            log_z_B = self.log_z(hidden.float(), mb.prompt_mask_BT)  # type: ignore[union-attr]
        elif isinstance(self.log_z, ZPhi):
            log_z_B = self.log_z(self._row_embeddings(mb))
        base = mb.base_logp_BT
        inputs = ObjectiveInputs(
            logp_BT=logp_BT,
            mask_BT=mb.response_mask_BT,
            group_B=mb.group_B,
            # PACED-RL: pi_old is this update's starting policy for every row, fresh or replayed (see paced_loss).
            old_logp_BT=logp_BT.detach() if obj.kind == "paced" else mb.behaviour_logp_BT,
            ref_logp_BT=base,
            reward_B=mb.reward_B,
            log_z_B=log_z_B,
            has_format_B=mb.has_answer_B,
            replayed_B=mb.replayed_B,
            sample_names=mb.sample_names,
        )
        if isinstance(obj, TBObjectiveConfig):
            ref_sum = base.sum(-1) if (obj.use_reference and base is not None) else None
            inputs.log_reward_B = tb_log_reward(mb.reward_B, obj.beta, ref_sum)
        return inputs

    # ----------------------------------------------------------------------------------------- PACED-RL's a(x)
    @torch.no_grad()
    def _embed(self, prompts: dict[str, list[int]], batch_size: int = 32) -> dict[str, Tensor]:
        """Frozen reference model's last hidden state, mean-pooled over each prompt's tokens; cached by prompt id."""
        assert self.reference is not None
        todo = [(pid, ids) for pid, ids in prompts.items() if pid not in self._embeddings]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            width = max(len(ids) for _, ids in chunk)
            ids_BT = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask_BT = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (_, ids) in enumerate(chunk):
                ids_BT[row, : len(ids)] = torch.tensor(ids)
                mask_BT[row, : len(ids)] = 1
            ids_BT, mask_BT = ids_BT.to(self.device), mask_BT.to(self.device)
            hidden = self.reference(input_ids=ids_BT, attention_mask=mask_BT).last_hidden_state.float()
            mask = mask_BT.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            for row, (pid, _) in enumerate(chunk):
                self._embeddings[pid] = pooled[row].clone()
        return {pid: self._embeddings[pid] for pid in prompts}

    def _normalise(self, embedded: dict[str, Tensor]) -> None:
        """Fix Z_phi's input standardisation once, from the training prompts (or the first batch's)."""
        assert isinstance(self.log_z, ZPhi)
        self.log_z.set_normalisation(torch.stack(list(embedded.values())))
        self._normalised = True

    def _row_embeddings(self, mb: TrainBatch) -> Tensor:
        embedded = self._embed(_batch_prompts(mb))
        return torch.stack([embedded[mb.prompt_ids[gid]] for gid in mb.group_B.tolist()])

    @torch.no_grad()
    def accuracy_estimates(self, prompts: dict[str, list[int]]) -> dict[str, float]:
        """a(x) = clip(beta log Z_phi(x), 0, 1) for any prompts (token ids by prompt id): no rollout needed."""
        if not isinstance(self.log_z, ZPhi) or not prompts:
            return {}
        embedded = self._embed(prompts)
        if not self._normalised:
            self._normalise(embedded)
        ids = list(embedded)
        beta = self.cfg.objective.beta  # type: ignore[union-attr]
        values = accuracy_estimate(self.log_z(torch.stack([embedded[p] for p in ids])), beta)
        return dict(zip(ids, values.tolist(), strict=True))

    def _outcomes(self, batch: TrainBatch) -> list[GroupOutcome]:
        """Fresh whole groups: the estimate each was scheduled with, and its accuracy."""
        estimates = self.accuracy_estimates(_batch_prompts(batch))
        outcomes = []
        for gid, pid in enumerate(batch.prompt_ids):
            rewards = batch.reward_B[batch.group_B == gid]
            rewards = rewards[~torch.isnan(rewards)]
            if batch.replayed[gid] or not batch.fresh[gid] or len(rewards) == 0:
                continue
            estimate = estimates.get(pid, float("nan"))
            outcomes.append(GroupOutcome(pid, estimate, float(rewards.mean()), len(rewards), batch.selections[gid]))
        return outcomes

    def _batch_metrics(self, batch: TrainBatch, outcomes: list[GroupOutcome]) -> dict[str, float]:
        """What the batch held (failed responses, replayed rows) and, for PACED-RL, how well a(x) predicted it."""
        valid = ~torch.isnan(batch.reward_B)
        on_policy = valid & (batch.replayed_B == 0)
        drawn = np.array([p for p, r in zip(batch.priorities, batch.replayed, strict=True) if not r] or [np.nan])
        metrics = {
            # The replay's priority distribution as the learner draws from it (main table).
            "priority_p10": float(np.quantile(drawn, 0.1)),
            "priority_p50": float(np.quantile(drawn, 0.5)),
            "priority_p90": float(np.quantile(drawn, 0.9)),
            "rows_replayed": float(batch.replayed_B.sum()),
            "groups_fresh": float(sum(f and not r for f, r in zip(batch.fresh, batch.replayed, strict=True))),
            "failed_frac": float((batch.reward_B[on_policy] < 1).float().mean()) if on_policy.any() else float("nan"),
            **informative_counts(outcomes),
        }
        if isinstance(self.log_z, ZPhi):
            metrics.update(calibration_metrics(outcomes, self._recent_mean_accuracy()))
        self._recent_accuracy.append([o.accuracy for o in outcomes])
        recent = self._recent_mean_accuracy()
        if isinstance(self.log_z, ZPhi) and recent is not None:  # the level of a(x) for the next prompts (see ZPhi)
            self.log_z.set_offset(recent)
        return metrics

    def _recent_mean_accuracy(self) -> float | None:
        """Mean accuracy of the fresh groups of the last CONSTANT_WINDOW_STEPS steps (None before any)."""
        recent = [a for step in self._recent_accuracy for a in step]
        return sum(recent) / len(recent) if recent else None

    def _write_back(self, batch: TrainBatch, deltas: Tensor) -> None:
        """PACED-RL: a(x) for every embedded training prompt (the scheduler ranks candidates with them) and the
        new error priorities of the batch's groups; other objectives: each group's mean |delta| as its priority."""
        main = [gid for gid in range(len(batch.keys)) if not batch.replayed[gid]]
        if isinstance(self.log_z, ZPhi):
            pending = [(p, ids) for p, ids in self.train_prompts.items() if p not in self._embeddings]
            self._embed(dict(pending[:_EMBED_PER_STEP]))
            known = {p: ids for p, ids in self.train_prompts.items() if p in self._embeddings}
            estimates = self.accuracy_estimates({**known, **_batch_prompts(batch)})
            self.store.put_acc_estimates(estimates)
            priorities = [
                estimate_error(batch.reward_B[batch.group_B == gid].numpy(), estimates[batch.prompt_ids[gid]])
                for gid in main
            ]
        else:
            priorities = [float(deltas[batch.group_B == gid].abs().mean()) for gid in main]
        self.store.update_priorities([batch.keys[gid] for gid in main], priorities)

    # ----------------------------------------------------------------------------------------- weights
    def _make_probe(self, batch: TrainBatch) -> tuple[list[int], list[int]]:
        """A real prompt and response from the first batch, teacher-forced after every publish."""
        prompt = batch.input_ids_BT[0][batch.prompt_mask_BT[0].bool()].tolist()
        response = batch.input_ids_BT[0][batch.response_mask_BT[0].bool()].tolist()[:16]
        return prompt, response or [self.pad_id]

    def publish(self, *, bump: bool = True) -> None:
        """Hand the current policy to the actors as the next version (or again as the current one, after a resume)
        through the run's transport, and announce it; the log Z heads are never included."""
        self.version += int(bump)
        engine_dtype = torch_dtype(self.cfg.engine_dtype)  # what the rollout engines hold: half the bytes for bf16
        transport = self.cfg.weight_transport
        state = self.engine.full_state_dict(on_cpu=transport != "broadcast")
        if transport == "shared_memory":  # copied in place into a slot, cast on the way
            if self._slots is None:
                self._slots = WeightSlots(self.weights_root, dtype=engine_dtype)
            path = str(self._slots.publish(state, self.version))
        elif transport == "broadcast":  # served from the snapshot below, on request (replay/weight_broadcast.py)
            path = broadcast_uri(self.cfg.learner_actor, self.version)
        else:
            state = {k: v.to(engine_dtype) if v.is_floating_point() else v for k, v in state.items()}
            if transport == "object_store":  # any node, no shared path (replay/weight_store.py)
                path = ship(self.cfg.weight_store, self.cfg.ray_namespace, self.version, state)
            else:
                path = str(publish_weights(self.engine.module, state, self.weights_root, version=self.version))
        probe = self._probe or ([self.pad_id], [self.pad_id])
        weights = announcement(
            self.engine.module,
            path,
            version=self.version,
            step=self.step_count,
            probe=probe,
            engine_dtype=self.cfg.engine_dtype,
        )
        if transport == "broadcast":  # the snapshot and the announcement it is sent with change together
            if self.sender is None:
                device = next(self.engine.module.parameters()).device
                self.sender = WeightSender(
                    host=self.cfg.weight_broadcast_host,
                    device=device,
                    dtype=engine_dtype,
                    timeout_s=self.cfg.weight_broadcast_timeout_s,
                )
            self.sender.publish(state, self.version, encode_weight_version(weights))
        self.store.announce_weights(weights)

    # ----------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: Path) -> None:
        """Policy (Hugging Face format), optimizer states, log Z head, counters and RNG; safetensors + JSON only."""
        zero_stage = self.engine.engine.zero_optimization_stage()
        state: dict[str, Any] = {
            "step": self.step_count,
            "nonfinite_steps": self.nonfinite_steps,
            "version": self.version,
            "probe": list(self._probe) if self._probe else None,
            # ZeRO 1-3 partition the optimizer state into structures that only DeepSpeed's pickle-based checkpoint
            # round-trips; paceflow does not load pickles, so those stages resume with fresh AdamW moments.
            "policy_optimizer": self.engine.engine.optimizer.state_dict() if zero_stage == 0 else None,
            "torch_rng": torch.get_rng_state(),
            "embeddings": dict(self._embeddings),
            "recent_accuracy": [list(step) for step in self._recent_accuracy],
        }
        if self.log_z is not None and self.log_z_opt is not None:
            state["log_z"] = self.log_z.state_dict()
            state["log_z_optimizer"] = self.log_z_opt.state_dict()
        with io_errors_as_os_errors():
            self.save_pretrained(directory / "policy")
            save_state(directory / "learner", state)

    def load_checkpoint(self, directory: Path) -> None:
        from safetensors.torch import load_file

        weights: dict[str, Tensor] = {}
        for path in sorted((directory / "policy").glob("*.safetensors")):
            weights.update(load_file(str(path)))
        missing, unexpected = self.engine.load_module_state(weights)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(
                f"{directory}: checkpoint does not fit the model (missing {missing}, unexpected {unexpected})"
            )
        state = load_state(directory / "learner")
        if state["policy_optimizer"] is not None:
            self.engine.engine.optimizer.load_state_dict(state["policy_optimizer"])
        else:
            log.warning("%s: no optimizer state in the checkpoint (ZeRO stage >= 1): AdamW moments restart", directory)
        if self.log_z is not None and self.log_z_opt is not None:
            if isinstance(self.log_z, LogZHead):  # checkpoints from before the offset was saved: the configured one
                state["log_z"].setdefault("offset", self.log_z.offset)
            self.log_z.load_state_dict(state["log_z"])
            self.log_z_opt.load_state_dict(state["log_z_optimizer"])
            self._normalised = True  # Z_phi's standardisation is part of its state
        torch.set_rng_state(state["torch_rng"])
        self._embeddings = {pid: e.to(self.device) for pid, e in (state.get("embeddings") or {}).items()}
        self._recent_accuracy.extend([float(a) for a in step] for step in state.get("recent_accuracy", []))
        self.step_count, self.version = int(state["step"]), int(state["version"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))  # absent in checkpoints before it was counted
        self._probe = (list(state["probe"][0]), list(state["probe"][1])) if state["probe"] else None

    def save_pretrained(self, directory: Path) -> None:
        """A Hugging Face checkpoint of the policy that loads in transformers and vLLM."""
        self.engine.module.save_pretrained(directory, state_dict=self.engine.full_state_dict(), safe_serialization=True)
