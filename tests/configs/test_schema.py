"""The config schema and loader: presets parse, bad input names the field, overrides work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from configs.load import ConfigError, apply_override, load_config, preset_names, to_yaml, validate_config
from configs.schema import RunConfig, TBObjectiveConfig

PRESETS = preset_names()


def test_the_required_presets_exist() -> None:
    assert {"tiny_cpu", "smollm2_cpu", "gpu_cluster_1p5b"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates_and_round_trips(name: str, tmp_path: Path) -> None:
    cfg = load_config(name)
    assert cfg.name == name
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(dumped) == cfg


def _error(overrides: list[str], preset: str = "tiny_cpu") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(preset, overrides)
    return str(info.value)


def test_misspelt_key_names_the_field_and_suggests_the_right_one() -> None:
    msg = _error(["learner.lrr=1e-4"])
    assert "learner.lrr: unknown key" in msg
    assert "did you mean 'learner.lr'" in msg


def test_misspelt_key_inside_a_union_member_is_reported_without_the_tag() -> None:
    msg = _error(["objective.bta=0.2", "rollout.engine.batchsize=4"])
    assert "objective.bta: unknown key. did you mean 'objective.beta'" in msg
    assert "rollout.engine.batchsize: unknown key. did you mean 'rollout.engine.batch_size'" in msg


def test_misspelt_top_level_section() -> None:
    assert "did you mean 'learner'" in _error(["lerner.lr=1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("learner.lr=-1", "learner.lr: got -1 (Input should be greater than 0)"),
        ("rollout.sampling.top_p=1.5", "rollout.sampling.top_p: got 1.5"),
        ("replay.fresh_fraction=2", "replay.fresh_fraction: got 2"),
        ("learner.deepspeed.zero_stage=4", "learner.deepspeed.zero_stage: got 4"),
        ("rollout.sampling.num_samples=0", "rollout.sampling.num_samples: got 0"),
        ("objective.kind=ppo", 'objective.kind: got "ppo"'),
        ("learner.lr=fast", 'learner.lr: got "fast"'),
    ],
)
def test_out_of_range_or_wrong_type_names_field_and_value(override: str, expected: str) -> None:
    assert expected in _error([override])


def test_all_errors_are_reported_at_once() -> None:
    msg = _error(["learner.lr=-1", "objective.beta=0", "learner.num_steps=0"])
    assert msg.count("\n") == 3


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["task={kind: creative, num_prompts: 10}"], "needs a verifier"),
        (["rollout.scheduler.kind=paced"], "objective.kind='paced'"),
        (
            ["objective={kind: grpo}", "rollout.sampling.num_samples=1", "learner.micro_batch_size=1"],
            ">= 2 for grpo",
        ),
        (
            ["objective.log_z=vargrad", "rollout.sampling.num_samples=1", "learner.micro_batch_size=1"],
            "vargrad",
        ),
        (["model.num_heads=4"], "head_dim 64"),
        (["learner.micro_batch_size=1000"], "exceeds the batch"),
        (["rollout.engine={kind: vllm, max_model_len: 128}"], "max_model_len=128"),
        (["learner.deepspeed.offload_param=true"], "offload_param needs zero_stage 3"),
        (["task.eval_size=0"], "nothing to evaluate on"),
        (["replay.successful_only=true"], "would filter the main replay table"),
        (["replay.insert_top_k=64"], "set replay.success_buffer"),
        (["objective={kind: grpo}", "replay.success_buffer={share: 0.25}"], "needs whole groups"),
        (["objective.log_z=vargrad", "replay.success_buffer={share: 0.25}"], "log_z='vargrad'"),
        (["replay.success_buffer={share: 0.9}", "learner.groups_per_step=2"], "leaves no fresh group"),
        (
            ["task={kind: creative, num_prompts: 10}", "objective={kind: powerflow}", "replay.success_buffer={}"],
            "has no verifier",
        ),
        (["learner.sync=true", "replay.fresh_fraction=1.0", "rollout.prompts_per_batch=8"], "make them equal"),
    ],
)
def test_cross_field_rules(overrides: list[str], expected: str) -> None:
    assert expected in _error(overrides)


def test_the_batch_plan_splits_group_slots_between_fresh_groups_and_replayed_responses() -> None:
    cfg = load_config("smollm2_cpu", ["learner.groups_per_step=8", "rollout.sampling.num_samples=8"])
    assert cfg.replay.success_buffer is not None and cfg.replay.success_buffer.share == 0.25
    assert cfg.batch_plan == (6, 16)  # 2 of 8 group slots, 8 responses each, from the success buffer
    assert load_config("tiny_cpu").batch_plan == (4, 0)


def test_tb_objective_fields_survive_an_override_round_trip() -> None:
    cfg = load_config("tiny_cpu", ["objective.beta=0.5", "rollout.sampling.stop=[END, '\\n\\n']"])
    assert isinstance(cfg.objective, TBObjectiveConfig)
    assert cfg.objective.beta == 0.5
    assert cfg.rollout.sampling.stop == ["END", "\\n\\n"]


def test_override_can_switch_a_union_member() -> None:
    cfg = load_config("tiny_cpu", ["replay={kind: redis, port: 7000, key_prefix: exp1}"])
    assert cfg.replay.kind == "redis"
    assert cfg.replay.port == 7000


@pytest.mark.parametrize("bad", ["learner.lr", "=3", "learner..lr=3", "learner.lr.x=3"])
def test_malformed_overrides_are_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        raw: dict[str, object] = {"learner": {"lr": 1.0}}
        apply_override(raw, bad)


def test_config_is_frozen() -> None:
    cfg = load_config("tiny_cpu")
    with pytest.raises(ValidationError):
        cfg.learner.lr = 3.0  # type: ignore[misc]


def test_missing_required_sections_are_named() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"name": "x"})
    for section in ("model", "task", "objective"):
        assert f"{section}: required field is missing" in str(info.value)


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)
    path.write_text("model: {kind: tiny\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_unknown_config_file_lists_presets() -> None:
    with pytest.raises(ConfigError, match="tiny_cpu"):
        load_config("does_not_exist")


def test_redis_secrets_are_masked_and_sources_exclusive(tmp_path: Path) -> None:
    cfg = load_config("tiny_cpu", ["replay={kind: redis, password: hunter2}"])
    assert "hunter2" not in to_yaml(cfg)
    assert cfg.replay.kind == "redis" and cfg.replay.password is not None
    assert cfg.replay.password.get_secret_value() == "hunter2"
    msg = _error([f"replay={{kind: redis, password: a, password_file: {tmp_path / 'p'}}}"])
    assert "replay: give one of password, password_file or password_env, not password and password_file" in msg
    msg = _error([f"replay={{kind: redis, password_file: {tmp_path / 'p'}, password_env: REDIS_PW}}"])
    assert "not password_file and password_env" in msg
    assert "not password and password_env" in _error(["replay={kind: redis, password: a, password_env: REDIS_PW}"])


def test_password_env_must_name_a_variable_and_is_never_echoed() -> None:
    """A password pasted into password_env by mistake must not be printed back in the error."""
    for value in ("hunter 2!", "9LIVES", "a-b", ""):
        msg = _error([f"replay={{kind: redis, password_env: '{value}'}}"])
        assert "password_env must be the name of an environment variable" in msg
        assert not value or value not in msg
    cfg = load_config("tiny_cpu", ["replay={kind: redis, password_env: _PACEFLOW_REDIS_PW1}"])
    assert cfg.replay.kind == "redis" and cfg.replay.password_env == "_PACEFLOW_REDIS_PW1"


def test_tls_client_certificate_fields_are_checked(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    for field in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        assert f"replay: {field} is set but tls is false" in _error([f"replay={{kind: redis, {field}: {cert}}}"])
    for field in ("tls_cert_file", "tls_key_file"):
        msg = _error([f"replay={{kind: redis, tls: true, {field}: {cert}}}"])
        assert f"tls_cert_file and tls_key_file go together (a client certificate and its key); only {field}" in msg
    cfg = load_config("tiny_cpu", [f"replay={{kind: redis, tls: true, tls_cert_file: {cert}, tls_key_file: {key}}}"])
    assert cfg.replay.kind == "redis" and (cfg.replay.tls_cert_file, cfg.replay.tls_key_file) == (cert, key)


def test_resolved_yaml_puts_kind_first() -> None:
    data = yaml.safe_load(to_yaml(load_config("smollm2_cpu")))
    assert next(iter(data["objective"])) == "kind"
    assert next(iter(data["rollout"]["engine"])) == "kind"


def test_every_field_has_a_description() -> None:
    """`paceflow schema` documents fields from these; an undocumented field is a bug."""
    from configs.load import model_classes

    seen: set[type] = set()
    stack: list[type[BaseModel]] = [RunConfig]
    missing = []
    while stack:
        model = stack.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            sub = model_classes(field.annotation)
            stack.extend(sub)
            if name != "kind" and not sub and not field.description:
                missing.append(f"{model.__name__}.{name}")
    assert not missing, f"fields without a docstring: {missing}"


def test_worker_json_carries_the_password_and_printed_configs_do_not() -> None:
    cfg = load_config("tiny_cpu", ["replay={kind: redis, password: hunter2}"])
    assert "hunter2" not in to_yaml(cfg) and "hunter2" not in cfg.model_dump_json()
    again = RunConfig.model_validate_json(cfg.to_worker_json())
    assert again.replay.kind == "redis" and again.replay.password is not None
    assert again.replay.password.get_secret_value() == "hunter2"
