"""Learner throughput: a TB step through paceflow's learner path vs a plain causal-LM cross-entropy step on the
same tokens with the same DeepSpeed engine, in float32 and in bfloat16 (learner.dtype), the loss curve of a few
TB steps in both, and weight publishing vs a raw state-dict copy. Prints JSON.

    .venv/bin/python bench/learner.py                  # tiny model and SmolLM2-135M
    .venv/bin/python bench/learner.py --models tiny

Both steps see identical batches (groups of G responses padded to the same width) and both run forward, backward
and an AdamW step under DeepSpeed ZeRO-0 on CPU; tokens/s counts non-padding tokens. The TB step adds the log Z
head, the objective and the float32 log-prob sums; the target is >= 0.9x the plain step. Publishing copies the
policy, cast to the engine dtype, into a preallocated shared-memory slot (learner/weights.py: WeightSlots); the
baseline clones each of the state dict's tensors, tied ones once (target <= 2x). The announcement's probe (one
short forward pass) and the directory-per-version path (save_pretrained; shared filesystems) are timed beside it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import SHAPES, run_per_model


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_model(name: str, model_dir: Path, args: argparse.Namespace) -> dict:
    import torch

    from learner.batching import collate
    from replay.records import RolloutGroup, SampledBatch

    gen = torch.Generator().manual_seed(0)
    vocab = _vocab_size(model_dir)
    groups = [
        RolloutGroup.new(
            prompt_id=f"p{i}",
            prompt_token_ids=torch.randint(3, vocab, (args.prompt_tokens,), generator=gen).tolist(),
            responses=[torch.randint(3, vocab, (args.response_tokens,), generator=gen).tolist() for _ in range(args.g)],
            behaviour_logprobs=[[-1.0] * args.response_tokens for _ in range(args.g)],
            rewards=[float(j % 2) for j in range(args.g)],
            policy_version=0,
            actor_id="bench",
        )
        for i in range(args.groups)
    ]
    batch = collate(SampledBatch.of_fresh(groups), pad_id=0, current_version=0, drop_invalid_rewards=True)
    batch = batch.to(torch.device(args.device))  # where DeepSpeed puts the policy (the accelerator when there is one)
    row: dict[str, Any] = {
        "model": name,
        "batch": f"{args.groups} groups x {args.g} responses, {args.prompt_tokens}+{args.response_tokens} tokens",
        "tokens_per_step": batch.num_tokens,
    }
    curves = {}
    for dtype in args.dtypes:
        tag = {"float32": "fp32", "bfloat16": "bf16", "autocast": "bf16ac"}[dtype]
        result = _bench_dtype(model_dir, batch, dtype, args)
        row["parameters"] = result.pop("parameters")
        curves[tag] = result.pop("loss_curve")
        row.update({f"{tag}_{k}": v for k, v in result.items()})
    if "fp32" in curves and "bf16" in curves:
        row["bf16_vs_fp32_tb_tok_s"] = round(row["bf16_tb_step_tok_s"] / row["fp32_tb_step_tok_s"], 2)
        # The same TB steps on the same batch from the same initial weights: how far bfloat16 strays from
        # float32, against how far the loss itself moves over those steps.
        row["loss_curve_fp32"] = curves["fp32"]
        row["loss_curve_bf16"] = curves["bf16"]
        gaps = [abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"], strict=True)]
        row["loss_curve_max_abs_diff"] = round(max(gaps), 4)
        row["loss_curve_range_fp32"] = round(max(curves["fp32"]) - min(curves["fp32"]), 4)
    if "fp32" in curves and "bf16ac" in curves:
        row["bf16ac_vs_fp32_tb_tok_s"] = round(row["bf16ac_tb_step_tok_s"] / row["fp32_tb_step_tok_s"], 2)
        row["loss_curve_bf16ac"] = curves["bf16ac"]
        gaps = [abs(a - b) for a, b in zip(curves["fp32"], curves["bf16ac"], strict=True)]
        row["loss_curve_bf16ac_max_abs_diff"] = round(max(gaps), 4)
    return row


def _vocab_size(model_dir: Path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).vocab_size)


def _bench_dtype(model_dir: Path, batch: Any, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """One engine in `dtype` (DeepSpeed bf16 = bf16 weights and arithmetic, fp32 master weights in the
    optimizer): plain CE step vs TB step, a short TB loss curve from the initial weights, and publishing."""
    import torch
    from transformers import AutoModelForCausalLM

    from configs.dtypes import torch_dtype
    from configs.schema import LearnerConfig, TBObjectiveConfig
    from learner.deepspeed_engine import PolicyEngine
    from learner.log_partition import LogZHead
    from learner.logprobs import token_logprobs
    from learner.objectives import ObjectiveInputs, tb_log_reward, tb_loss

    mode, dtype = dtype, "float32" if dtype == "autocast" else dtype  # autocast: float32 weights, bf16 matmuls
    torch.manual_seed(0)
    if any(model_dir.glob("*.safetensors")):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype))
    else:  # a SHAPES entry: the real model's architecture with random weights
        from transformers import AutoConfig

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch_dtype(dtype))
    cfg = LearnerConfig(lr=args.lr, groups_per_step=args.groups, micro_batch_size=batch.num_rows, dtype=dtype)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=mode == "autocast")
    engine = PolicyEngine(model, cfg)
    head = LogZHead(model.config.hidden_size).to(args.device)  # float32, as in the learner
    head_opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    objective = TBObjectiveConfig(use_reference=False)

    def tb_step() -> float:
        with autocast:
            logp, hidden = token_logprobs(
                engine.module, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT, return_hidden=True
            )
        inputs = ObjectiveInputs(
            logp_BT=logp,
            mask_BT=batch.response_mask_BT,
            group_B=batch.group_B,
            log_reward_B=tb_log_reward(batch.reward_B, objective.beta),
            log_z_B=head(hidden.float(), batch.prompt_mask_BT),  # type: ignore[union-attr]  # return_hidden
        )
        loss = tb_loss(inputs, objective).loss
        engine.backward(loss, last=True)
        engine.step()
        head_opt.step()
        head_opt.zero_grad()
        return float(loss.detach())

    def ce_step() -> None:
        labels = batch.input_ids_BT.masked_fill(batch.response_mask_BT == 0, -100)
        with autocast:
            out = engine.module(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, labels=labels)
        engine.backward(out.loss, last=True)
        engine.step()

    curve = [round(tb_step(), 4) for _ in range(args.curve_steps)]  # first, from the initial weights
    tokens = batch.num_tokens
    ce_s, tb_s = best_of(ce_step, args.repeats), best_of(tb_step, args.repeats)
    result: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "ce_step_tok_s": round(tokens / ce_s, 1),
        "tb_step_tok_s": round(tokens / tb_s, 1),
        "tb_vs_ce": round(ce_s / tb_s, 3),
        "loss_curve": curve,
    }
    if args.publish:
        result.update(_bench_publish(engine, batch, dtype, args))
    return result


def _bench_publish(engine: Any, batch: Any, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """Weight publishing: the shared-memory slot and a directory per version, against a raw state-dict copy."""

    from configs.dtypes import torch_dtype
    from learner.weights import WeightSlots, announcement, publish_weights

    state = engine.full_state_dict()
    unique = {v.data_ptr(): v for v in state.values()}  # tied weights (embedding = LM head) once, as published
    raw_s = best_of(lambda: [v.clone() for v in unique.values()], args.repeats)
    root = Path(tempfile.mkdtemp(prefix="paceflow-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    version = iter(range(1, 1000))
    probe = (batch.input_ids_BT[0, : args.prompt_tokens].tolist(), batch.input_ids_BT[0, args.prompt_tokens :].tolist())
    slots = WeightSlots(root / "slots", dtype=torch_dtype(dtype))
    # The hand-over itself (what the target is about): the policy copied, cast, into a shared-memory slot.
    publish_s = best_of(lambda: slots.publish(engine.full_state_dict(), next(version)), args.repeats)
    # The announcement's teacher-forced probe: one short forward pass, timed on its own.
    probe_s = best_of(
        lambda: announcement(engine.module, "", version=0, step=0, probe=probe, engine_dtype=dtype), args.repeats
    )

    def directory_per_version() -> None:  # the shared-filesystem transport, and the old single-machine path
        state = {k: v.to(torch_dtype(dtype)) for k, v in engine.full_state_dict().items()}
        publish_weights(engine.module, state, root / "dirs", version=next(version))

    directory_s = best_of(directory_per_version, args.repeats)
    shutil.rmtree(root, ignore_errors=True)
    return {
        "raw_state_dict_copy_s": round(raw_s, 4),
        "publish_shared_memory_s": round(publish_s, 4),
        "publish_vs_raw_copy": round(publish_s / raw_s, 2),
        "probe_s": round(probe_s, 4),
        "publish_directory_s": round(directory_s, 4),
        "publish_directory_vs_raw_copy": round(directory_s / raw_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["tiny", "smollm2-135m"],
        choices=["tiny", "smollm2-135m", *SHAPES],
        help="qwen2.5-1.5b-shape: Qwen2.5-1.5B's architecture with random weights (GPU throughput)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda when available, as DeepSpeed places the policy)"
    )
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--g", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--response-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16", "autocast"],
        choices=["float32", "bfloat16", "autocast"],
        help="autocast: float32 weights, forward under bfloat16 autocast (learner.autocast)",
    )
    parser.add_argument("--curve-steps", type=int, default=6, help="TB steps of the loss curve compared across dtypes")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument(
        "--no-publish", dest="publish", action="store_false", help="skip the weight-publishing timings (big models)"
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    run_per_model(args.models, lambda name, model_dir: bench_model(name, model_dir, args))


if __name__ == "__main__":
    main()
