"""The run's Prometheus endpoint and the Grafana dashboards, against a real Prometheus: a short PACED-RL run on
the tiny model is scraped every second, then every PromQL expression of every dashboard is evaluated over the
run and must return data."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from cluster.launch import train
from cluster.metrics import RunMetrics
from cluster.services import free_port, start_prometheus
from configs.load import load_config
from tests.conftest import MODEL_CACHE, REPO

DASHBOARDS = sorted((REPO / "cluster" / "grafana" / "dashboards").glob("*.json"))


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_dashboards_have_what_grafana_needs() -> None:
    assert {p.stem for p in DASHBOARDS} == {"throughput", "learner", "replay", "learning"}
    uids = set()
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int), path
        uids.add(d["uid"])
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["run"]["type"] == "query"
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)) and d["panels"], path
        for panel in d["panels"]:
            assert panel["type"] == "timeseries" and panel["title"], panel
            assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
            assert all(t["refId"] and t["expr"] for t in panel["targets"])
    assert len(uids) == len(DASHBOARDS)
    provisioning = REPO / "cluster" / "grafana" / "provisioning"
    assert (provisioning / "dashboards.yaml").is_file() and (provisioning / "datasources.yaml").is_file()


def test_metric_names_follow_prometheus_conventions() -> None:
    metrics = RunMetrics("r")
    metrics.observe_step(
        {
            "step": 1, "version": 1, "tokens": 10, "rows": 2, "compute_s": 1.0, "publish_s": 0.1, "wait_s": 0.0,
            "grad_norm": 1.0, "lag_mean": 0.0, "lag_max": 0, "reward_mean": 0.5, "metrics": {"loss": 1.0},
        }
    )  # fmt: skip
    for family in metrics.collect():
        assert family.name.startswith("paceflow_"), family.name
        if family.type == "counter":  # exposed with _total
            assert not family.name.endswith("_total"), family.name
        assert all(s.labels.get("run") == "r" for s in family.samples)


def _query_range(prometheus: str, expr: str, start: float, end: float) -> list[Any]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1s"})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_a_real_run(ray_local: Any, tmp_path: Path) -> None:
    port = free_port()
    cfg = load_config(
        "tiny_cpu",
        [
            f"model.cache_dir={MODEL_CACHE}",
            f"output_dir={tmp_path}",
            "objective={kind: paced, beta: 0.05}",
            "rollout.scheduler={kind: paced}",
            "replay.success_buffer={capacity: 64, insert_top_k: 32, share: 0.25}",
            "learner.num_steps=10",
            "eval.every_steps=5",
            "eval.num_prompts=4",
            f"metrics.port={port}",
            "metrics.poll_s=0.5",
        ],
    )
    with start_prometheus(scrape_targets=[f"127.0.0.1:{port}"], scrape_interval_s=1.0) as prometheus:
        start = time.time()
        summary = train(cfg, console=Console(width=120))
        end = time.time()
        assert (summary.run_dir / "metrics_url.txt").read_text().strip() == f"http://127.0.0.1:{port}/metrics"
        address = f"http://127.0.0.1:{prometheus.port}"
        assert _query_range(address, "up", start, end), "prometheus scraped nothing"
        empty = []
        for path in DASHBOARDS:
            for expr in _exprs(json.loads(path.read_text())):
                concrete = re.sub(r"\$run\b", cfg.name, expr)
                series = _query_range(address, concrete, start, end)
                if not any(s["values"] for s in series):
                    empty.append(f"{path.name}: {concrete}")
        assert not empty, "queries without data:\n" + "\n".join(empty)
        # The numbers are the run's: the last scraped learner step count is the run's last step.
        steps = _query_range(address, f'paceflow_learner_steps_total{{run="{cfg.name}"}}', start, end)
        assert float(steps[0]["values"][-1][1]) == summary.steps[-1]["step"]
