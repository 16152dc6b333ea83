"""Tasks: where prompts come from and how a response is scored.

A `Task` is plain data: a training split, a held-out split that never shares a question with it, and a verifier
(None for unsupervised prompt sets). Loaders exist for reasoning-gym generators, GSM8K, a JSONL file of prompts
with answers, and creative-writing prompts built from word lists. All are deterministic in the task seed and
read only local files. Prompt ids are content hashes, so the same question has the same id in every process
and every run (the replay and PACED-RL's per-prompt statistics are keyed by it).

Verifiers never raise: `score()` turns a crashing verifier into a `Verdict` with `error` set, so one bad
response cannot kill a rollout actor. Malformed dataset rows are skipped and counted in `Task.skipped_rows`,
with the first few reasons kept for the user.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from configs.schema import (
    CreativeTaskConfig,
    GSM8KTaskConfig,
    JsonlTaskConfig,
    ReasoningGymTaskConfig,
    TaskConfig,
    TokenizerConfig,
)


@dataclass(frozen=True)
class Prompt:
    """One question. `text` is the raw question plus the task's instruction, before any chat template."""

    prompt_id: str
    text: str
    answer: str | None = None


@dataclass(frozen=True)
class Verdict:
    """A verifier's judgement of one response: reward in [0, 1], the answer it parsed, or why it failed."""

    reward: float | None
    parsed: str | None = None
    error: str | None = None


Verifier = Callable[[Prompt, str], Verdict]


@dataclass
class Task:
    name: str
    train: list[Prompt]
    eval: list[Prompt]
    verifier: Verifier | None
    skipped_rows: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def score(self, prompt: Prompt, response: str) -> Verdict:
        """Score one response; a verifier that raises yields reward None and the error text."""
        if self.verifier is None:
            return Verdict(reward=None)
        try:
            return self.verifier(prompt, response)
        except Exception as exc:  # a verifier crash must never take the actor down
            return Verdict(reward=None, error=f"{type(exc).__name__}: {exc}")


class TaskDataError(ValueError):
    """A task's data cannot be used at all (missing file, unknown generator, no valid rows)."""


def build_task(cfg: TaskConfig) -> Task:
    loaders: dict[str, Callable[[Any], Task]] = {
        "reasoning_gym": load_reasoning_gym,
        "gsm8k": load_gsm8k,
        "jsonl": load_jsonl,
        "creative": load_creative,
    }
    return loaders[cfg.kind](cfg)


def prompt_id(task_name: str, question: str) -> str:
    return hashlib.sha256(f"{task_name}\x00{question}".encode()).hexdigest()[:16]


def _with_instruction(question: str, instruction: str) -> str:
    return f"{question.rstrip()}\n{instruction}" if instruction else question


