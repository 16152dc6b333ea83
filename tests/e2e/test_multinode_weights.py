"""Weights without a shared filesystem: a Ray cluster of three nodes on this machine (`ray.cluster_utils.Cluster`:
separate raylets and object stores), the learner pinned to one node and the rollout actors to another by custom
resources, weights moved through Ray's object store or broadcast from the learner's process over a gloo channel
(NCCL on GPUs). Actors load and verify every version they pick up, and no weight directory is ever written where
the learner would have put it.

It runs in a subprocess: the suite's own Ray (a single-node cluster) stays as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MODEL_CACHE, REPO

pytestmark = pytest.mark.slow

SCRIPT = """
import io, json, sys
from ray.cluster_utils import Cluster
from rich.console import Console
from cluster.launch import train
from configs.load import load_config

out = sys.argv[1]
store = 100 * 2**20
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store})
cluster.add_node(num_cpus=1, resources={"learner_node": 1}, object_store_memory=store)
cluster.add_node(num_cpus=1, resources={"rollout_node": 1}, object_store_memory=store)
cluster.wait_for_nodes()
cfg = load_config("tiny_cpu", [
    f"model.cache_dir={sys.argv[2]}", f"output_dir={out}", f"cluster.address={cluster.address}",
    "cluster.learner_resources={num_cpus: 0.5, custom: {learner_node: 1}}",
    "cluster.rollout_resources={num_cpus: 0.25, custom: {rollout_node: 0.25}}",
    "cluster.num_rollout_actors=2", "learner.num_steps=12", "eval.every_steps=4", "eval.num_prompts=4",
    *sys.argv[3:],
])
import ray
summary = train(cfg, console=Console(file=io.StringIO()))
nodes = {k: n["NodeID"] for n in ray.nodes() for k in ("learner_node", "rollout_node") if k in n["Resources"]}
print("RESULT " + json.dumps({
    "steps": len(summary.steps), "actors": summary.actor_counters, "nodes": nodes,
    "evals": [e["step"] for e in summary.evals],
}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_actors_on_another_node_load_every_version(tmp_path: Path, transport: str) -> None:
    """object_store is what 'auto' picks on a cluster; broadcast is the GPU cluster's transport, on gloo here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["RAY_AUTH_MODE"] = "disabled"  # a private test cluster on loopback
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(MODEL_CACHE), f"cluster.weight_transport={transport}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    # 12 steps: at 8, a full suite once ended with an actor that had picked up no version (the likeliest cause, not
    # pinned down: an actor still on its first batch, three raylets on two cores, while the tiny learner took all 8).
    assert result["steps"] == 12 and result["evals"] == [0, 4, 8, 12]
    actors = result["actors"]
    assert len(actors) == 2 and all(a["error"] is None for a in actors)
    # Each actor ran on the rollout node, not the learner's, and loaded (and probe-verified) newer versions.
    assert {a["node_id"] for a in actors} == {result["nodes"]["rollout_node"]} != {result["nodes"]["learner_node"]}
    assert all(a["weight_updates"] > 0 and a["weight_version"] > 0 for a in actors)
    # Nothing went through a filesystem path: the learner's weight directory (used by the filesystem
    # transport when joining a cluster) was never created.
    assert not (tmp_path / "tiny_cpu" / "weights").exists()
