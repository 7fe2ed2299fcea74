"""TLS and mutual TLS between the coordinator and its clients, over real sockets: the CA that
`init` makes, pinning it by file or fingerprint, client certificates issued at registration, and
what a client without the right certificate gets (refused before any handler runs)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.config import (
    ADMIN_CREDENTIAL_FILE,
    Endpoint,
    admin_security,
    init_dir,
    load_config,
    server_tls,
)
from coordinator.server import Coordinator, serve
from coordinator.state import CoordinatorState
from tspace_core import tls
from tspace_core.catalogue import Catalogue, sqlite_url
from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from tspace_core.rpc import ADMIN_HEADER, CREDENTIAL_HEADER, ChannelSecurity, open_channel
from tspace_core.signing import generate_key, public_key_bytes, public_key_pem

OPENSSL = "openssl"
TIMEOUT_S = 30.0
COORD = [sys.executable, "-m", "coordinator"]
WORKER = [sys.executable, "-m", "worker"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    coord = tmp_path / "coord"
    init_dir(coord, sqlite_url(tmp_path / "catalogue.db"), hosts=["coordinator.example"])
    return coord


def start(folder: Path, client_certs: bool = False) -> Coordinator:
    state = CoordinatorState.open(folder, load_config(folder))
    return Coordinator(
        state,
        "127.0.0.1:0",
        tls=server_tls(folder, client_certs),
        enrol_listen="127.0.0.1:0" if client_certs else None,
    ).start()


@pytest.fixture
def served(folder: Path) -> Iterator[Coordinator]:
    coordinator = start(folder)
    yield coordinator
    coordinator.stop(grace=0.5)


@pytest.fixture
def mutual(folder: Path) -> Iterator[Coordinator]:
    coordinator = start(folder, client_certs=True)
    yield coordinator
    coordinator.stop(grace=0.5)


def ca_pem(folder: Path) -> bytes:
    return (folder / "tls" / "ca.crt").read_bytes()


def admin_metadata(folder: Path) -> tuple[tuple[str, str], ...]:
    return ((ADMIN_HEADER, (folder / ADMIN_CREDENTIAL_FILE).read_text().strip()),)


def admin_stub(folder: Path, coordinator: Coordinator) -> admin_pb2_grpc.AdminServiceStub:
    endpoint = Endpoint(coordinator.address, tls=True, client_certs=coordinator.tls.client_certs)
    channel = open_channel(coordinator.address, admin_security(folder, endpoint))
    return admin_pb2_grpc.AdminServiceStub(channel)


def enroll(folder: Path, coordinator: Coordinator, site: str = "lab") -> str:
    stub = admin_stub(folder, coordinator)
    response = stub.Enroll(
        admin_pb2.EnrollRequest(site=site), metadata=admin_metadata(folder), timeout=TIMEOUT_S
    )
    return str(response.token)


def health(address: str, security: ChannelSecurity | None) -> grpc.StatusCode:
    """The status of a health check over `security`: OK, or why the call failed."""
    with open_channel(address, security) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def register(
    address: str, security: ChannelSecurity | None, token: str, csr: bytes = b""
) -> worker_pb2.RegisterResponse:
    with open_channel(address, security) as channel:
        request = worker_pb2.RegisterRequest(
            token=token,
            public_key=public_key_bytes(generate_key()),
            device="cpu",
            hostname="site",
            csr=csr,
        )
        return worker_pb2_grpc.WorkerServiceStub(channel).Register(request, timeout=TIMEOUT_S)


def openssl(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [OPENSSL, *map(str, args)], input=stdin, capture_output=True, timeout=30, check=False
    )


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[attr-defined]


# --- TLS ---


def test_init_makes_a_ca_and_a_server_certificate_openssl_accepts(folder: Path) -> None:
    tls_dir = folder / "tls"
    for name in ("ca.key", "server.key", "admin.key"):
        assert (tls_dir / name).stat().st_mode & 0o777 == 0o600
    chain = (tls_dir / "server.crt").read_bytes()
    leaf = tls_dir / "leaf.pem"
    leaf.write_bytes(chain[: chain.index(b"-----END CERTIFICATE-----") + 26])
    verified = openssl("verify", "-CAfile", tls_dir / "ca.crt", "-purpose", "sslserver", leaf)
    assert verified.returncode == 0, verified.stderr
    names = openssl("x509", "-noout", "-ext", "subjectAltName", "-in", leaf).stdout.decode()
    for name in ("DNS:coordinator.example", "DNS:localhost", "IP Address:127.0.0.1"):
        assert name in names


def test_tls_clients_must_pin_the_coordinators_ca(folder: Path, served: Coordinator) -> None:
    address = served.address
    assert health(address, ChannelSecurity(ca_pem(folder))) == grpc.StatusCode.OK
    # Plaintext to a TLS port, or TLS pinned to another CA: no call gets through.
    assert health(address, None) == grpc.StatusCode.UNAVAILABLE
    foreign = ChannelSecurity(tls.make_ca().cert_pem)
    assert health(address, foreign) == grpc.StatusCode.UNAVAILABLE
    token = enroll(folder, served)
    assert code_of(lambda: register(address, foreign, token)) == grpc.StatusCode.UNAVAILABLE
    # The token was never seen, so it still works; registering over TLS with a CSR returns a
    # client certificate from the coordinator's CA, named after the worker.
    key = tls.new_key_pem()
    response = register(address, ChannelSecurity(ca_pem(folder)), token, tls.make_csr(key))
    cert = bytes(response.client_certificate)
    assert tls.common_name(cert) == response.worker_id
    (folder / "worker.crt").write_bytes(cert)
    verified = openssl(
        "verify",
        "-CAfile",
        folder / "tls" / "ca.crt",
        "-purpose",
        "sslclient",
        folder / "worker.crt",
    )
    assert verified.returncode == 0, verified.stderr


def test_the_ca_fingerprint_pins_what_a_worker_fetches(folder: Path, served: Coordinator) -> None:
    printed = openssl("x509", "-noout", "-fingerprint", "-sha256", "-in", folder / "tls" / "ca.crt")
    fingerprint = printed.stdout.decode().strip().split("=", 1)[1]  # AB:CD:... as OpenSSL prints
    assert tls.fetch_ca(served.address, fingerprint) == ca_pem(folder)
    with pytest.raises(tls.TlsError, match="not the coordinator you pinned"):
        tls.fetch_ca(served.address, tls.fingerprint(tls.make_ca().cert_pem))


def test_registration_with_a_bad_csr_changes_nothing(folder: Path, served: Coordinator) -> None:
    token = enroll(folder, served)
    security = ChannelSecurity(ca_pem(folder))
    for csr in (b"garbage", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", b"x" * 9000):
        assert code_of(lambda csr=csr: register(served.address, security, token, csr)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    assert register(served.address, security, token).worker_id  # the token is still unused


# --- mutual TLS ---


def test_mutual_tls_refuses_clients_without_a_certificate(
    folder: Path, mutual: Coordinator
) -> None:
    ca = ca_pem(folder)
    assert mutual.enrol_address is not None
    assert health(mutual.address, ChannelSecurity(ca)) == grpc.StatusCode.UNAVAILABLE
    foreign_ca = tls.make_ca()
    stranger = tls.make_client_cert(foreign_ca, "w-000000000000")
    assert (
        health(mutual.address, ChannelSecurity(ca, stranger.key_pem, stranger.cert_pem))
        == grpc.StatusCode.UNAVAILABLE
    )
    token = enroll(folder, mutual)
    # Registration happens on its own port, without a client certificate, and needs a CSR.
    refused = code_of(lambda: register(mutual.enrol_address, ChannelSecurity(ca), token))
    assert refused == grpc.StatusCode.INVALID_ARGUMENT
    key = tls.new_key_pem()
    response = register(mutual.enrol_address, ChannelSecurity(ca), token, tls.make_csr(key))
    mine = ChannelSecurity(ca, key, bytes(response.client_certificate))
    assert health(mutual.address, mine) == grpc.StatusCode.OK
    # The registration port serves registration alone.
    with open_channel(mutual.enrol_address, ChannelSecurity(ca)) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        metadata = ((CREDENTIAL_HEADER, response.credential),)
        assert (
            code_of(
                lambda: stub.AcquireUnit(
                    worker_pb2.AcquireUnitRequest(), metadata=metadata, timeout=5
                )
            )
            == grpc.StatusCode.UNIMPLEMENTED
        )


def test_a_client_certificate_speaks_only_for_its_own_worker(
    folder: Path, mutual: Coordinator, tiny_toml: str
) -> None:
    ca = ca_pem(folder)
    assert mutual.enrol_address is not None
    admin_stub(folder, mutual).CreateJob(
        admin_pb2.CreateJobRequest(spec_toml=tiny_toml),
        metadata=admin_metadata(folder),
        timeout=120,
    )
    workers = []
    for site in ("lab-a", "lab-b"):
        key = tls.new_key_pem()
        token = enroll(folder, mutual, site)
        response = register(mutual.enrol_address, ChannelSecurity(ca), token, tls.make_csr(key))
        workers.append((response, ChannelSecurity(ca, key, bytes(response.client_certificate))))
    (a, a_tls), (b, _) = workers
    with open_channel(mutual.address, a_tls) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        own = stub.AcquireUnit(
            worker_pb2.AcquireUnitRequest(),
            metadata=((CREDENTIAL_HEADER, a.credential),),
            timeout=TIMEOUT_S,
        )
        assert own.WhichOneof("result") == "assignment"
        # B's credential over A's certificate: refused, and nothing is leased to B.
        with pytest.raises(grpc.RpcError) as info:
            stub.AcquireUnit(
                worker_pb2.AcquireUnitRequest(),
                metadata=((CREDENTIAL_HEADER, b.credential),),
                timeout=TIMEOUT_S,
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert f"issued to {a.worker_id!r}" in info.value.details()  # type: ignore[attr-defined]
        # Nor does the admin credential work over a worker's certificate.
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            admin.ListJobs(
                admin_pb2.ListJobsRequest(), metadata=admin_metadata(folder), timeout=TIMEOUT_S
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    jobs = admin_stub(folder, mutual).ListJobs(
        admin_pb2.ListJobsRequest(), metadata=admin_metadata(folder), timeout=TIMEOUT_S
    )
    assert [j.name for j in jobs.jobs] == ["tiny"]


# --- refusing plaintext ---


def test_serve_refuses_plaintext_on_a_non_loopback_address(folder: Path) -> None:
    result = subprocess.run(
        [*COORD, "serve", str(folder), "--no-tls", "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "refusing to serve gRPC on 0.0.0.0:0 without TLS" in result.stderr
    assert "Traceback" not in result.stderr
    # --insecure is the explicit way to do it anyway.
    coordinator = serve(folder, load_config(folder), "0.0.0.0:0", tls=False, insecure=True)
    try:
        assert health(f"127.0.0.1:{coordinator.port}", None) == grpc.StatusCode.OK
    finally:
        coordinator.stop(grace=0.5)


def test_serve_refuses_contradictory_transport_options(folder: Path) -> None:
    config = load_config(folder)
    with pytest.raises(Exception, match="needs TLS"):
        serve(folder, config, "127.0.0.1:0", tls=False, client_certs=True)
    with pytest.raises(Exception, match="is for mutual TLS"):
        serve(folder, config, "127.0.0.1:0", enrol_listen="127.0.0.1:0")
    (folder / "tls" / "server.crt").unlink()
    with pytest.raises(Exception, match="has no TLS certificates"):
        serve(folder, config, "127.0.0.1:0")


def test_a_worker_will_not_send_its_token_in_plaintext_off_loopback(tmp_path: Path) -> None:
    args = ["--coordinator", "192.0.2.1:50051", "--token", "x" * 43]
    result = subprocess.run(
        [*WORKER, "join", *args, "--state-dir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "pin the coordinator's CA with --ca FILE or --ca-fingerprint" in result.stderr
    assert not (tmp_path / "w" / "identity.json").exists()


# --- the whole thing under mutual TLS, as an operator and a site run it ---


def _wait(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_a_site_trains_through_a_mutual_tls_coordinator(
    folder: Path, tmp_path: Path, tiny_toml: str
) -> None:
    coord = COORD
    server = subprocess.Popen(
        [*coord, "serve", str(folder), "--listen", "127.0.0.1:0", "--require-client-cert"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = None
    try:
        _wait(folder / "address")
        job = tmp_path / "job.toml"
        job.write_text(tiny_toml)
        created = subprocess.run(
            [*coord, "jobs", "create", str(job), "--dir", str(folder)], capture_output=True
        )
        assert created.returncode == 0, created.stderr
        token = subprocess.run(
            [*coord, "tokens", "create", "--site", "lab", "--dir", str(folder)],
            capture_output=True,
            text=True,
        )
        assert token.returncode == 0, token.stderr
        endpoint = Endpoint(**json.loads((folder / "endpoint.json").read_text()))
        assert endpoint.client_certs and endpoint.enrol_address
        log = tmp_path / "worker.log"
        worker = subprocess.Popen(
            [
                *WORKER,
                "join",
                "--coordinator",
                endpoint.address,
                "--enrol",
                endpoint.enrol_address,
                "--token",
                token.stdout.strip(),
                "--ca-fingerprint",
                tls.fingerprint(ca_pem(folder)),
                "--state-dir",
                str(tmp_path / "w"),
                "--threads",
                "1",
            ],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        assert worker.wait(timeout=300) == 0, log.read_text()
        assert (tmp_path / "w" / "tls.key").stat().st_mode & 0o777 == 0o600
        listed = subprocess.run(
            [*coord, "ensembles", "list", "--json", "--dir", str(folder)],
            capture_output=True,
            text=True,
        )
        assert listed.returncode == 0, listed.stderr
        assert "tiny:final" in listed.stdout
        # OpenSSL, knowing nothing of tspace, checks a registered statement's signature with
        # the worker's public key as PEM.
        catalogue = Catalogue(load_config(folder).catalogue_url)
        try:
            record = catalogue.list_checkpoints("tiny")[0]
        finally:
            catalogue.close()
        (tmp_path / "worker.pub.pem").write_bytes(public_key_pem(record.public_key))
        (tmp_path / "statement.json").write_bytes(record.statement)
        (tmp_path / "statement.sig").write_bytes(record.signature)
        verify = ["pkeyutl", "-verify", "-pubin", "-inkey", tmp_path / "worker.pub.pem", "-rawin"]
        checked = openssl(
            *verify, "-in", tmp_path / "statement.json", "-sigfile", tmp_path / "statement.sig"
        )
        assert checked.returncode == 0 and b"Signature Verified Successfully" in checked.stdout
        (tmp_path / "statement.json").write_bytes(record.statement.replace(b'"step":', b'"step":1'))
        forged = openssl(
            *verify, "-in", tmp_path / "statement.json", "-sigfile", tmp_path / "statement.sig"
        )
        assert forged.returncode != 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        server.terminate()
        server.wait(timeout=30)
