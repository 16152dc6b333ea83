"""`paceflow` and its subcommands: help texts, exit codes and error messages a user sees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main
from configs.load import preset_names

SUBCOMMANDS = ["validate", "presets", "schema", "prepare", "train", "eval", "report", "status", "scale", "stop", "demo"]


def test_console_script_help_lists_every_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in SUBCOMMANDS:
        assert command in out
    assert "examples:" in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_has_useful_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: paceflow {command}" in out
    assert len(out.splitlines()) >= 4
    if command in {"validate", "prepare", "train", "demo"}:
        assert "key.sub=value" in out and "tiny_cpu" in out  # overrides and preset names are documented


@pytest.mark.parametrize("name", preset_names())
def test_validate_accepts_every_preset(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", name]) == 0
    assert f"name: {name}" in capsys.readouterr().out


def test_validate_rejects_misspelt_key_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "tiny_cpu", "rollout.sampling.temprature=0.7"]) == 2
    err = capsys.readouterr().err
    assert "rollout.sampling.temprature: unknown key" in err
    assert "did you mean 'rollout.sampling.temperature'" in err


def test_validate_rejects_out_of_range_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "tiny_cpu", "rollout.sampling.temperature=-0.5"]) == 2
    assert "rollout.sampling.temperature: got -0.5" in capsys.readouterr().err


def test_validate_applies_overrides_and_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "tiny_cpu", "learner.lr=0.003", "--json"]) == 0
    assert '"lr": 0.003' in capsys.readouterr().out


def test_validate_reads_a_yaml_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "configs/presets/smollm2_cpu.yaml"]) == 0
    assert "kind: paced" in capsys.readouterr().out


def test_presets_lists_names_and_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in preset_names():
        assert name in out
    assert "SmolLM2" in out


def test_schema_documents_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "objective"]) == 0
    out = capsys.readouterr().out
    for kind in ("tb", "paced", "powerflow", "grpo"):
        assert f"kind: {kind}" in out
    assert "alpha: float (default 2.0)" in out
    assert main(["schema", "learner.deepspeed"]) == 0
    assert "zero_stage" in capsys.readouterr().out


def test_schema_rejects_unknown_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "learnr"]) == 2
    assert "no section 'learnr'" in capsys.readouterr().err


def test_prepare_reports_missing_local_model(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    code = main(["prepare", "tiny_cpu", f"model={{kind: local, path: {tmp_path}/nope}}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "model.path" in err and "does not exist" in err and "never downloads" in err


def test_no_arguments_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "usage: paceflow" in capsys.readouterr().out


def test_overrides_may_follow_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "tiny_cpu", "--json", "learner.lr=0.5"]) == 0
    assert '"lr": 0.5' in capsys.readouterr().out


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(SystemExit) as info:
        main(["validate", "tiny_cpu", "--bogus"])
    assert info.value.code == 2


def test_status_scale_and_stop_name_a_directory_that_is_not_a_running_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["status", str(tmp_path)], ["scale", str(tmp_path), "--actors", "2"], ["stop", str(tmp_path)]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert f"paceflow {command[0]}:" in err and "control.json" in err and str(tmp_path) in err
    assert main(["scale", str(tmp_path), "--actors", "0"]) == 2
    assert "--actors" in capsys.readouterr().err
