"""Scoring rollouts as they are made: verifier rewards under a timeout, and the frozen base model's log-likelihood
of each response (PowerFlow's target), computed once per sample.

A verifier that raises or hangs never takes the actor down: its reward becomes NaN (the invalid-reward marker the
record and the learner understand) and a counter goes up. By default (rollout.verifier_isolation='subprocess')
verifiers run in a child process under memory and CPU limits that is killed and replaced when an answer overruns
`timeout_s` (actors/verifier_sandbox.py). With 'thread' they run on a small thread pool instead, where a hung one
can only be abandoned: the thread cannot be killed, so the pool is replaced once too many are stuck, and one stuck
in C code that holds the GIL stalls the whole actor.
"""

from __future__ import annotations

import concurrent.futures as futures
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from actors.tasks import Prompt, Task, Verdict
from actors.verifier_sandbox import VerifierSandbox
from configs.dtypes import torch_dtype
from configs.schema import RolloutConfig, TaskConfig
from learner.logprobs import token_logprobs


@dataclass
class ScoreCounters:
    scored: int = 0
    errors: int = 0
    timeouts: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class Scores:
    rewards: list[float]
    """NaN where the verifier failed or timed out; NaN everywhere for tasks without a verifier."""
    parsed: list[str | None]


class RewardScorer:
    """Rewards of responses under `timeout_s` each: in `sandbox` (a verifier process built from the same task
    config) when given, else on a pool of `workers` threads."""

    def __init__(
        self, task: Task, *, timeout_s: float, workers: int = 4, sandbox: VerifierSandbox | None = None
    ) -> None:
        self.task = task
        self.timeout_s = timeout_s
        self.workers = workers
        self.sandbox = sandbox
        self.pool = None if sandbox else futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verifier")
        self.stuck = 0
        self.counters = ScoreCounters()

    @classmethod
    def for_task(cls, task: Task, task_cfg: TaskConfig, rollout: RolloutConfig) -> RewardScorer:
        """The scorer a run's config asks for (rollout.verifier_isolation, reward_timeout_s, verifier_memory_mb);
        `task` is `build_task(task_cfg)`. A task without a verifier needs no process."""
        sandbox = None
        if rollout.verifier_isolation == "subprocess" and task.verifier is not None:
            sandbox = VerifierSandbox(
                task_cfg, timeout_s=rollout.reward_timeout_s, memory_mb=rollout.verifier_memory_mb
            )
        return cls(task, timeout_s=rollout.reward_timeout_s, sandbox=sandbox)

    def score(self, prompt: Prompt, texts: list[str]) -> Scores:
        if self.task.verifier is None:
            return Scores([math.nan] * len(texts), [None] * len(texts))
        verdicts = self.sandbox.score([(prompt, t) for t in texts]) if self.sandbox else self._on_threads(prompt, texts)
        rewards: list[float] = []
        parsed: list[str | None] = []
        for verdict in verdicts:
            if verdict is None:
                self.counters.timeouts += 1
                rewards.append(math.nan)
                parsed.append(None)
                continue
            self.counters.scored += 1
            if verdict.error is not None or verdict.reward is None:
                self.counters.errors += 1
                self.counters.last_error = verdict.error or "no reward"
                rewards.append(math.nan)
            else:
                rewards.append(float(verdict.reward))
            parsed.append(verdict.parsed)
        return Scores(rewards, parsed)

    def _on_threads(self, prompt: Prompt, texts: list[str]) -> list[Verdict | None]:
        """A verdict per text, None where the verifier overran the timeout (its thread is left behind)."""
        assert self.pool is not None
        jobs = [self.pool.submit(self.task.score, prompt, text) for text in texts]
        verdicts: list[Verdict | None] = []
        for job in jobs:
            try:
                verdicts.append(job.result(timeout=self.timeout_s))
            except futures.TimeoutError:
                job.cancel()
                self.stuck += 1
                verdicts.append(None)
        if self.stuck >= self.workers:  # every thread may be wedged in a hung verifier: start a fresh pool
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="verifier")
            self.stuck = 0
        return verdicts

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if self.sandbox is not None:
            self.sandbox.close()


class BaseModelScorer:
    """Per-token log-probs of responses under the frozen base model (a teacher-forced forward pass)."""

    def __init__(self, model_dir: Path, *, dtype: str = "float32", batch_size: int = 16) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def score(self, prompt: list[int], responses: list[list[int]]) -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(responses), self.batch_size):
            chunk = responses[start : start + self.batch_size]
            width = len(prompt) + max((len(r) for r in chunk), default=0)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            attention = torch.zeros_like(ids)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                row = prompt + r
                ids[i, : len(row)] = torch.tensor(row)
                attention[i, : len(row)] = 1
                mask[i, len(prompt) : len(row)] = 1
            logp, _ = token_logprobs(self.model, ids, attention, mask)
            out += [logp[i, len(prompt) : len(prompt) + len(r)].tolist() for i, r in enumerate(chunk)]
        return out
