"""Learner throughput: a TB step through paceflow's learner path vs a plain causal-LM cross-entropy step on the
same tokens with the same DeepSpeed engine, and weight publishing vs a raw state-dict copy. Prints JSON.

    .venv/bin/python bench/learner.py                  # tiny model and SmolLM2-135M
    .venv/bin/python bench/learner.py --models tiny

Both steps see identical batches (groups of G responses padded to the same width) and both run forward, backward
and an AdamW step under DeepSpeed ZeRO-0 on CPU; tokens/s counts non-padding tokens. The TB step adds the log Z
head, the objective and the float32 log-prob sums; the target is >= 0.9x the plain step. Publishing writes a
safetensors version to shared memory and computes the probe; the baseline is `{k: v.clone()}` of the state dict
(target <= 2x).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import run_per_model


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
    from transformers import AutoModelForCausalLM

    from configs.schema import LearnerConfig, TBObjectiveConfig
    from learner.batching import collate
    from learner.deepspeed_engine import PolicyEngine
    from learner.log_partition import LogZHead
    from learner.logprobs import token_logprobs
    from learner.objectives import ObjectiveInputs, tb_log_reward, tb_loss
    from learner.weights import publish_weights
    from replay.records import RolloutGroup, SampledBatch

    gen = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
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
    cfg = LearnerConfig(lr=1e-5, groups_per_step=args.groups, micro_batch_size=batch.num_rows)
    engine = PolicyEngine(model, cfg)
    head = LogZHead(model.config.hidden_size)
    head_opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    objective = TBObjectiveConfig(use_reference=False)

    def tb_step() -> None:
        logp, hidden = token_logprobs(
            engine.module, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT, return_hidden=True
        )
        inputs = ObjectiveInputs(
            logp_BT=logp,
            mask_BT=batch.response_mask_BT,
            group_B=batch.group_B,
            log_reward_B=tb_log_reward(batch.reward_B, objective.beta),
            log_z_B=head(hidden, batch.prompt_mask_BT),
        )
        engine.backward(tb_loss(inputs, objective).loss, last=True)
        engine.step()
        head_opt.step()
        head_opt.zero_grad()

    def ce_step() -> None:
        labels = batch.input_ids_BT.masked_fill(batch.response_mask_BT == 0, -100)
        out = engine.module(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, labels=labels)
        engine.backward(out.loss, last=True)
        engine.step()

    tokens = batch.num_tokens
    ce_s, tb_s = best_of(ce_step, args.repeats), best_of(tb_step, args.repeats)
    state = engine.full_state_dict()
    raw_s = best_of(lambda: {k: v.clone() for k, v in state.items()}, args.repeats)
    root = Path(tempfile.mkdtemp(prefix="paceflow-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    version = iter(range(1, 1000))
    probe = (batch.input_ids_BT[0, : args.prompt_tokens].tolist(), batch.input_ids_BT[0, args.prompt_tokens :].tolist())

    def publish() -> None:
        publish_weights(
            engine.module,
            engine.full_state_dict(),
            root,
            version=next(version),
            step=0,
            probe=probe,
            engine_dtype="float32",
        )

    publish_s = best_of(publish, args.repeats)
    shutil.rmtree(root, ignore_errors=True)
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": f"{args.groups} groups x {args.g} responses, {args.prompt_tokens}+{args.response_tokens} tokens",
        "tokens_per_step": tokens,
        "ce_step_tok_s": round(tokens / ce_s, 1),
        "tb_step_tok_s": round(tokens / tb_s, 1),
        "tb_vs_ce": round(ce_s / tb_s, 3),
        "publish_s": round(publish_s, 4),
        "raw_state_dict_copy_s": round(raw_s, 4),
        "publish_vs_raw_copy": round(publish_s / raw_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"], choices=["tiny", "smollm2-135m"])
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--g", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--response-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    run_per_model(args.models, lambda name, model_dir: bench_model(name, model_dir, args))


if __name__ == "__main__":
    main()
