"""The records that cross process boundaries, defined once, and their wire format.

`RolloutGroup` is what a rollout actor produces for one prompt: G responses with their token ids, the per-token
log-probs of the policy that sampled them, rewards and scores. It is encoded as a msgpack map whose numeric
fields are raw little-endian numpy buffers (responses concatenated, with a lengths array), tagged with a schema
version. Never pickle: `decode_group` validates every field and raises `RecordError` naming the field and the
offending value, so a reader can count and skip a bad record instead of crashing.

Example:
    group = RolloutGroup.new(prompt_id="3f2a", prompt_token_ids=[1, 2], responses=[[5, 2], [7, 7, 2]],
                             behaviour_logprobs=[[-0.1, -0.3], [-1.0, -0.2, -0.1]], rewards=[1.0, 0.0],
                             policy_version=3, actor_id="rollout-0")
    assert decode_group(encode_group(group)) == group
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

SCHEMA_VERSION = 1
FINISH_REASONS = ("stop", "length", "abort")
SELECTIONS = ("uniform", "paced", "explore")
"""How the scheduler chose a group's prompt: uniformly, by PACED-RL's |a(x) - tau| rule, or as one of PACED-RL's
epsilon-uniform exploration picks (an unbiased sample of what uniform selection would have given)."""


class RecordError(ValueError):
    """A payload that does not decode into a valid record; the message names the field and the value."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True, eq=False)
class RolloutGroup:
    """One prompt's G sampled responses and everything the objectives need, without regeneration."""

    group_id: str
    prompt_id: str
    prompt_token_ids: np.ndarray
    """int32 (P,)."""
    response_token_ids: list[np.ndarray]
    """G arrays of int32; EOS included when it was generated."""
    behaviour_logprobs: list[np.ndarray]
    """G float32 arrays, per-token log-probs under the policy that sampled them (same lengths as the tokens)."""
    rewards: np.ndarray
    """float32 (G,); NaN marks an invalid reward (the verifier crashed or timed out)."""
    policy_version: int
    actor_id: str
    created_at: float
    finish_reasons: list[str]
    parsed_answers: list[str | None]
    base_logprobs: list[np.ndarray] | None = None
    """G float32 arrays: per-token log-probs under the frozen base model (PowerFlow's target)."""
    selection: str = "uniform"
    """How the prompt was chosen (one of SELECTIONS)."""

    @staticmethod
    def new(
        *,
        prompt_id: str,
        prompt_token_ids: Sequence[int],
        responses: Sequence[Sequence[int]],
        behaviour_logprobs: Sequence[Sequence[float]],
        rewards: Sequence[float],
        policy_version: int,
        actor_id: str,
        finish_reasons: Sequence[str] | None = None,
        parsed_answers: Sequence[str | None] | None = None,
        base_logprobs: Sequence[Sequence[float]] | None = None,
        group_id: str | None = None,
        selection: str = "uniform",
    ) -> RolloutGroup:
        """Build and validate a group from plain Python lists (what engines return)."""
        n = len(responses)
        group = RolloutGroup(
            group_id=group_id or uuid.uuid4().hex,
            prompt_id=prompt_id,
            prompt_token_ids=np.asarray(prompt_token_ids, dtype=np.int32),
            response_token_ids=[np.asarray(r, dtype=np.int32) for r in responses],
            behaviour_logprobs=[np.asarray(lp, dtype=np.float32) for lp in behaviour_logprobs],
            rewards=np.asarray(rewards, dtype=np.float32),
            policy_version=policy_version,
            actor_id=actor_id,
            created_at=time.time(),
            finish_reasons=list(finish_reasons) if finish_reasons is not None else ["stop"] * n,
            parsed_answers=list(parsed_answers) if parsed_answers is not None else [None] * n,
            base_logprobs=[np.asarray(b, dtype=np.float32) for b in base_logprobs] if base_logprobs else None,
            selection=selection,
        )
        validate_group(group)
        return group

    @property
    def size(self) -> int:
        return len(self.response_token_ids)

    @property
    def response_lengths(self) -> np.ndarray:
        return np.array([len(r) for r in self.response_token_ids], dtype=np.int32)

    @property
    def num_correct(self) -> float:
        """Sum of valid rewards (the count of correct responses for a 0/1 verifier)."""
        valid = self.rewards[~np.isnan(self.rewards)]
        return float(valid.sum())

    def select(self, keep: Sequence[int], *, group_id: str | None = None) -> RolloutGroup:
        """The same group with only the responses at the given indices (PACED-RL's success buffer keeps single
        successful responses, each under its own id)."""
        idx = list(keep)
        return RolloutGroup(
            group_id=group_id or self.group_id,
            prompt_id=self.prompt_id,
            prompt_token_ids=self.prompt_token_ids,
            response_token_ids=[self.response_token_ids[i] for i in idx],
            behaviour_logprobs=[self.behaviour_logprobs[i] for i in idx],
            rewards=self.rewards[idx],
            policy_version=self.policy_version,
            actor_id=self.actor_id,
            created_at=self.created_at,
            finish_reasons=[self.finish_reasons[i] for i in idx],
            parsed_answers=[self.parsed_answers[i] for i in idx],
            base_logprobs=[self.base_logprobs[i] for i in idx] if self.base_logprobs is not None else None,
            selection=self.selection,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RolloutGroup):
            return NotImplemented
        return encode_group(self) == encode_group(other)

    def __hash__(self) -> int:
        return hash(self.group_id)


