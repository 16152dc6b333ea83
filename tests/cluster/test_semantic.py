"""The sentence encoder's diversity and relevance on texts whose answer is known, their path through the
evaluator's records, and `paceflow pareto` end to end on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cluster.cli import main
from cluster.evaluate import PromptResult, per_prompt_metrics, results_from_json, results_to_json, summarize
from cluster.semantic import SentenceEncoder, semantic_diversity
from tests.conftest import MODEL_CACHE

HARBOR = "Write a haiku about a quiet harbor."
ON_TOPIC = [
    "Boats rest in the harbor, the water still at dawn.",
    "Fishing boats sleep by the quiet pier, gulls circling the calm sea.",
    "The harbor is silent; moored boats rock on gentle waves.",
]
SCATTERED = [
    "The stock market fell sharply after the interest rate decision.",
    "Add two cups of flour and bake the bread for forty minutes.",
    "The goalkeeper saved a penalty in the final minute of the match.",
]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()  # from the wheel's own files: a network access would fail here


def test_semantic_diversity_of_unit_vectors() -> None:
    same = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    orthogonal = np.eye(3)
    assert semantic_diversity(same) == pytest.approx(0.0)
    assert semantic_diversity(orthogonal) == pytest.approx(1.0)
    assert math.isnan(semantic_diversity(orthogonal[:1]))


def test_identical_responses_have_no_diversity_and_topics_spread_it(encoder: SentenceEncoder) -> None:
    repeated = encoder.metrics(HARBOR, [ON_TOPIC[0]] * 4)
    assert repeated["semantic_diversity"] == pytest.approx(0.0, abs=1e-6)
    on_topic, scattered = encoder.metrics(HARBOR, ON_TOPIC), encoder.metrics(HARBOR, SCATTERED)
    assert scattered["semantic_diversity"] > on_topic["semantic_diversity"] + 0.1
    assert on_topic["relevance"] > scattered["relevance"] + 0.1


def test_empty_responses_are_left_out(encoder: SentenceEncoder) -> None:
    with_empty = encoder.metrics(HARBOR, [*ON_TOPIC, "", "   "])
    assert with_empty == pytest.approx(encoder.metrics(HARBOR, ON_TOPIC))
    one = encoder.metrics(HARBOR, [ON_TOPIC[0], ""])
    assert math.isnan(one["semantic_diversity"]) and not math.isnan(one["relevance"])
    assert all(math.isnan(v) for v in encoder.metrics(HARBOR, ["", ""]).values())


def test_semantic_metrics_survive_the_json_round_trip_and_reach_the_summary(encoder: SentenceEncoder) -> None:
    results = [
        PromptResult("a", [math.nan] * 3, [None] * 3, ON_TOPIC, [9, 12, 10], encoder.metrics(HARBOR, ON_TOPIC)),
        PromptResult("b", [math.nan] * 3, [None] * 3, ["x", "", ""], [1, 0, 0], encoder.metrics(HARBOR, ["x", "", ""])),
    ]
    back = results_from_json(json.loads(json.dumps(results_to_json(results))))
    assert back[0].semantic == pytest.approx(results[0].semantic)
    assert math.isnan(back[1].semantic["semantic_diversity"])  # NaN travels as null
    metrics = per_prompt_metrics(back[0], (1,))
    assert set(metrics) >= {"semantic_diversity", "relevance"}
    assert math.isnan(metrics["maj@3"]) and math.isnan(metrics["distinct_answers"])  # no verdicts: no vote, not 0
    summary = summarize(back)
    assert summary["semantic_diversity"].n == 1 and summary["relevance"].n == 2  # NaN prompts left out


@pytest.mark.slow
def test_pareto_command_writes_table_json_and_figure(
    tiny_model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").symlink_to(tiny_model_dir)  # a "trained" run whose final policy is the tiny model itself
    out = tmp_path / "pareto"
    creative = ["task={kind: creative, num_prompts: 20, eval_size: 4}", "objective={kind: powerflow}"]
    args = ["pareto", "tiny_cpu", f"model.cache_dir={MODEL_CACHE}", *creative, "--run", str(run)]
    args += ["--temperatures", "0.7,1.5", "--prompts", "3", "--samples", "3", "--engine", "hf", "--out", str(out)]
    assert main(args) == 0
    terminal = capfd.readouterr().out
    assert "relevance" in terminal and "distinct-2" in terminal and "pareto.png" in terminal
    assert "trained minus base" in terminal  # the second table: the run's changes against the base
    points = json.loads((out / "pareto.json").read_text())["points"]
    assert [(p["model"], p["temperature"]) for p in points] == [
        ("base", 0.7),
        ("base", 1.5),
        (str(run), 0.7),
        (str(run), 1.5),
    ]
    for p in points:
        assert p["metrics"]["semantic_diversity"]["n"] >= 1 and 0.0 <= p["metrics"]["distinct_2"]["mean"] <= 1.0
    assert points[0]["vs_base"] is None and points[2]["vs_base"]["relevance"]["n"] == 3  # paired over 3 prompts
    assert (out / "pareto.png").stat().st_size > 10_000
    assert "| base | 0.7 |" in (out / "pareto.md").read_text()


def test_pareto_errors_name_the_argument(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pareto", "tiny_cpu", "--temperatures", "0.7,hot"]) == 2
    assert "--temperatures" in capsys.readouterr().err
    assert main(["pareto", "tiny_cpu", f"model.cache_dir={MODEL_CACHE}"]) == 2  # tiny_cpu's task has a verifier
    assert "task.kind" in capsys.readouterr().err
