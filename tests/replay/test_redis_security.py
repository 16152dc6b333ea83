"""The replay's Redis side against real redis-servers: TLS (server and client certificates from a throwaway CA),
the password from an environment variable, and a prefix claimed by one run."""

from __future__ import annotations

import datetime
import ipaddress
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster.services import Service, start_redis
from configs.load import load_config, to_yaml
from configs.schema import RedisReplayConfig, RunConfig
from replay.records import RolloutGroup
from replay.redis_store import RedisStore

PASSWORD_VAR = "PACEFLOW_TEST_REDIS_PASSWORD"


def group(prompt: str = "p0") -> RolloutGroup:
    return RolloutGroup.new(
        prompt_id=prompt,
        prompt_token_ids=[1, 2],
        responses=[[3, 4, 2], [5, 2]],
        behaviour_logprobs=[[-0.1, -0.2, -0.3], [-0.4, -0.5]],
        rewards=[1.0, 0.0],
        policy_version=0,
        actor_id="test",
    )


def run_name() -> str:
    return f"sec-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------------------------ certificates
@dataclass(frozen=True)
class Pki:
    ca: Path
    """The CA that signed the server's and the client's certificates."""
    other_ca: Path
    """A CA unrelated to the server."""
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    """A client certificate signed by `other_ca` (its key: stranger_key)."""
    stranger_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    hosts: bool = False,
) -> x509.Certificate:
    """A certificate for `key`, self-signed when `issuer` is None; `hosts`: valid for localhost and 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)  # sign certs and CRLs
        builder = builder.add_extension(usage, critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    if hosts:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_path.write_bytes(pem)
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("paceflow test CA", ca_key, None, ca=True)
    other_cert = _issue("unrelated CA", other_key, None, ca=True)
    ca, _ = _write(folder, "ca", ca_cert, ca_key)
    other_ca, _ = _write(folder, "other-ca", other_cert, other_key)
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("server", "client", "stranger")}
    server = _write(
        folder, "server", _issue("localhost", keys["server"], (ca_cert.subject, ca_key), hosts=True), keys["server"]
    )
    client = _write(folder, "client", _issue("rollout", keys["client"], (ca_cert.subject, ca_key)), keys["client"])
    stranger = _write(
        folder, "stranger", _issue("stranger", keys["stranger"], (other_cert.subject, other_key)), keys["stranger"]
    )
    return Pki(ca, other_ca, *server, *client, *stranger)


def _tls_redis(pki: Pki, auth_clients: Literal["optional", "yes"]) -> Service:
    return start_redis(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_ca_file=pki.ca, tls_auth_clients=auth_clients
    )


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[Service]:
    """TLS only (no plain port); client certificates optional."""
    with _tls_redis(pki, "optional") as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[Service]:
    """TLS only, and every client must show a certificate signed by the CA (`tls-auth-clients yes`)."""
    with _tls_redis(pki, "yes") as server:
        yield server


def _fails_fast(cfg: RedisReplayConfig, error: type[Exception], pattern: str) -> str:
    """Constructing a store fails with `error` matching `pattern`, at once rather than after retries."""
    start = time.monotonic()
    with pytest.raises(error, match=pattern) as caught:
        RedisStore(cfg, run_name=run_name())
    assert time.monotonic() - start < 4.0, "a TLS misconfiguration must not be retried"
    return str(caught.value)


# ------------------------------------------------------------------------------------------------------ TLS
def test_a_store_over_tls_round_trips_a_group_and_its_stats(tls_server: Service, pki: Pki) -> None:
    cfg = RedisReplayConfig(port=tls_server.port, tls=True, tls_ca_file=pki.ca, fresh_fraction=1.0)
    store = RedisStore(cfg, run_name=run_name())
    try:
        g = group()
        assert store.add([g], [0.5]) == [g.group_id]
        batch = store.sample(1)
        assert batch.groups == [g] and batch.keys == [g.group_id]
        stats = store.stats()
        assert (stats.size, stats.inserted, stats.sampled, stats.corrupt) == (1, 1, 1, 0)
        assert store.client.info("server")["process_id"] == tls_server.pid  # our TLS-only server answered
    finally:
        store.clear()
        store.close()


def test_a_plain_connection_to_a_tls_port_is_a_clear_error(tls_server: Service) -> None:
    _fails_fast(
        RedisReplayConfig(port=tls_server.port),
        ConnectionError,
        rf"^replay\.tls: Redis at 127\.0\.0\.1:{tls_server.port} hung up .* set replay\.tls: true",
    )


def test_a_server_certificate_from_another_ca_is_refused(tls_server: Service, pki: Pki) -> None:
    for ca in (pki.other_ca, None):  # a wrong CA bundle; the system's CAs, which never signed the test CA
        message = _fails_fast(
            RedisReplayConfig(port=tls_server.port, tls=True, tls_ca_file=ca),
            ConnectionError,
            rf"^replay\.tls/replay\.tls_ca_file: TLS handshake with Redis at 127\.0\.0\.1:{tls_server.port} failed",
        )
        assert "certificate verify failed" in message
        assert ("the CA in replay.tls_ca_file" in message) == (ca is not None)


def test_a_missing_tls_file_is_named_before_connecting(tls_server: Service, pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match=r"^replay\.tls_ca_file: .*nope\.pem' does not exist"):
        RedisStore(RedisReplayConfig(port=tls_server.port, tls=True, tls_ca_file=missing))
    cfg = RedisReplayConfig(
        port=tls_server.port, tls=True, tls_ca_file=pki.ca, tls_cert_file=pki.client_cert, tls_key_file=missing
    )
    with pytest.raises(ValueError, match=r"^replay\.tls_key_file: .*nope\.pem' does not exist"):
        RedisStore(cfg)


def test_a_server_that_authenticates_clients_needs_their_certificate(mtls_server: Service, pki: Pki) -> None:
    port = mtls_server.port
    handshake = (
        rf"^replay\.tls/replay\.tls_cert_file/replay\.tls_key_file: TLS handshake with Redis at .*:{port} failed"
    )
    message = _fails_fast(RedisReplayConfig(port=port, tls=True, tls_ca_file=pki.ca), ConnectionError, handshake)
    assert "set replay.tls_cert_file and replay.tls_key_file" in message
    stranger = RedisReplayConfig(
        port=port, tls=True, tls_ca_file=pki.ca, tls_cert_file=pki.stranger_cert, tls_key_file=pki.stranger_key
    )
    assert "refused replay.tls_cert_file" in _fails_fast(stranger, ConnectionError, handshake)

    cfg = RedisReplayConfig(
        port=port, tls=True, tls_ca_file=pki.ca, tls_cert_file=pki.client_cert, tls_key_file=pki.client_key
    )
    _stores_a_group(cfg)


def _stores_a_group(cfg: RedisReplayConfig) -> None:
    """A store of this config connects, takes a group and hands it back (then leaves the server as it was)."""
    store = RedisStore(cfg, run_name=run_name())
    try:
        g = group()
        assert store.add([g], [1.0]) == [g.group_id] and len(store) == 1
        assert store.sample(1).groups == [g]
    finally:
        store.clear()
        store.close()


# ------------------------------------------------------------------------------------------- password source
@pytest.fixture(scope="module")
def password_server() -> Iterator[tuple[Service, str]]:
    secret = f"s3cret-{uuid.uuid4().hex}"
    with start_redis(password=secret) as server:
        yield server, secret


def test_the_password_comes_from_the_named_environment_variable(
    password_server: tuple[Service, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, secret = password_server
    cfg = RedisReplayConfig(port=server.port, password_env=PASSWORD_VAR)
    monkeypatch.setenv(PASSWORD_VAR, secret)
    _stores_a_group(cfg)

    monkeypatch.setenv(PASSWORD_VAR, "not-the-password")
    with pytest.raises(ValueError, match=rf"^replay\.password_env: Redis at 127\.0\.0\.1:{server.port} refused"):
        RedisStore(cfg)
    for value, state in ((None, "not set"), ("", "empty")):
        if value is None:
            monkeypatch.delenv(PASSWORD_VAR)
        else:
            monkeypatch.setenv(PASSWORD_VAR, value)
        with pytest.raises(
            ValueError, match=rf"^replay\.password_env: the environment variable {PASSWORD_VAR} is {state}"
        ):
            RedisStore(cfg)


def test_a_config_naming_the_variable_never_holds_the_secret(
    password_server: tuple[Service, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config keeps the variable's name only, in every form it is printed, saved or handed to a worker; the
    worker resolves the name in its own process."""
    server, secret = password_server
    monkeypatch.setenv(PASSWORD_VAR, secret)
    cfg = load_config("tiny_cpu", [f"replay={{kind: redis, port: {server.port}, password_env: {PASSWORD_VAR}}}"])
    for dumped in (to_yaml(cfg), cfg.model_dump_json(), cfg.to_worker_json(), repr(cfg)):
        assert secret not in dumped and PASSWORD_VAR in dumped
    worker = RunConfig.model_validate_json(cfg.to_worker_json()).replay
    assert worker.kind == "redis" and worker.password_env == PASSWORD_VAR and worker.password is None
    _stores_a_group(worker)


