"""The only module that imports DeepSpeed: build the policy's engine from `learner:` config, accumulate
micro-batch gradients, step, save and load.

ZeRO stage 0-3 from `learner.deepspeed.zero_stage` (all four run on CPU; gloo when there is no GPU). Gradient
accumulation is driven by the learner, not by a fixed `gradient_accumulation_steps`: a step has as many
micro-batches as its sampled groups need, so the boundary is set explicitly before each backward.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
from torch import Tensor, nn

from configs.schema import LearnerConfig


def deepspeed_config(cfg: LearnerConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: DeepSpeed's fused CPU Adam would JIT-compile a C++ extension first (~155 s here).
            "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": True},
        },
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.warmup_steps:
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, "warmup_num_steps": cfg.warmup_steps},
        }
    return config


def _single_process_env() -> None:
    """A one-process world when no launcher set one up (a Ray actor, a test, a laptop run). A port this function
    chose in another process (inherited by a child, e.g. a Ray worker started after a learner in the same
    process) is in use there: choose again. A launcher's MASTER_PORT (torchrun, deepspeed) is kept."""
    chosen_by = os.environ.get("PACEFLOW_MASTER_PORT_PID")
    if "MASTER_PORT" not in os.environ or (chosen_by is not None and chosen_by != str(os.getpid())):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ["PACEFLOW_MASTER_PORT_PID"] = str(os.getpid())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)


class PolicyEngine:
    def __init__(self, model: nn.Module, cfg: LearnerConfig) -> None:
        import deepspeed

        _single_process_env()
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(cfg),
        )

    @property
    def module(self) -> Any:
        """The wrapped Hugging Face model (a PreTrainedModel: save_pretrained, config, ...)."""
        return self.engine.module

    def backward(self, loss: Tensor, *, last: bool) -> None:
        """Accumulate gradients of an already-scaled micro-batch loss; `last` marks the step's boundary."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Apply the accumulated gradients; returns the global gradient norm before clipping."""
        local = [p.grad for p in self.module.parameters() if p.grad is not None]
        # ZeRO-2/3 partition the gradients and report the norm themselves; stages 0/1 leave them on the params.
        fallback = float(torch.nn.utils.get_total_norm(local)) if local else float("nan")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else fallback

    def discard_gradients(self) -> None:
        """Drop the accumulated gradients without an update (a batch whose loss was not finite)."""
        self.engine.zero_grad()
        if self.engine.zero_optimization_stage() > 0:  # ZeRO keeps its own partitioned gradient buffers
            self.engine.optimizer.zero_grad()

    def full_state_dict(self, *, on_cpu: bool = True) -> dict[str, Tensor]:
        """The whole policy, gathered from ZeRO-3 shards when needed; on CPU unless `on_cpu` is False (a GPU
        broadcast sends from the device)."""
        if self.engine.zero_optimization_stage() == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict()
        return {k: v.detach().cpu() if on_cpu else v.detach() for k, v in state.items()}

    def load_module_state(self, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
        """Load full weights into the policy; under ZeRO-3 the partitioned parameters are gathered first."""
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=0):
                result = self.module.load_state_dict(state, strict=False)
        else:
            result = self.module.load_state_dict(state, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)