@dataclass(frozen=True)
class PromptStats:
    """What the replay knows about one prompt, for the PACED-RL scheduler."""

    prompt_id: str
    num_correct: float = 0.0
    num_samples: int = 0
    acc_estimate: float | None = None
    """The learner's a(x) = clip(beta log Z_phi(x), 0, 1), when it has written one."""

    @property
    def empirical_accuracy(self) -> float | None:
        return self.num_correct / self.num_samples if self.num_samples else None


@dataclass
class SampledBatch:
    """Groups drawn for one learner step, with Reverb-style sample info per group."""

    groups: list[RolloutGroup]
    keys: list[str]
    priorities: list[float]
    probabilities: list[float]
    """Probability with which each prioritised draw was made (1.0 for fresh groups)."""
    is_weights: list[float]
    """Importance weights (N * P)^-1 normalised to max 1 (1.0 for fresh groups)."""
    fresh: list[bool]
    times_sampled: list[int] = field(default_factory=list)
    skipped_corrupt: int = 0
    success: list[bool] = field(default_factory=list)
    """True for single successful responses replayed from PACED-RL's success buffer; False for whole groups
    from the main table (fresh or prioritised)."""

    @staticmethod
    def of_fresh(groups: Sequence[RolloutGroup]) -> SampledBatch:
        """A batch of groups as if just drawn fresh from a store (benchmarks and tests build batches this way)."""
        n = len(groups)
        return SampledBatch(
            groups=list(groups),
            keys=[g.group_id for g in groups],
            priorities=[1.0] * n,
            probabilities=[1.0] * n,
            is_weights=[1.0] * n,
            fresh=[True] * n,
            times_sampled=[1] * n,
            success=[False] * n,
        )

    def extended(self, replayed: SampledBatch) -> SampledBatch:
        """This batch followed by `replayed`, whose rows are marked as success-buffer draws."""
        return SampledBatch(
            groups=self.groups + replayed.groups,
            keys=self.keys + replayed.keys,
            priorities=self.priorities + replayed.priorities,
            probabilities=self.probabilities + replayed.probabilities,
            is_weights=self.is_weights + replayed.is_weights,
            fresh=self.fresh + [False] * len(replayed.groups),
            times_sampled=self.times_sampled + replayed.times_sampled,
            skipped_corrupt=self.skipped_corrupt + replayed.skipped_corrupt,
            success=[False] * len(self.groups) + [True] * len(replayed.groups),
        )


@dataclass(frozen=True)
class WeightVersion:
    """A published set of policy weights, announced through the store; rollout actors load it and verify it.

    `probe_*` is a short teacher-forced check: after loading, an engine must give `probe_logprobs` for
    `probe_response` after `probe_prompt` (within `probe_tolerance`), or the update did not take effect.
    """

    version: int
    path: str
    """A Hugging Face safetensors directory readable by every actor (shared memory or a shared filesystem)."""
    step: int = 0
    created_at: float = 0.0
    probe_prompt: list[int] = field(default_factory=list)
    probe_response: list[int] = field(default_factory=list)
    probe_logprobs: list[float] = field(default_factory=list)
    probe_tolerance: float = 1e-3


