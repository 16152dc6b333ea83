"""The learner: sample a batch from the replay, recompute log-probs under the current weights, apply the
configured objective, step, write back accuracy estimates and priorities, and publish weights.

One `Learner.step()`:
  store.sample -> collate -> per micro-batch of whole groups: token_logprobs (+ hidden states for the log Z head)
  -> ObjectiveInputs -> OBJECTIVES[kind] -> backward  ->  DeepSpeed step + log Z step
  -> store.put_acc_estimates (PACED) and store.update_priorities -> every publish_every steps: publish_weights
     + store.announce_weights.
The learner never waits for a particular actor; it waits only while the replay is empty. Groups older than
`replay.max_policy_lag` versions never reach it (the store evicts them), and the lag of what it trains on is
reported every step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from configs.schema import PacedObjectiveConfig, PowerFlowObjectiveConfig, RunConfig, TBObjectiveConfig
from learner.batching import TrainBatch, collate, micro_batches
from learner.checkpoint import load_state, save_state
from learner.deepspeed_engine import PolicyEngine
from learner.log_partition import LogZHead, ZPhi, accuracy_estimate
from learner.logprobs import token_logprobs
from learner.objectives import ObjectiveInputs, compute_objective, tb_log_reward
from learner.weights import publish_weights
from replay.store import ReplayStore

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    extra: dict[str, Any] = field(default_factory=dict)


class Learner:
    def __init__(self, cfg: RunConfig, model_dir: Path, store: ReplayStore, *, weights_root: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.store = store
        self.weights_root = weights_root
        torch.manual_seed(cfg.seed)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_DTYPES[cfg.learner.dtype])
        self.log_z = self._build_log_z(policy.config.hidden_size)
        self.reference = None
        if isinstance(cfg.objective, PacedObjectiveConfig):  # Z_phi reads frozen reference prompt embeddings
            self.reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            self.reference.requires_grad_(False)
        self._embeddings: dict[str, Tensor] = {}
        self.engine = PolicyEngine(policy, cfg.learner)
        # The log Z parameters have their own optimizer and learning rate, no weight decay; they live outside the
        # DeepSpeed-wrapped policy, so they are never part of the published weights.
        self.log_z_opt = None
        if self.log_z is not None:
            lr = cfg.objective.log_z_lr  # type: ignore[union-attr]
            self.log_z_opt = torch.optim.AdamW(self.log_z.parameters(), lr=lr, weight_decay=0.0)
        self.step_count = 0
        self.version = 0
        self._probe: tuple[list[int], list[int]] | None = None

    def _build_log_z(self, hidden: int) -> nn.Module | None:
        obj = self.cfg.objective
        if isinstance(obj, TBObjectiveConfig):
            return LogZHead(hidden, clamp=obj.log_z_clamp) if obj.log_z == "head" else None
        if isinstance(obj, PowerFlowObjectiveConfig):
            offset = obj.log_z_offset_per_token * (obj.alpha - 1.0)
            return LogZHead(hidden, offset=offset, clamp=obj.log_z_clamp)
        if isinstance(obj, PacedObjectiveConfig):
            return ZPhi(hidden, obj.z_phi_hidden, clamp=obj.log_z_clamp)
        return None

    # ----------------------------------------------------------------------------------------- one step
    def step(self, *, wait_timeout_s: float = 600.0) -> StepResult | None:
        """One optimizer step; None when the replay stayed empty for `wait_timeout_s`."""
        start = time.perf_counter()
        if self.cfg.learner.sync:  # one batch per version: wait until the actors delivered this version's groups
            while self.store.stats().fresh < self.cfg.learner.groups_per_step:
                if time.perf_counter() - start > wait_timeout_s:
                    return None
                time.sleep(0.02)
        seed = self.cfg.seed * 100_003 + self.step_count
        sampled = self.store.sample(self.cfg.learner.groups_per_step, seed=seed)
        while not sampled.groups:
            if time.perf_counter() - start > wait_timeout_s:
                return None
            time.sleep(0.05)
            sampled = self.store.sample(self.cfg.learner.groups_per_step, seed=seed)
        wait_s = time.perf_counter() - start

        start = time.perf_counter()
        supervised = self.cfg.objective.kind != "powerflow"
        batch = collate(
            sampled.groups,
            sampled.keys,
            pad_id=self.pad_id,
            current_version=self.version,
            drop_invalid_rewards=supervised,
        )
        if batch.num_rows == 0:  # every response had an invalid reward
            return self.step(wait_timeout_s=wait_timeout_s)
        self._probe = self._probe or self._make_probe(batch)
        metrics, deltas, estimates = self._accumulate(batch)
        grad_norm = self.engine.step()
        if self.log_z_opt is not None:
            torch.nn.utils.clip_grad_norm_(self.log_z.parameters(), self.cfg.learner.grad_clip)  # type: ignore[union-attr]
            self.log_z_opt.step()
            self.log_z_opt.zero_grad(set_to_none=True)
        self.step_count += 1
        self._write_back(batch, deltas, estimates)
        compute_s = time.perf_counter() - start

        start = time.perf_counter()
        published = self.step_count % self.cfg.learner.publish_every_steps == 0
        if published:
            self.publish()
        publish_s = time.perf_counter() - start
        valid = batch.reward_B[~torch.isnan(batch.reward_B)]
        return StepResult(
            step=self.step_count,
            version=self.version,
            loss=metrics["loss"],
            metrics=metrics,
            groups=len(batch.keys),
            rows=batch.num_rows,
            tokens=batch.num_tokens,
            reward_mean=float(valid.mean()) if len(valid) else float("nan"),
            lag_mean=float(batch.policy_lag_B.float().mean()),
            lag_max=int(batch.policy_lag_B.max()),
            wait_s=wait_s,
            compute_s=compute_s,
            publish_s=publish_s,
            grad_norm=grad_norm,
            published=published,
        )

    def _accumulate(self, batch: TrainBatch) -> tuple[dict[str, float], Tensor, dict[str, float]]:
        """Forward/backward every micro-batch; the losses are scaled so the gradient is that of the batch mean."""
        chunks = micro_batches(batch, self.cfg.learner.micro_batch_size)
        totals: dict[str, float] = {}
        deltas: list[Tensor] = []
        estimates: dict[str, float] = {}
        for i, mb in enumerate(chunks):
            inputs, log_z_B = self._inputs(mb)
            out = compute_objective(inputs, self.cfg.objective)
            weight = mb.num_rows / batch.num_rows
            self.engine.backward(out.loss * weight, last=i == len(chunks) - 1)
            for name, value in out.metrics.items():
                totals[name] = totals.get(name, 0.0) + value * weight
            deltas.append(out.delta_B)
            if isinstance(self.cfg.objective, PacedObjectiveConfig) and log_z_B is not None:
                acc = accuracy_estimate(log_z_B, self.cfg.objective.beta)
                for row, gid in enumerate(mb.group_B.tolist()):
                    estimates[mb.prompt_ids[gid]] = float(acc[row])
        return totals, torch.cat(deltas), estimates

    def _inputs(self, mb: TrainBatch) -> tuple[ObjectiveInputs, Tensor | None]:
        obj = self.cfg.objective
        want_hidden = isinstance(self.log_z, LogZHead)
        logp_BT, hidden = token_logprobs(
            self.engine.module, mb.input_ids_BT, mb.attention_mask_BT, mb.response_mask_BT, return_hidden=want_hidden
        )
        log_z_B = None
        if isinstance(self.log_z, LogZHead):
            log_z_B = self.log_z(hidden.float(), mb.prompt_mask_BT)  # type: ignore[union-attr]
        elif isinstance(self.log_z, ZPhi):
            log_z_B = self.log_z(self._reference_embeddings(mb))
        base = mb.base_logp_BT
        inputs = ObjectiveInputs(
            logp_BT=logp_BT,
            mask_BT=mb.response_mask_BT,
            group_B=mb.group_B,
            old_logp_BT=logp_BT.detach() if obj.kind == "paced" else mb.behaviour_logp_BT,
            ref_logp_BT=base,
            reward_B=mb.reward_B,
            log_z_B=log_z_B,
            has_format_B=mb.has_answer_B,
            sample_names=mb.sample_names,
        )
        if isinstance(obj, TBObjectiveConfig):
            ref_sum = base.sum(-1) if (obj.use_reference and base is not None) else None
            inputs.log_reward_B = tb_log_reward(mb.reward_B, obj.beta, ref_sum)
        return inputs, log_z_B

    @torch.no_grad()
    def _reference_embeddings(self, mb: TrainBatch) -> Tensor:
        """Frozen reference model's mean-pooled last hidden state over each prompt, cached by prompt id."""
        assert self.reference is not None
        rows = []
        for row, gid in enumerate(mb.group_B.tolist()):
            pid = mb.prompt_ids[gid]
            if pid not in self._embeddings:
                n = int(mb.prompt_mask_BT[row].sum())
                ids = mb.input_ids_BT[row : row + 1, :n]
                hidden = self.reference(input_ids=ids, output_hidden_states=True).hidden_states[-1]
                self._embeddings[pid] = hidden[0].mean(0)
            rows.append(self._embeddings[pid])
        return torch.stack(rows)

    def _write_back(self, batch: TrainBatch, deltas: Tensor, estimates: dict[str, float]) -> None:
        """PACED: new accuracy estimates and priorities |N/G - a(x)|; other objectives: mean |delta| per group."""
        if estimates:
            self.store.put_acc_estimates(estimates)
        priorities = []
        for gid, pid in enumerate(batch.prompt_ids):
            rows = batch.group_B == gid
            if estimates:
                rewards = batch.reward_B[rows]
                priorities.append(abs(float(rewards.mean()) - estimates[pid]))
            else:
                priorities.append(float(deltas[rows].abs().mean()))
        self.store.update_priorities(batch.keys, priorities)

    # ----------------------------------------------------------------------------------------- weights
    def _make_probe(self, batch: TrainBatch) -> tuple[list[int], list[int]]:
        """A real prompt and response from the first batch, teacher-forced after every publish."""
        prompt = batch.input_ids_BT[0][batch.prompt_mask_BT[0].bool()].tolist()
        response = batch.input_ids_BT[0][batch.response_mask_BT[0].bool()].tolist()[:16]
        return prompt, response or [self.pad_id]

    def publish(self, *, bump: bool = True) -> None:
        """Write the current policy as the next version (or again as the current one, after a resume) and announce
        it; the log Z heads are never included."""
        self.version += int(bump)
        module = self.engine.module
        engine_dtype = _DTYPES[self.cfg.model.dtype]  # what the rollout engines hold: half the bytes for bf16
        state = {
            k: v.to(engine_dtype) if v.is_floating_point() else v for k, v in self.engine.full_state_dict().items()
        }
        weights = publish_weights(
            module,
            state,
            self.weights_root,
            version=self.version,
            step=self.step_count,
            probe=self._probe or ([self.pad_id], [self.pad_id]),
            engine_dtype=self.cfg.model.dtype,
        )
        self.store.announce_weights(weights)

    # ----------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: Path) -> None:
        """Policy (Hugging Face format), optimizer states, log Z head, counters and RNG; safetensors + JSON only."""
        zero_stage = self.engine.engine.zero_optimization_stage()
        state: dict[str, Any] = {
            "step": self.step_count,
            "version": self.version,
            "probe": list(self._probe) if self._probe else None,
            # ZeRO 1-3 partition the optimizer state into structures that only DeepSpeed's pickle-based checkpoint
            # round-trips; paceflow does not load pickles, so those stages resume with fresh AdamW moments.
            "policy_optimizer": self.engine.engine.optimizer.state_dict() if zero_stage == 0 else None,
            "torch_rng": torch.get_rng_state(),
            "embeddings": dict(self._embeddings),
        }
        if self.log_z is not None and self.log_z_opt is not None:
            state["log_z"] = self.log_z.state_dict()
            state["log_z_optimizer"] = self.log_z_opt.state_dict()
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
            self.log_z.load_state_dict(state["log_z"])
            self.log_z_opt.load_state_dict(state["log_z_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self._embeddings = dict(state.get("embeddings") or {})
        self.step_count, self.version = int(state["step"]), int(state["version"])
        self._probe = (list(state["probe"][0]), list(state["probe"][1])) if state["probe"] else None

    def save_pretrained(self, directory: Path) -> None:
        """A Hugging Face checkpoint of the policy that loads in transformers and vLLM."""
        self.engine.module.save_pretrained(directory, state_dict=self.engine.full_state_dict(), safe_serialization=True)