# --------------------------------------------------------------------------------------------------- answers
_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces handled."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = depth = matches[-1].end()
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The response's final answer: the last \\boxed{}, else an <answer> tag, else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def math_equal(gold: str, predicted: str) -> bool:
    """math-verify equivalence ('3/4' == '0.75').

    math-verify's own timeouts use SIGALRM, which only works in the main thread; elsewhere they are turned
    off (and their warning silenced) because the rollout side bounds every verifier call with its own timeout.
    """
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_parsed = parse(_as_math(gold), parsing_timeout=timeout)
    pred_parsed = parse(_as_math(predicted), parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return _normalise(gold) == _normalise(predicted)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def _as_math(answer: str) -> str:
    answer = answer.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", answer.strip()) else answer
    return answer if "$" in answer or "\\boxed" in answer else f"${answer}$"


def _normalise(text: str) -> str:
    return " ".join(text.strip().strip(".").lower().split())


def math_verifier(prompt: Prompt, response: str) -> Verdict:
    parsed = extract_answer(response)
    if parsed is None or prompt.answer is None:
        return Verdict(reward=0.0, parsed=parsed)
    return Verdict(reward=1.0 if math_equal(prompt.answer, parsed) else 0.0, parsed=parsed)


def exact_verifier(prompt: Prompt, response: str) -> Verdict:
    parsed = extract_answer(response)
    ok = parsed is not None and prompt.answer is not None and _normalise(parsed) == _normalise(prompt.answer)
    return Verdict(reward=1.0 if ok else 0.0, parsed=parsed)


# --------------------------------------------------------------------------------------------------- loaders
def load_reasoning_gym(cfg: ReasoningGymTaskConfig) -> Task:
    """A reasoning-gym generator, split so that both splits come from the same distribution.

    Generators are often far from uniform over their questions (chain_sum with 1-2 digit terms draws each of its
    ~200 one-digit questions ~20x more often than each two-digit one), so taking the first distinct questions
    of one stream for the held-out split and the next ones for training would leave the common (often easy)
    questions in one split and the rare ones in the other. Instead one stream is walked once, every distinct
    question goes to the held-out split with probability eval_size / (train_size + eval_size) by a seeded hash
    of its text, and both splits fill side by side, so they end at the same depth of the stream. The splits never
    share a question; a small problem space gives fewer prompts, with a warning."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if cfg.name not in DATASETS:
        close = [n for n in sorted(DATASETS) if cfg.name.split("_")[0] in n][:5]
        raise TaskDataError(
            f"task.name: got {cfg.name!r}, not a reasoning-gym dataset"
            + (f" (similar: {', '.join(close)})" if close else f"; {len(DATASETS)} exist, e.g. chain_sum")
        )

    def generate(seed: int, size: int) -> Any:
        try:
            return reasoning_gym.create_dataset(cfg.name, size=size, seed=seed, **cfg.kwargs)
        except (TypeError, ValueError, AssertionError) as exc:
            raise TaskDataError(f"task.kwargs: {cfg.kwargs} rejected by {cfg.name!r}: {exc}") from exc

    wanted = cfg.train_size + cfg.eval_size
    share = cfg.eval_size / wanted
    entries: dict[str, dict[str, Any]] = {}
    train: list[Prompt] = []
    held_out: list[Prompt] = []
    seen: set[str] = set()
    for entry in generate(cfg.seed, 4 * wanted + 64):
        question = entry["question"]
        if question in seen:
            continue
        seen.add(question)
        split = held_out if _unit_hash(cfg.seed, question) < share else train
        if len(split) < (cfg.eval_size if split is held_out else cfg.train_size):
            p = Prompt(prompt_id(cfg.name, question), _with_instruction(question, cfg.instruction), entry["answer"])
            entries[p.prompt_id] = entry
            split.append(p)
        if len(train) == cfg.train_size and len(held_out) == cfg.eval_size:
            break
    scorer = generate(cfg.seed, 1)
    warnings = []
    if len(train) < cfg.train_size or len(held_out) < cfg.eval_size:
        warnings.append(
            f"task.train_size={cfg.train_size} and task.eval_size={cfg.eval_size}, but {cfg.name!r} with these kwargs "
            f"gave only {len(seen)} distinct questions in {4 * wanted + 64} draws: {len(train)} training and "
            f"{len(held_out)} held-out; widen the generator's kwargs for more"
        )

    def verify(prompt: Prompt, response: str) -> Verdict:
        parsed = extract_answer(response)
        entry = entries.get(prompt.prompt_id)
        if entry is None:
            return Verdict(reward=None, parsed=parsed, error=f"unknown prompt_id {prompt.prompt_id}")
        if parsed is None:
            return Verdict(reward=0.0)
        return Verdict(reward=float(scorer.score_answer(parsed, entry)), parsed=parsed)

    return Task(name=f"reasoning_gym/{cfg.name}", train=train, eval=held_out, verifier=verify, warnings=warnings)


def _unit_hash(seed: int, text: str) -> float:
    """A number in [0, 1) fixed by the seed and the text."""
    return int(hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()[:12], 16) / 16**12


def default_gsm8k_dir() -> Path:
    """The GSM8K copy shipped inside the package (actors/data/gsm8k: train.jsonl, test.jsonl, MIT LICENSE)."""
    return Path(__file__).resolve().parent / "data" / "gsm8k"


def load_gsm8k(cfg: GSM8KTaskConfig) -> Task:
    """GSM8K from local JSONL: train.jsonl for training, test.jsonl held out. Gold answers follow '####'."""
    data_dir = default_gsm8k_dir() if cfg.data_dir is None else cfg.data_dir.expanduser()
    files = {split: data_dir / f"{split}.jsonl" for split in ("train", "test")}
    for path in files.values():
        if not path.is_file() and cfg.data_dir is None:
            raise TaskDataError(
                f"task.data_dir unset, but the GSM8K copy shipped with paceflow is missing ({str(path)!r} not found); "
                "reinstall paceflow or set task.data_dir to a folder with train.jsonl and test.jsonl"
            )
        if not path.is_file():
            raise TaskDataError(
                f"task.data_dir={str(cfg.data_dir)!r}: {str(path)!r} not found; "
                "leave task.data_dir unset to use the GSM8K copy shipped with paceflow"
            )
    task = Task(name="gsm8k", train=[], eval=[], verifier=math_verifier)

    def rows(path: Path) -> Iterable[Prompt]:
        for lineno, row in _read_jsonl(path, task):
            question, solution = row.get("question"), row.get("answer")
            if not isinstance(question, str) or not isinstance(solution, str) or "####" not in solution:
                _skip(task, f"{path.name}:{lineno}: needs string 'question' and 'answer' with '#### <number>'")
                continue
            gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
            yield Prompt(prompt_id("gsm8k", question), _with_instruction(question, cfg.instruction), gold)

    task.train = _first(rows(files["train"]), cfg.train_size)
    held_out = _first(rows(files["test"]), cfg.eval_size)
    train_ids = {p.prompt_id for p in task.train}
    task.eval = [p for p in held_out if p.prompt_id not in train_ids]
    return task


def load_jsonl(cfg: JsonlTaskConfig) -> Task:
    """A JSONL file of {prompt, answer} rows. Rows go to the held-out split by a hash of the question, so the
    split is stable when rows are added or reordered; eval_size caps that split (the rest go to training)."""
    path = cfg.path.expanduser()
    if not path.is_file():
        raise TaskDataError(f"task.path: {str(path)!r} not found")
    name = path.stem
    task = Task(name=f"jsonl/{name}", train=[], eval=[], verifier=None)
    task.verifier = math_verifier if cfg.verifier == "math" else exact_verifier
    prompts: dict[str, Prompt] = {}
    for lineno, row in _read_jsonl(path, task):
        question, answer = row.get(cfg.prompt_field), row.get(cfg.answer_field)
        if not isinstance(question, str) or not question.strip():
            _skip(task, f"{path.name}:{lineno}: field {cfg.prompt_field!r} must be a non-empty string")
            continue
        if not isinstance(answer, str | int | float) or isinstance(answer, bool):
            _skip(task, f"{path.name}:{lineno}: field {cfg.answer_field!r} must be a string or number")
            continue
        p = Prompt(prompt_id(name, question), _with_instruction(question, cfg.instruction), str(answer))
        prompts.setdefault(p.prompt_id, p)
    if not prompts:
        raise TaskDataError(f"task.path: {str(path)!r} has no valid rows ({'; '.join(task.skip_reasons)})")
    ranked = sorted(prompts.values(), key=lambda p: _split_key(cfg.seed, p.prompt_id))
    held = {p.prompt_id for p in ranked[: min(cfg.eval_size, len(ranked) // 2)]}
    task.eval = [p for p in prompts.values() if p.prompt_id in held]
    task.train = [p for p in prompts.values() if p.prompt_id not in held]
    return task


def load_creative(cfg: CreativeTaskConfig) -> Task:
    """Short creative-writing prompts ('Write a haiku about a quiet harbor.') from wonderwords' word lists."""
    adjectives = _word_list("adjectivelist.txt")
    nouns = _word_list("nounlist.txt")
    rng = random.Random(cfg.seed)
    wanted = cfg.num_prompts + cfg.eval_size
    capacity = len(cfg.forms) * len(adjectives) * len(nouns)
    if wanted > capacity // 2:
        raise TaskDataError(f"task.num_prompts + eval_size = {wanted} is too many distinct prompts")
    texts: dict[str, None] = {}
    while len(texts) < wanted:
        form, adj, noun = rng.choice(cfg.forms), rng.choice(adjectives), rng.choice(nouns)
        texts.setdefault(_with_instruction(f"Write {form} about {_article(adj)} {adj} {noun}.", cfg.instruction))
    prompts = [Prompt(prompt_id("creative", t), t) for t in texts]
    return Task(name="creative", train=prompts[cfg.eval_size :], eval=prompts[: cfg.eval_size], verifier=None)


# --------------------------------------------------------------------------------------------------- helpers
def _read_jsonl(path: Path, task: Task) -> Iterable[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                _skip(task, f"{path.name}:{lineno}: not JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                _skip(task, f"{path.name}:{lineno}: expected an object, got {type(row).__name__}")
                continue
            yield lineno, row


def _skip(task: Task, reason: str) -> None:
    task.skipped_rows += 1
    if len(task.skip_reasons) < 5:
        task.skip_reasons.append(reason)


def _first(items: Iterable[Prompt], limit: int | None) -> list[Prompt]:
    out: list[Prompt] = []
    seen: set[str] = set()
    for p in items:
        if p.prompt_id in seen:
            continue
        seen.add(p.prompt_id)
        out.append(p)
        if limit is not None and len(out) == limit:
            break
    return out


def _split_key(seed: int, pid: str) -> str:
    return hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()


def _word_list(name: str) -> list[str]:
    text = resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
    banned = set(resources.files("wonderwords.assets").joinpath("profanitylist.txt").read_text().split())
    return sorted({w.strip() for w in text.splitlines() if w.strip().isalpha() and w.strip() not in banned})


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def encode_prompt(tokenizer: Any, text: str, cfg: TokenizerConfig) -> list[int]:
    """The token ids an engine is given for a prompt: `format_prompt` under the run's tokenizer settings."""
    formatted = format_prompt(tokenizer, text, chat_template=cfg.chat_template, system_prompt=cfg.system_prompt)
    return list(tokenizer(formatted, add_special_tokens=False)["input_ids"])


def encode_prompts(model_dir: Path, prompts: Sequence[Prompt], cfg: TokenizerConfig) -> dict[str, list[int]]:
    """Token ids by prompt id, exactly as the rollout actors encode them (the learner's Z_phi embeds these)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {p.prompt_id: encode_prompt(tokenizer, p.text, cfg) for p in prompts}


def drop_long_prompts(task: Task, model_dir: Path, cfg: TokenizerConfig) -> int:
    """Leave out of the training split the prompts longer than tokenizer.max_prompt_tokens once encoded (an actor
    would lease them and skip them, step after step), with a warning in `task.warnings` that counts them and shows
    the first few; returns how many. No prompt left is an error naming the setting."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    limit = cfg.max_prompt_tokens
    lengths = {p.prompt_id: len(encode_prompt(tokenizer, p.text, cfg)) for p in task.train}
    long = [p for p in task.train if lengths[p.prompt_id] > limit]
    if not long:
        return 0
    task.train = [p for p in task.train if lengths[p.prompt_id] <= limit]
    shown = "; ".join(f"{p.prompt_id} ({lengths[p.prompt_id]} tokens: {p.text[:40]!r}...)" for p in long[:3])
    if not task.train:
        raise TaskDataError(
            f"tokenizer.max_prompt_tokens={limit}: every one of the {len(long)} training prompts of {task.name} is "
            f"longer once encoded (shortest: {min(lengths.values())} tokens); raise it (and the engine's "
            "max_model_len) or use shorter prompts"
        )
    task.warnings.append(
        f"{len(long)} of {len(long) + len(task.train)} training prompts are longer than tokenizer.max_prompt_tokens="
        f"{limit} tokens once encoded and are left out, e.g. {shown}"
    )
    return len(long)


def format_prompt(tokenizer: Any, text: str, *, chat_template: str = "auto", system_prompt: str | None = None) -> str:
    """The string the engine sees: the tokenizer's chat template around the prompt when it has one."""
    if chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": text})
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return f"{system_prompt}\n\n{text}\n" if system_prompt else f"{text}\n"