def encode_weight_version(w: WeightVersion) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, **vars(w)}, use_bin_type=True)


def decode_weight_version(data: bytes) -> WeightVersion:
    try:
        raw = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise RecordError("payload", f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or raw.pop("v", None) != SCHEMA_VERSION:
        raise RecordError("v", "not a weight announcement of this schema version")
    try:
        w = WeightVersion(**raw)
    except TypeError as exc:
        raise RecordError("payload", str(exc)) from None
    if not isinstance(w.version, int) or w.version < 0 or not isinstance(w.path, str) or not w.path:
        raise RecordError("version" if not isinstance(w.version, int) or w.version < 0 else "path", f"got {raw}")
    if len(w.probe_response) != len(w.probe_logprobs):
        raise RecordError("probe_logprobs", f"{len(w.probe_logprobs)} values for {len(w.probe_response)} tokens")
    return w


# --------------------------------------------------------------------------------------------- wire format
def _concat(arrays: Sequence[np.ndarray], dtype: str) -> bytes:
    """Concatenate as little-endian `dtype` ('<i4', '<f4') bytes."""
    return np.concatenate([np.asarray(a) for a in arrays]).astype(dtype).tobytes() if arrays else b""


def encode_group(group: RolloutGroup) -> bytes:
    lengths = group.response_lengths
    payload: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "gid": group.group_id,
        "pid": group.prompt_id,
        "ptok": group.prompt_token_ids.astype("<i4").tobytes(),
        "rlen": lengths.astype("<i4").tobytes(),
        "rtok": _concat(group.response_token_ids, "<i4"),
        "blp": _concat(group.behaviour_logprobs, "<f4"),
        "rew": group.rewards.astype("<f4").tobytes(),
        "ver": int(group.policy_version),
        "actor": group.actor_id,
        "t": float(group.created_at),
        "fin": list(group.finish_reasons),
        "ans": list(group.parsed_answers),
        "base": _concat(group.base_logprobs, "<f4") if group.base_logprobs is not None else None,
        "sel": group.selection,
    }
    return msgpack.packb(payload, use_bin_type=True)


