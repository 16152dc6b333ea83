"""cluster/cluster.yaml (`ray up`) and cluster/kuberay.yaml (KubeRay) agree with the preset that runs on them:
every custom resource the run asks for is provided by a node type with the GPUs it needs, and every node runs
with token authentication."""

from __future__ import annotations

import json
from typing import Any

import yaml

from cluster.launch import resolve_replay_host
from configs.load import load_config
from configs.schema import RedisReplayConfig
from tests.conftest import REPO

PRESET = "gpu_cluster_1p5b"


def _asks() -> list[tuple[dict[str, float], float]]:
    cfg = load_config(PRESET)
    res = [cfg.cluster.learner_resources, cfg.cluster.rollout_resources]
    return [(dict(r.custom), r.num_gpus) for r in res]


def test_ray_up_node_types_provide_what_the_preset_asks_for() -> None:
    cfg = yaml.safe_load((REPO / "cluster" / "cluster.yaml").read_text())
    types: dict[str, Any] = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for custom, gpus in _asks():
        fits = [
            name
            for name, t in types.items()
            if all(t["resources"].get(k, 0) >= v for k, v in custom.items()) and t["resources"].get("GPU", 0) >= gpus
        ]
        assert fits, f"no node type provides {custom} with {gpus} GPU(s)"
    rollout = types["rollout_gpu"]
    assert rollout["min_workers"] < rollout["max_workers"] <= cfg["max_workers"]  # rollout scales on its own
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    assert "--dashboard-host=127.0.0.1" in next(c for c in ray_starts if "--head" in c)
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert any("paceflow" in c and "pip install" in c for c in cfg["setup_commands"])


def test_kuberay_groups_provide_what_the_preset_asks_for() -> None:
    cluster = yaml.safe_load((REPO / "cluster" / "kuberay.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["authOptions"]["mode"] == "token" and spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    provided = []
    for group in groups:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), "KubeRay wants rayStartParams as strings"
        custom = json.loads(json.loads(params["resources"]))  # KubeRay's quoting: a JSON string inside quotes
        provided.append((custom, float(params.get("num-gpus", "0"))))
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for custom, gpus in _asks():
        assert any(all(c.get(k, 0) >= v for k, v in custom.items()) and g >= gpus for c, g in provided), custom


def test_replay_host_auto_becomes_this_machines_address() -> None:
    replay = resolve_replay_host(load_config(PRESET)).replay
    assert isinstance(replay, RedisReplayConfig) and replay.host not in ("auto", "")
    parts = replay.host.split(".")
    assert len(parts) == 4 and all(p.isdigit() for p in parts)
    local = resolve_replay_host(load_config("tiny_cpu", ["replay={kind: redis, host: 10.1.2.3}"])).replay
    assert isinstance(local, RedisReplayConfig) and local.host == "10.1.2.3"  # an explicit address is kept