# -------------------------------------------------------------------------------------------- run identity
IDENTITY = {"run": "exp-20260101-000000-abc123", "run_dir": "/runs/exp", "objective": "paced"}


def test_a_prefix_belongs_to_the_first_identity_that_claims_it(redis_server: Service) -> None:
    name = run_name()
    first = RedisStore(RedisReplayConfig(port=redis_server.port), run_name=name)
    second = RedisStore(RedisReplayConfig(port=redis_server.port), run_name=name)  # another process of the run
    elsewhere = RedisStore(RedisReplayConfig(port=redis_server.port, key_prefix="other"), run_name=name)
    try:
        first.claim(IDENTITY)
        first.claim(IDENTITY)
        second.claim(dict(IDENTITY))  # a resumed run, or another of its processes
        intruder = {**IDENTITY, "run_dir": "/runs/elsewhere", "objective": "grpo"}
        with pytest.raises(ValueError) as caught:
            second.claim(intruder)
        message = str(caught.value)
        assert message.startswith(f"the replay prefix paceflow:{name} on Redis at 127.0.0.1:{redis_server.port}")
        assert "objective is 'paced' there, 'grpo' here" in message
        assert "run_dir is '/runs/exp' there, '/runs/elsewhere' here" in message
        assert "run is 'exp-" not in message  # only the fields that differ
        assert "replay.key_prefix" in message and f"--pattern 'paceflow:{name}:*'" in message
        with pytest.raises(ValueError, match="extra is '\\(unset\\)' there, 'x' here"):
            first.claim({**IDENTITY, "extra": "x"})
        first.claim(IDENTITY)  # a refused claim changed nothing
        elsewhere.claim(intruder)  # another key prefix is another replay
        with pytest.raises(ValueError, match="claim: the identity needs at least one field"):
            first.claim({})
    finally:
        for store in (first, elsewhere):
            store.clear()
            store.close()
        second.close()


def test_concurrent_claims_of_one_prefix_let_exactly_one_run_in(redis_server: Service) -> None:
    """Check and claim are one atomic step: of eight runs racing for a fresh prefix, one wins, seven are told."""
    name = run_name()
    stores = [RedisStore(RedisReplayConfig(port=redis_server.port), run_name=name) for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    outcomes: dict[int, str] = {}

    def race(i: int) -> None:
        barrier.wait()
        try:
            stores[i].claim({"run": f"run-{i}"})
            outcomes[i] = "won"
        except ValueError as exc:
            outcomes[i] = str(exc)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        winners = [i for i, outcome in outcomes.items() if outcome == "won"]
        assert len(outcomes) == 8 and len(winners) == 1
        assert all(f"run is 'run-{winners[0]}' there" in o for i, o in outcomes.items() if i != winners[0])
    finally:
        stores[0].clear()
        for store in stores:
            store.close()
