"""`ray job submit` against a running head, as a user of a cluster runs paceflow: a real `ray start --head` (its
own ports, temp dir and auth token, so the suite's own Ray is untouched), the repository uploaded as the job's
working directory, a short training run, its outputs checked, and only that head stopped."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.services import free_port
from tests.conftest import MODEL_CACHE, REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head on free ports with token authentication; yields (job API address, the env to talk to it)."""
    tmp_path = tmp_path_factory.mktemp("ray_head")
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's entrypoint finds this paceflow
    )
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="pfray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--ray-client-server-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    args = [str(BIN / "ray"), "start", "--head", "--block", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
    args += [f"{name}={port}" for name, port in ports.items()]
    args += ["--min-worker-port=21000", "--max-worker-port=21999", f"--temp-dir={temp_dir}"]
    args += ["--num-cpus=4", "--object-store-memory=200000000", "--disable-usage-stats"]
    log = (tmp_path / "ray_head.log").open("w")
    head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the job API answers (with 401 until a token is sent) once the dashboard is up
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "ray_head.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the Ray head's dashboard did not come up in 120 s"
                time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its own processes, and only those
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_through_a_running_head(ray_head: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    address, env = ray_head
    out = tmp_path / "runs"
    job = f"paceflow-test-{secrets.token_hex(3)}"
    entrypoint = [
        "paceflow", "train", "tiny_cpu",
        f"output_dir={out}", f"model.cache_dir={MODEL_CACHE}", "learner.num_steps=2", "eval.every_steps=0",
    ]  # fmt: skip
    ray_job = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job]
    submit = subprocess.run(
        [*ray_job, "--working-dir", str(REPO), "--", *entrypoint],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", address, job], env=env, capture_output=True, text=True
    )
    assert "succeeded" in status.stdout.lower(), status.stdout + status.stderr
    run_dir = out / "tiny_cpu"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    assert (run_dir / "final" / "config.json").is_file()
    assert "paceflow train tiny_cpu" in submit.stdout  # `ray job submit` streamed the job's own output


def test_the_job_api_refuses_a_client_without_the_token(ray_head: tuple[str, dict[str, str]]) -> None:
    address, env = ray_head
    anonymous = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    anonymous["RAY_AUTH_MODE"] = "disabled"
    listed = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", address], env=anonymous, capture_output=True, text=True
    )
    assert listed.returncode != 0
    assert "401" in listed.stdout + listed.stderr or "auth" in (listed.stdout + listed.stderr).lower()