def decode_group(data: bytes) -> RolloutGroup:
    """Parse and validate; any problem raises RecordError naming the field."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise RecordError("payload", f"not msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise RecordError("payload", f"expected a map, got {type(raw).__name__}")
    version = raw.get("v")
    if version != SCHEMA_VERSION:
        raise RecordError("v", f"schema version {version!r} is not {SCHEMA_VERSION}")
    lengths = _array(raw, "rlen", "<i4")
    if len(lengths) == 0 or (lengths < 0).any():
        raise RecordError("rlen", f"need >= 1 response with non-negative lengths, got {lengths.tolist()[:8]}")
    total = int(lengths.sum())
    tokens = _array(raw, "rtok", "<i4", expect=total)
    logprobs = _array(raw, "blp", "<f4", expect=total)
    g = len(lengths)
    bounds = [0, *itertools.accumulate(lengths.tolist())]
    # Value checks run once on the concatenated buffers (per-response checks cost 8x the numpy calls).
    _check_logprobs("behaviour_logprobs", logprobs, bounds)
    base = _array(raw, "base", "<f4", expect=total) if raw.get("base") is not None else None
    group = RolloutGroup(
        group_id=_str(raw, "gid"),
        prompt_id=_str(raw, "pid"),
        prompt_token_ids=_array(raw, "ptok", "<i4"),
        response_token_ids=_split(tokens, bounds),
        behaviour_logprobs=_split(logprobs, bounds),
        rewards=_array(raw, "rew", "<f4", expect=g),
        policy_version=_int(raw, "ver"),
        actor_id=_str(raw, "actor"),
        created_at=_float(raw, "t"),
        finish_reasons=_str_list(raw, "fin", g),
        parsed_answers=_str_list(raw, "ans", g, optional_items=True),
        base_logprobs=_split(base, bounds) if base is not None else None,
        selection=_str(raw, "sel") if "sel" in raw else "uniform",  # records written before the field existed
    )
    _validate_values(group)  # shapes follow from parsing with one set of bounds
    return group


def _split(values: np.ndarray, bounds: list[int]) -> list[np.ndarray]:
    return [values[a:b] for a, b in itertools.pairwise(bounds)]


def _check_logprobs(name: str, values: np.ndarray, bounds: list[int]) -> None:
    if not len(values) or (values.max() <= 1e-4 and values.min() > -np.inf):  # NaN fails the first test
        return
    bad = ~np.isfinite(values) | (values > 1e-4)
    if bad.any():
        first = int(np.argmax(bad))
        response = int(np.searchsorted(bounds, first, side="right")) - 1
        raise RecordError(f"{name}[{response}]", f"log-prob {values[first]} is not finite and <= 0")


def validate_group(group: RolloutGroup) -> None:
    """All checks, for a group built in memory (decode_group checks shapes while it parses)."""
    g = group.size
    if g == 0:
        raise RecordError("response_token_ids", "a group needs at least one response")
    arrays = {"behaviour_logprobs": group.behaviour_logprobs, "base_logprobs": group.base_logprobs}
    for name, per_response in arrays.items():
        if per_response is None:
            continue
        if len(per_response) != g:
            raise RecordError(name, f"{len(per_response)} arrays for {g} responses")
        for i, (tok, values) in enumerate(zip(group.response_token_ids, per_response, strict=True)):
            if len(tok) != len(values):
                raise RecordError(f"{name}[{i}]", f"{len(values)} values for {len(tok)} tokens")
    for name, n in (
        ("rewards", len(group.rewards)),
        ("finish_reasons", len(group.finish_reasons)),
        ("parsed_answers", len(group.parsed_answers)),
    ):
        if n != g:
            raise RecordError(name, f"{n} values for {g} responses")
    bounds = [0, *itertools.accumulate(len(r) for r in group.response_token_ids)]
    _check_logprobs("behaviour_logprobs", np.concatenate(group.behaviour_logprobs), bounds)
    _validate_values(group)


def _validate_values(group: RolloutGroup) -> None:
    """The checks that parsing cannot imply, shared by construction and decoding."""
    if not group.group_id or not group.prompt_id:
        raise RecordError("group_id" if not group.group_id else "prompt_id", "must be a non-empty string")
    if np.isinf(group.rewards).any():
        raise RecordError("rewards", f"infinite reward in {group.rewards.tolist()}")
    bad = [r for r in group.finish_reasons if r not in FINISH_REASONS]
    if bad:
        raise RecordError("finish_reasons", f"got {bad[0]!r}, allowed {', '.join(FINISH_REASONS)}")
    if group.policy_version < 0:
        raise RecordError("policy_version", f"got {group.policy_version}, must be >= 0")
    if group.selection not in SELECTIONS:
        raise RecordError("selection", f"got {group.selection!r}, allowed {', '.join(SELECTIONS)}")


def _array(raw: dict[str, Any], name: str, dtype: str, expect: int | None = None) -> np.ndarray:
    value = raw.get(name)
    if not isinstance(value, bytes):
        raise RecordError(name, f"expected bytes, got {type(value).__name__}")
    itemsize = np.dtype(dtype).itemsize
    if len(value) % itemsize:
        raise RecordError(name, f"{len(value)} bytes is not a whole number of {dtype} values")
    array = np.frombuffer(value, dtype=dtype)
    if expect is not None and len(array) != expect:
        raise RecordError(name, f"{len(array)} values, expected {expect}")
    return array


def _str(raw: dict[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str):
        raise RecordError(name, f"expected a string, got {value!r:.60}")
    return value


def _int(raw: dict[str, Any], name: str) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RecordError(name, f"expected an integer, got {value!r:.60}")
    return value


def _float(raw: dict[str, Any], name: str) -> float:
    value = raw.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise RecordError(name, f"expected a number, got {value!r:.60}")
    return float(value)


_STR, _STR_OR_NONE = {str}, {str, type(None)}


def _str_list(raw: dict[str, Any], name: str, n: int, *, optional_items: bool = False) -> list[Any]:
    value = raw.get(name)
    # One set of item types instead of a per-item isinstance: this runs for every group of every batch.
    ok = isinstance(value, list) and set(map(type, value)) <= (_STR_OR_NONE if optional_items else _STR)
    if not ok:
        raise RecordError(name, f"expected a list of strings, got {value!r:.60}")
    assert isinstance(value, list)
    if len(value) != n:
        raise RecordError(name, f"{len(value)} values for {n} responses")
    return value
