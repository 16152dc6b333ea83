"""Models resolve to local Hugging Face directories that load and generate, with nothing downloaded."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engines.hf_engine import HFEngine
from actors.tasks import format_prompt
from cluster.models import ModelNotFoundError, build_char_tokenizer, resolve_model_dir
from configs.schema import LocalModelConfig, SamplingConfig, TinyModelConfig


def test_tiny_model_has_head_dim_64_and_loads_in_transformers(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert cfg.vocab_size == len(tok)
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"


def test_char_tokenizer_round_trips_text() -> None:
    tok = build_char_tokenizer()
    text = "Q: 12 + 7 = ?\nA: \\boxed{19}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_tiny_model_is_deterministic_in_its_seed(tmp_path: Path) -> None:
    def weights(seed: int, cache: Path) -> torch.Tensor:
        path = resolve_model_dir(TinyModelConfig(init_seed=seed, cache_dir=cache))
        return AutoModelForCausalLM.from_pretrained(path).model.embed_tokens.weight.detach().clone()

    a, b, c = weights(3, tmp_path / "a"), weights(3, tmp_path / "b"), weights(4, tmp_path / "c")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_resolving_again_reuses_the_cached_directory(tmp_path: Path) -> None:
    cfg = TinyModelConfig(cache_dir=tmp_path)
    first = resolve_model_dir(cfg)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(cfg) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folders left behind


def test_missing_local_model_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"model\.path: .*does not exist.*never downloads"):
        resolve_model_dir(LocalModelConfig(path=tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_model_dir(LocalModelConfig(path=tmp_path / "empty"))


def test_local_model_directory_loads(tiny_model_dir: Path) -> None:
    assert resolve_model_dir(LocalModelConfig(path=tiny_model_dir)) == tiny_model_dir


@pytest.mark.slow
def test_smollm2_converts_from_the_packaged_gguf_and_answers(smollm2_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>"
    assert tok.chat_template and "<|im_start|>" in format_prompt(tok, "hi")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    engine = HFEngine(smollm2_dir)
    prompt = format_prompt(engine.tokenizer, "What is the capital of France? Answer in one word.")
    ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    [[sample]] = engine.generate([ids], SamplingConfig(num_samples=1, max_new_tokens=8, temperature=0.0))
    assert "paris" in sample.text.lower()


@pytest.mark.slow
def test_tiny_model_generates_in_vllm_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    """vLLM's CPU backend accepts the tiny model (head_dim 64) and its tokenizer, and reports log-probs."""
    script = tmp_path / "gen.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json
            if __name__ == "__main__":
                from vllm import LLM, SamplingParams
                llm = LLM(model={str(tiny_model_dir)!r}, dtype="float32", enforce_eager=True, max_model_len=128,
                          gpu_memory_utilization=0.2, seed=0)
                [out] = llm.generate(["<user>1 + 2 =\\n<assistant>"],
                                     SamplingParams(n=2, max_tokens=8, logprobs=0, seed=1))
                print("RESULT", json.dumps([[c.token_ids, c.cumulative_logprob, c.text] for c in out.outputs]))
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    import json

    samples = json.loads(line.removeprefix("RESULT "))
    assert len(samples) == 2
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for token_ids, cumulative_logprob, text in samples:
        assert 1 <= len(token_ids) <= 8
        assert cumulative_logprob < 0
        assert tok.decode(token_ids, skip_special_tokens=True) == text
