"""Rollout throughput: our vLLM engine wrapper vs raw `vllm.LLM.generate` vs the HF engine, same model, prompts
and sampling, in one run; and the time of an in-place weight update vs model size. Prints JSON.

    .venv/bin/python bench/rollout.py                       # tiny model and SmolLM2-135M (about 4 minutes)
    .venv/bin/python bench/rollout.py --models tiny         # quicker

Throughput is generated tokens per second of wall time for `prompts x samples` responses of up to `max_tokens`
tokens (best of `repeats` timed calls after one warm-up call). "raw" calls the very same vllm.LLM object that
our wrapper owns, with the same SamplingParams, so the ratio isolates the wrapper's own overhead.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import run_per_model

if TYPE_CHECKING:
    from configs.schema import SamplingConfig

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep stdout for the JSON result


def timed(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    """(best seconds, tokens) over `repeats` calls after one warm-up."""
    fn()
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, tokens = elapsed, n
    return best, tokens


def bench_model(name: str, model_dir: Path, args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from actors.engines.vllm_engine import VLLMEngine
    from actors.tasks import build_task, encode_prompt
    from configs.schema import ReasoningGymTaskConfig, SamplingConfig, TokenizerConfig, VLLMEngineConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    task = build_task(ReasoningGymTaskConfig(name="chain_sum", train_size=args.prompts, eval_size=0))
    prompts = [encode_prompt(tok, p.text, TokenizerConfig()) for p in task.train]
    sampling = SamplingConfig(num_samples=args.samples, max_new_tokens=args.max_tokens, temperature=1.0)
    params_count = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    row: dict = {
        "model": name,
        "parameters": params_count,
        "prompts": len(prompts),
        "samples": args.samples,
        "max_tokens": args.max_tokens,
    }

    row["hf_float32_tok_s"], row["hf_weight_update_s"], weights_dir = bench_hf(model_dir, prompts, sampling, args)
    raw_params = SamplingParams(n=args.samples, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, logprobs=0)
    token_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    for dtype in args.vllm_dtypes:
        engine = VLLMEngine(model_dir, VLLMEngineConfig(max_model_len=1024), dtype=dtype, seed=0)

        def raw(engine: VLLMEngine = engine) -> int:
            outs = engine.llm.generate(token_prompts, raw_params, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        def wrapped(engine: VLLMEngine = engine) -> int:
            return sum(len(s.token_ids) for g in engine.generate(prompts, sampling, seed=0) for s in g)

        raw_s, raw_tokens = timed(raw, args.repeats)
        ours_s, ours_tokens = timed(wrapped, args.repeats)
        row[f"vllm_raw_{dtype}_tok_s"] = round(raw_tokens / raw_s, 1)
        row[f"vllm_ours_{dtype}_tok_s"] = round(ours_tokens / ours_s, 1)
        row[f"vllm_ours_vs_raw_{dtype}"] = round((ours_tokens / ours_s) / (raw_tokens / raw_s), 3)
        row[f"vllm_{dtype}_vs_hf_float32"] = round((ours_tokens / ours_s) / row["hf_float32_tok_s"], 2)
        start = time.perf_counter()
        engine.load_weights(weights_dir, 1)
        row[f"vllm_{dtype}_weight_update_s"] = round(time.perf_counter() - start, 4)
        engine.close()
        gc.collect()
    shutil.rmtree(weights_dir, ignore_errors=True)
    return row


def bench_hf(
    model_dir: Path, prompts: list[list[int]], sampling: SamplingConfig, args: argparse.Namespace
) -> tuple[float, float, Path]:
    """(tokens/s, weight update seconds, a weights directory in shared memory for the vLLM updates)."""
    from actors.engines.hf_engine import HFEngine

    hf = HFEngine(model_dir, dtype="float32", batch_size=len(prompts) * args.samples)
    seconds, tokens = timed(
        lambda: sum(len(s.token_ids) for g in hf.generate(prompts, sampling) for s in g), args.repeats
    )
    shm = "/dev/shm" if Path("/dev/shm").exists() else None
    weights_dir = Path(tempfile.mkdtemp(prefix="paceflow-bench-", dir=shm))
    hf.model.save_pretrained(weights_dir)
    start = time.perf_counter()
    hf.load_weights(weights_dir, 1)
    update_s = time.perf_counter() - start
    gc.collect()
    return round(tokens / seconds, 1), round(update_s, 4), weights_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"], choices=["tiny", "smollm2-135m"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vllm-dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()

    run_per_model(args.models, lambda name, model_dir: bench_model(name, model_dir, args))


if __name__ == "__main__":
    main()
