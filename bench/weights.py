"""Weight hand-over from the learner to a vLLM actor on one machine, each side against its own baseline, in one
run. Prints JSON.

    .venv/bin/python bench/weights.py                      # SmolLM2-135M in bfloat16 (about 2 minutes)
    .venv/bin/python bench/weights.py --models tiny

Learner side: `WeightSlots.publish` (the policy copied, cast to the engine dtype, into a preallocated safetensors
slot in /dev/shm) against `{k: v.clone()}` of the same state dict (target <= 2x). Actor side: `VLLMEngine.
load_weights(slot)` (vLLM's `reload_weights` from the slot's directory, through `collective_rpc` with a path) against
the engine's own in-memory load: vLLM's `reload_weights(weights_iterator=...)` over tensors already in the
engine's process (a finished vLLM model cannot take `model.load_weights` directly: its layers were post-processed
for the CPU kernels, and `reload_weights` is how vLLM restores and re-processes them) (target <= 2x).
The baseline needs the model object, so the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0); that
is the only difference from a rollout actor's engine. The broadcast transport (replay/weight_broadcast.py) is timed
beside it: the learner's snapshot copy, and a sync (the learner's send on a thread, gloo over loopback, the
engine's receive and `reload_weights`) against the same in-memory load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import run_per_model

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its model is reachable


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_model(name: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from actors.engines.vllm_engine import VLLMEngine
    from configs.dtypes import torch_dtype
    from configs.schema import VLLMEngineConfig
    from learner.weights import WeightSlots
    from replay.weight_broadcast import WeightSender

    dtype = torch_dtype(args.dtype)
    state = {
        k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).state_dict().items()
    }
    root = Path(tempfile.mkdtemp(prefix="paceflow-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    slots = WeightSlots(root, dtype=dtype)
    version = iter(range(1, 10_000))
    unique = {v.data_ptr(): v for v in state.values()}  # tied weights (embedding = LM head) once, as published
    raw_s = best_of(lambda: [v.clone() for v in unique.values()], args.repeats)
    publish_s = best_of(lambda: slots.publish(state, next(version)), args.repeats)
    slot = slots.publish(state, v := next(version))

    engine = VLLMEngine(model_dir, VLLMEngineConfig(max_model_len=512), dtype=args.dtype, seed=0)
    in_memory = load_file(str(slot / "model.safetensors"))  # the engine's baseline gets tensors already in memory

    def engine_own_load(worker: Any) -> None:  # vLLM's in-place reload from tensors in memory: no file at all
        worker.reload_weights(weights_iterator=iter(in_memory.items()))

    actor_load_s = best_of(lambda: engine.load_weights(slot, v), args.repeats)
    engine_load_s = best_of(lambda: engine.llm.collective_rpc(engine_own_load), args.repeats)

    # The broadcast transport: the learner's snapshot copy, then send + receive (gloo over loopback) + reload.
    sender = WeightSender(host="127.0.0.1", device=torch.device("cpu"), dtype=dtype)
    publish_broadcast_s = best_of(lambda: sender.publish(state, next(version), b""), args.repeats)
    engine.join_weight_channel(sender.open("bench", 1 + engine.weight_receivers), "127.0.0.1")

    def broadcast_sync() -> None:
        thread = threading.Thread(target=sender.send, args=("bench",))
        thread.start()
        engine.receive_weights()
        thread.join()

    broadcast_load_s = best_of(broadcast_sync, args.repeats)
    engine.close()
    shutil.rmtree(root, ignore_errors=True)
    return {
        "model": name,
        "dtype": args.dtype,
        "parameters": sum(t.numel() for t in unique.values()),
        "raw_state_dict_copy_s": round(raw_s, 4),
        "publish_shared_memory_s": round(publish_s, 4),
        "publish_vs_raw_copy": round(publish_s / raw_s, 2),
        "engine_in_memory_load_weights_s": round(engine_load_s, 4),
        "actor_load_from_slot_s": round(actor_load_s, 4),
        "actor_load_vs_engine_load": round(actor_load_s / engine_load_s, 2),
        "publish_broadcast_snapshot_s": round(publish_broadcast_s, 4),
        "actor_load_broadcast_s": round(broadcast_load_s, 4),
        "actor_load_broadcast_vs_engine_load": round(broadcast_load_s / engine_load_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"], choices=["tiny", "smollm2-135m"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run_per_model(args.models, lambda name, model_dir: bench_model(name, model_dir, args))


if __name__ == "__main__":
    main()
