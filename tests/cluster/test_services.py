"""Real redis-server and prometheus processes on free localhost ports, stopped by PID."""

from __future__ import annotations

import json
import urllib.request

import pytest
import redis

from cluster.services import ServiceError, free_port, start_prometheus, start_redis


def test_redis_runs_on_a_free_localhost_port_with_a_password() -> None:
    with start_redis(password="s3cret") as server:
        assert server.port != 6379  # Ray's GCS owns the default port
        assert server.host == "127.0.0.1"
        client = redis.Redis(host=server.host, port=server.port, password="s3cret")
        assert client.ping()
        client.set("k", b"v")
        assert client.get("k") == b"v"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port).get("k")
        pid = server.pid
    assert server.process.poll() is not None, f"redis-server {pid} still running after stop()"


def test_redis_with_aof_keeps_data_across_a_restart(tmp_path: object) -> None:
    from pathlib import Path

    workdir = Path(str(tmp_path))
    port = free_port()
    with start_redis(port=port, appendonly=True, workdir=workdir) as server:
        client = redis.Redis(host=server.host, port=server.port)
        client.set("survives", b"yes")
        client.execute_command("BGREWRITEAOF")
    with start_redis(port=port, appendonly=True, workdir=workdir) as server:
        assert redis.Redis(host=server.host, port=server.port).get("survives") == b"yes"


def test_prometheus_answers_queries() -> None:
    with start_prometheus(scrape_targets=["127.0.0.1:1"]) as server:
        url = f"http://{server.host}:{server.port}/api/v1/query?query=up"
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = json.load(reply)
        assert body["status"] == "success"
    assert server.process.poll() is not None


def test_a_server_that_cannot_start_reports_its_log() -> None:
    with start_redis() as first, pytest.raises(ServiceError, match="exited with code"):
        start_redis(port=first.port)
