"""Start and stop the servers paceflow needs beside Ray: redis-server (replay) and prometheus (metrics).

Used by the demo, the tests and single-machine runs. Each server binds to 127.0.0.1 on a free port (Ray's own
GCS owns 6379), lives in its own temporary directory, and is stopped by the PID we started, never by name.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import redis

INSTALL_HINT = "install the Debian packages: apt-get install redis-server prometheus (make test does this as root)"


class ServiceError(RuntimeError):
    """A server binary is missing or did not come up."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """A running server process that we own."""

    name: str
    host: str
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    owns_workdir: bool = True

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServiceError(f"{name} not found on PATH; {INSTALL_HINT}")
    return path


def _spawn(name: str, argv: list[str], workdir: Path, host: str, port: int, *, owns_workdir: bool) -> Service:
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(argv, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    return Service(name, host, port, process, workdir, log_path, owns_workdir)


def _wait(service: Service, ready: Callable[[], bool], timeout_s: float) -> Service:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            log = service.log_path.read_text(errors="replace")[-2000:]
            service.stop()
            raise ServiceError(f"{service.name} exited with code {service.process.returncode}:\n{log}")
        if ready():
            return service
        time.sleep(0.05)
    service.stop()
    raise ServiceError(f"{service.name} did not become ready on {service.host}:{service.port} in {timeout_s} s")


def start_redis(
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    password: str | None = None,
    appendonly: bool = False,
    workdir: Path | None = None,
    timeout_s: float = 15.0,
    tls_cert_file: Path | None = None,
    tls_key_file: Path | None = None,
    tls_ca_file: Path | None = None,
    tls_auth_clients: Literal["optional", "yes"] = "optional",
) -> Service:
    """A redis-server owned by the caller. With appendonly it fsyncs the AOF every second (survives restarts
    when started again on the same workdir). With the three TLS files it serves TLS only, on `port` (the
    server's certificate and key, and the CA that clients' certificates must be signed by); `tls_auth_clients`
    'yes' refuses clients without such a certificate."""
    tls = (tls_cert_file, tls_key_file, tls_ca_file)
    if any(f is not None for f in tls) and not all(f is not None for f in tls):
        raise ValueError("start_redis: TLS needs tls_cert_file, tls_key_file and tls_ca_file together")
    port = port or free_port(host)
    owns = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="paceflow-redis-"))
    argv = [_binary("redis-server"), "--bind", host, "--dir", str(workdir), "--save", ""]
    if tls_cert_file is not None:
        argv += ["--tls-port", str(port), "--port", "0", "--tls-cert-file", str(tls_cert_file)]
        argv += ["--tls-key-file", str(tls_key_file), "--tls-ca-cert-file", str(tls_ca_file)]
        argv += ["--tls-auth-clients", tls_auth_clients]
    else:
        argv += ["--port", str(port)]
    argv += ["--appendonly", "yes", "--appendfsync", "everysec"] if appendonly else ["--appendonly", "no"]
    if password:
        argv += ["--requirepass", password]
    service = _spawn("redis-server", argv, workdir, host, port, owns_workdir=owns)

    def ready() -> bool:
        # Ask for the server's PID: a port answered by someone else's redis is not ours. Over TLS the probe shows
        # the server's own certificate as its client certificate (as redis-server does for replication), so it
        # passes `tls-auth-clients yes`; it checks the signature but not the hostname, since the certificate may
        # name the machine rather than `host`.
        client = redis.Redis(
            host=host,
            port=port,
            password=password,
            socket_timeout=0.5,
            ssl=tls_cert_file is not None,
            ssl_certfile=str(tls_cert_file) if tls_cert_file is not None else None,
            ssl_keyfile=str(tls_key_file) if tls_key_file is not None else None,
            ssl_ca_certs=str(tls_ca_file) if tls_ca_file is not None else None,
            ssl_check_hostname=False,
        )
        try:
            info = client.info("server")
        except redis.RedisError:
            return False
        finally:
            client.close()
        return bool(info.get("process_id") == service.pid)

    return _wait(service, ready, timeout_s)


def start_prometheus(
    *,
    scrape_targets: list[str],
    port: int | None = None,
    host: str = "127.0.0.1",
    scrape_interval_s: float = 1.0,
    timeout_s: float = 30.0,
) -> Service:
    """A prometheus server scraping `scrape_targets` ('host:port' of /metrics endpoints)."""
    port = port or free_port(host)
    workdir = Path(tempfile.mkdtemp(prefix="paceflow-prometheus-"))
    targets = ", ".join(f'"{t}"' for t in scrape_targets)
    interval = f"{max(1, round(scrape_interval_s * 1000))}ms"  # Prometheus durations take no decimals
    (workdir / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
        f"scrape_configs:\n  - job_name: paceflow\n    static_configs:\n      - targets: [{targets}]\n"
    )
    argv = [
        _binary("prometheus"),
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={host}:{port}",
    ]
    service = _spawn("prometheus", argv, workdir, host, port, owns_workdir=True)

    def ready() -> bool:
        # The flags name our own storage folder, so a port answered by another prometheus is not mistaken.
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/api/v1/status/flags", timeout=0.5) as r:
                flags = json.load(r)["data"]
        except (OSError, ValueError, KeyError):
            return False
        return bool(flags.get("storage.tsdb.path") == str(workdir / "data"))

    return _wait(service, ready, timeout_s)
