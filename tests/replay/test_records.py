"""The rollout-group record: lossless round trip, and every malformed payload refused naming the field."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from replay.records import RecordError, RolloutGroup, decode_group, encode_group


def make_group(**overrides: object) -> RolloutGroup:
    fields: dict[str, object] = {
        "prompt_id": "3f2a",
        "prompt_token_ids": [1, 2, 3],
        "responses": [[5, 6, 2], [7, 2], []],
        "behaviour_logprobs": [[-0.5, -0.25, -0.125], [-1.0, -0.01], []],
        "rewards": [1.0, 0.0, float("nan")],
        "policy_version": 4,
        "actor_id": "rollout-1",
        "finish_reasons": ["stop", "stop", "abort"],
        "parsed_answers": ["12", None, None],
        "base_logprobs": [[-0.7, -0.2, -0.1], [-1.5, -0.3], []],
    }
    fields.update(overrides)
    return RolloutGroup.new(**fields)  # type: ignore[arg-type]


def test_round_trip_is_lossless() -> None:
    group = make_group()
    back = decode_group(encode_group(group))
    assert back == group
    assert back.group_id == group.group_id and back.policy_version == 4
    assert [r.tolist() for r in back.response_token_ids] == [[5, 6, 2], [7, 2], []]
    assert back.behaviour_logprobs[0].dtype == np.float32
    assert math.isnan(back.rewards[2]) and back.rewards[0] == 1.0
    assert back.parsed_answers == ["12", None, None]
    assert back.base_logprobs is not None and back.base_logprobs[1].tolist() == pytest.approx([-1.5, -0.3])
    assert back.response_lengths.tolist() == [3, 2, 0]
    assert back.num_correct == 1.0


def test_optional_fields_may_be_absent() -> None:
    group = make_group(base_logprobs=None)
    back = decode_group(encode_group(group))
    assert back.base_logprobs is None


def test_record_size_of_a_realistic_group_is_compact() -> None:
    """8 x 512 tokens: ints and floats as raw 4-byte buffers, not msgpack numbers."""
    rng = np.random.default_rng(0)
    group = RolloutGroup.new(
        prompt_id="p",
        prompt_token_ids=rng.integers(0, 50000, 128).tolist(),
        responses=[rng.integers(0, 50000, 512).tolist() for _ in range(8)],
        behaviour_logprobs=[(-rng.random(512)).tolist() for _ in range(8)],
        rewards=[1.0] * 8,
        policy_version=0,
        actor_id="a",
    )
    assert len(encode_group(group)) < 8 * 512 * 8 + 4096


def _mutate(key: str, value: object) -> bytes:
    raw = msgpack.unpackb(encode_group(make_group()), raw=False)
    raw[key] = value
    return msgpack.packb(raw, use_bin_type=True)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"\xc1not msgpack", "payload"),
        (msgpack.packb([1, 2, 3]), "payload"),
        (_mutate("v", 99), "v"),
        (_mutate("rtok", b"\x00\x01\x02"), "rtok"),
        (_mutate("rtok", np.zeros(4, "<i4").tobytes()), "rtok"),
        (_mutate("blp", "not bytes"), "blp"),
        (_mutate("rlen", np.array([3, -1, 0], "<i4").tobytes()), "rlen"),
        (_mutate("rew", np.zeros(2, "<f4").tobytes()), "rew"),
        (_mutate("gid", 17), "gid"),
        (_mutate("ver", "4"), "ver"),
        (_mutate("fin", ["stop", "stop", "exploded"]), "finish_reasons"),
        (_mutate("ans", ["a", 1, None]), "ans"),
        (_mutate("blp", np.array([-0.5, float("nan"), -0.1, -1, -0.01], "<f4").tobytes()), "behaviour_logprobs[0]"),
        (_mutate("blp", np.array([-0.5, 0.7, -0.1, -1, -0.01], "<f4").tobytes()), "behaviour_logprobs[0]"),
        (_mutate("base", np.zeros(3, "<f4").tobytes()), "base"),
        (_mutate("pid", ""), "prompt_id"),
    ],
)
def test_malformed_payloads_raise_record_error_naming_the_field(payload: bytes, field: str) -> None:
    with pytest.raises(RecordError) as info:
        decode_group(payload)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_construction_validates_too() -> None:
    with pytest.raises(RecordError, match=r"behaviour_logprobs\[1\]: 1 values for 2 tokens"):
        make_group(behaviour_logprobs=[[-0.5, -0.25, -0.125], [-1.0], []])
    with pytest.raises(RecordError, match="rewards: 2 values for 3 responses"):
        make_group(rewards=[1.0, 0.0])


def test_select_keeps_the_chosen_responses() -> None:
    group = make_group()
    winners = group.select([0])
    assert winners.size == 1 and winners.rewards.tolist() == [1.0]
    assert winners.base_logprobs is not None and len(winners.base_logprobs) == 1
    assert winners.group_id == group.group_id


def test_selection_round_trips_and_records_without_it_read_as_uniform() -> None:
    group = make_group(selection="explore")
    assert decode_group(encode_group(group)).selection == "explore"
    raw = msgpack.unpackb(encode_group(group), raw=False)
    del raw["sel"]  # a record written before the field existed
    assert decode_group(msgpack.packb(raw, use_bin_type=True)).selection == "uniform"
    raw["sel"] = "favourite"
    with pytest.raises(RecordError, match="selection: got 'favourite'"):
        decode_group(msgpack.packb(raw, use_bin_type=True))
