"""Held-out metrics, each checked on cases small enough to compute by hand, and `paceflow eval` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.evaluate import (
    PromptResult,
    distinct_n,
    majority_correct,
    mean_ci,
    paired_difference,
    pass_at_k,
    per_prompt_metrics,
    summarize,
    t_quantile_975,
)
from tests.conftest import MODEL_CACHE


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 1, 0.25),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 0, 2, 0.0),
        (4, 3, 2, 1.0),  # fewer than k wrong answers: every draw of 2 holds a correct one
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (8, 8, 8, 1.0),
    ],
)
def test_pass_at_k_is_the_unbiased_estimator(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_needs_k_samples() -> None:
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        pass_at_k(4, 1, 5)


def test_majority_vote() -> None:
    assert majority_correct([1, 0, 0, 1], ["5", "7", "7", "5."]) == 1.0  # 2-2 tie: '5' came first; '5.' is '5'
    assert majority_correct([0, 0, 1, 1], ["7", "7", "5", "5"]) == 0.0  # the tie goes to '7', which is wrong
    assert majority_correct([0, 1, 1, 0], ["7", "5", "5", None]) == 1.0  # unparsed responses do not vote
    assert majority_correct([0, 0], [None, None]) == 0.0


def test_distinct_n() -> None:
    texts = ["a b c", "a b d"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # a b c a b d
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # ab bc ab bd
    assert distinct_n(texts, 3) == 1.0
    assert math.isnan(distinct_n(texts, 4))


def test_per_prompt_metrics_leave_invalid_rewards_out() -> None:
    r = PromptResult("p", [1.0, math.nan, 0.0, 1.0], ["3", None, "4", "3"], ["x 3", "?", "x 4", "3"], [2, 1, 2, 1])
    m = per_prompt_metrics(r, pass_ks=(1, 2))
    assert m["avg@4"] == pytest.approx(2 / 3)
    assert m["pass@1"] == pytest.approx(2 / 3)
    assert m["pass@2"] == pytest.approx(1 - 0 / 3)  # 1 wrong of 3 valid: every pair holds a correct one
    assert m["maj@4"] == 1.0
    assert m["distinct_answers"] == 2.0
    assert m["response_tokens"] == 1.5


def test_confidence_intervals() -> None:
    e = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert e.mean == 2.5 and e.n == 4
    assert e.half_width == pytest.approx(3.182 * math.sqrt(5 / 3) / 2, rel=1e-4)  # t(0.975, 3) sd / sqrt(n)
    assert mean_ci([0.5]).half_width == 0.0
    assert math.isnan(mean_ci([]).mean)
    assert t_quantile_975(1) == 12.706
    assert t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile_975(100) == pytest.approx(1.984, abs=1e-3)
    assert t_quantile_975(10_000) == pytest.approx(1.960, abs=1e-3)


def test_paired_difference_matches_prompts_by_id() -> None:
    def r(pid: str, rewards: list[float]) -> PromptResult:
        return PromptResult(pid, rewards, ["1"] * len(rewards), ["1"] * len(rewards), [1] * len(rewards))

    before = [r("a", [1, 0, 0, 0]), r("b", [1, 1, 0, 0])]
    after = [r("b", [1, 1, 0, 0]), r("a", [1, 1, 1, 0]), r("c", [1, 1, 1, 1])]  # c has no partner
    d = paired_difference(before, after, "avg@4")
    assert d.n == 2 and d.mean == pytest.approx(0.25)  # (0.5 + 0) / 2
    s = summarize(after, pass_ks=(1,))
    assert s["avg@4"].n == 3 and s["avg@4"].mean == pytest.approx((0.5 + 0.75 + 1.0) / 3)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_eval_command_writes_the_table_and_json(
    engine: str, tiny_model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").symlink_to(tiny_model_dir)  # a run directory whose final policy is the tiny model itself
    out, log = tmp_path / "eval.json", tmp_path / "eval.log"
    args = ["eval", str(run), "tiny_cpu", f"model.cache_dir={MODEL_CACHE}"]
    args += ["--engine", engine, "--prompts", "4", "--samples", "2", "--pass-k", "1,2", "--against", "base"]
    assert main([*args, "--json", str(out), "--log", str(log)]) == 0
    terminal = capfd.readouterr().out
    assert "avg@2" in terminal and "paired diff" in terminal
    payload = json.loads(out.read_text())
    assert payload["prompts"] == 4 and payload["engine"] == engine and len(payload["per_prompt"]) == 4
    assert set(payload["metrics"]) >= {"avg@2", "pass@1", "pass@2", "maj@2", "distinct_answers", "distinct_1"}
    assert payload["difference"]["avg@2"]["n"] == 4
    assert all(len(row["rewards"]) == 2 for row in payload["per_prompt"])
    if engine == "vllm":
        assert "vLLM" in log.read_text() or "vllm" in log.read_text()  # the engine's output went to the log


def test_eval_command_errors_name_the_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path)]) == 2
    assert "CONFIG is required" in capsys.readouterr().err
    assert main(["eval", "base", "tiny_cpu", "--samples", "2", "--pass-k", "4"]) == 2
    assert "--pass-k" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere"), "tiny_cpu", f"model.cache_dir={MODEL_CACHE}"]) == 1
    assert "MODEL_OR_RUN" in capsys.readouterr().err
