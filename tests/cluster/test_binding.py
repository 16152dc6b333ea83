"""Every server paceflow starts listens on localhost unless configured otherwise: checked on the real listening
sockets (the kernel's table, through psutil), not on the config values alone."""

from __future__ import annotations

import os

import psutil

from cluster.launch import resolve_weight_transport
from cluster.metrics import MetricsServer, RunMetrics
from cluster.services import start_redis
from configs.load import load_config

LOOPBACK = {"127.0.0.1", "::1"}


def _listening(pid: int) -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def test_the_metrics_endpoint_listens_on_localhost_by_default() -> None:
    cfg = load_config("tiny_cpu", ["metrics.port=0"])
    server = MetricsServer(cfg.metrics, RunMetrics("binding"))
    try:
        sockets = {(ip, port) for ip, port in _listening(os.getpid()) if port == server.port}
        assert sockets and {ip for ip, _ in sockets} <= LOOPBACK, sockets
    finally:
        server.close(final_scrape_wait_s=0)


def test_redis_listens_on_localhost_by_default() -> None:
    with start_redis() as server:
        sockets = _listening(server.pid)
        assert sockets and {ip for ip, _ in sockets} <= LOOPBACK, sockets


def test_a_single_machine_run_keeps_its_weight_channel_and_replay_on_localhost() -> None:
    """The weight broadcast channel binds to cluster.weight_broadcast_host (replay/weight_broadcast.py binds its
    listener to that address alone); on one machine the launcher resolves it to loopback, and the replay's Redis
    address defaults to loopback too. Joining a cluster (RAY_ADDRESS) is what makes them the node's address."""
    cfg = resolve_weight_transport(load_config("tiny_cpu", ["replay={kind: redis}"]))
    assert cfg.cluster.weight_broadcast_host == "127.0.0.1"
    assert cfg.learner_spec().weight_broadcast_host == "127.0.0.1"
    assert cfg.replay.kind == "redis" and cfg.replay.host == "127.0.0.1"
    assert cfg.metrics.host == "127.0.0.1"
