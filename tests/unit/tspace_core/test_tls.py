"""Tests for tspace_core.tls: OpenSSL as the oracle, real gRPC TLS servers as the peers."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tspace_core import tls
from tspace_core.errors import TspaceError
from tspace_core.tls import (
    ADMIN_COMMON_NAME,
    DEFAULT_HOSTS,
    MAX_CSR_BYTES,
    Issued,
    TlsError,
)

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl CLI is not installed")
posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX-only")


def openssl(*args: str | Path) -> str:
    assert OPENSSL is not None
    done = subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def verifies(tmp_path: Path, ca_pem: bytes, cert_pem: bytes, *extra: str) -> bool:
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    assert OPENSSL is not None
    args = [
        OPENSSL,
        "verify",
        *extra,
        "-CAfile",
        str(tmp_path / "ca.pem"),
        str(tmp_path / "cert.pem"),
    ]
    done = subprocess.run(args, capture_output=True, timeout=30)
    return done.returncode == 0


def ext(tmp_path: Path, cert_pem: bytes, name: str) -> str:
    (tmp_path / "show.pem").write_bytes(cert_pem)
    return openssl("x509", "-noout", "-ext", name, "-in", tmp_path / "show.pem")


def openssl_csr(tmp_path: Path, *newkey: str, subj: str = "/CN=evil") -> bytes:
    out = tmp_path / "req.pem"
    openssl("req", "-new", *newkey, "-nodes", "-keyout", tmp_path / "req.key", "-subj", subj,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "subjectAltName=DNS:evil.example", "-out", out)  # fmt: skip
    return out.read_bytes()


@pytest.fixture(scope="module")
def ca() -> Issued:
    return tls.make_ca()


@pytest.fixture(scope="module")
def other_ca() -> Issued:
    return tls.make_ca("another CA")


@pytest.fixture(scope="module")
def server(ca: Issued) -> Issued:
    return tls.make_server_cert(ca, ["coord.example.org", "10.1.2.3", "*.sites.example"])


# -- certificates, with OpenSSL as the oracle ---------------------------------------------------


@needs_openssl
def test_ca_is_a_self_signed_ca_with_path_length_zero(tmp_path: Path, ca: Issued) -> None:
    assert verifies(tmp_path, ca.cert_pem, ca.cert_pem)
    constraints = ext(tmp_path, ca.cert_pem, "basicConstraints")
    assert "critical" in constraints and "CA:TRUE" in constraints and "pathlen:0" in constraints
    usage = ext(tmp_path, ca.cert_pem, "keyUsage")
    assert "critical" in usage and "Certificate Sign" in usage and "CRL Sign" in usage
    assert ext(tmp_path, ca.cert_pem, "subjectKeyIdentifier").strip()


@needs_openssl
def test_server_cert_verifies_for_its_hosts(tmp_path: Path, ca: Issued, server: Issued) -> None:
    assert verifies(tmp_path, ca.cert_pem, server.cert_pem, "-purpose", "sslserver")
    for name in ("coord.example.org", "localhost", "a.sites.example"):
        assert verifies(tmp_path, ca.cert_pem, server.cert_pem, "-verify_hostname", name)
    for ip in ("10.1.2.3", "127.0.0.1", "::1"):
        assert verifies(tmp_path, ca.cert_pem, server.cert_pem, "-verify_ip", ip)
    assert not verifies(tmp_path, ca.cert_pem, server.cert_pem, "-verify_hostname", "evil.org")
    assert not verifies(tmp_path, ca.cert_pem, server.cert_pem, "-verify_ip", "10.1.2.4")
    assert not verifies(tmp_path, ca.cert_pem, server.cert_pem, "-purpose", "sslclient")


@needs_openssl
def test_server_cert_names_and_usage(tmp_path: Path, server: Issued) -> None:
    san = ext(tmp_path, server.cert_pem, "subjectAltName")
    for entry in ("DNS:coord.example.org", "IP Address:10.1.2.3", "DNS:*.sites.example"):
        assert entry in san
    assert (
        "DNS:localhost" in san
        and "IP Address:127.0.0.1" in san
        and "IP Address:0:0:0:0:0:0:0:1" in san
    )
    assert "TLS Web Server Authentication" in ext(tmp_path, server.cert_pem, "extendedKeyUsage")
    assert "CA:FALSE" in ext(tmp_path, server.cert_pem, "basicConstraints")
    assert ext(tmp_path, server.cert_pem, "authorityKeyIdentifier").strip()
    assert tls.common_name(server.cert_pem) == "coord.example.org"


@needs_openssl
def test_server_hosts_are_deduplicated_in_order(tmp_path: Path, ca: Issued) -> None:
    cert = tls.make_server_cert(ca, ["::1", "0:0::1", "LOCALHOST", "db.example"]).cert_pem
    san = ext(tmp_path, cert, "subjectAltName").split("\n", 1)[1].strip()
    assert san == (
        "IP Address:0:0:0:0:0:0:0:1, DNS:LOCALHOST, DNS:db.example, IP Address:127.0.0.1"
    )
    assert tls.common_name(tls.make_server_cert(ca, []).cert_pem) == DEFAULT_HOSTS[0]


@pytest.mark.parametrize("host", ["bad host", "under_score.example", "a..b", "-lead.example", ""])
def test_server_cert_refuses_bad_host_names(ca: Issued, host: str) -> None:
    with pytest.raises(TlsError, match="neither an IP address nor a DNS name"):
        tls.make_server_cert(ca, [host])


@needs_openssl
def test_cert_from_another_ca_does_not_verify(tmp_path: Path, ca: Issued, other_ca: Issued) -> None:
    foreign = tls.make_server_cert(other_ca, ["coord.example.org"])
    assert not verifies(tmp_path, ca.cert_pem, foreign.cert_pem)
    client = tls.sign_client_csr(other_ca, tls.make_csr(tls.new_key_pem()), "w1")
    assert not verifies(tmp_path, ca.cert_pem, client)


# -- client certificates from CSRs --------------------------------------------------------------


@needs_openssl
def test_openssl_csr_gets_our_name_not_its_own(tmp_path: Path, ca: Issued) -> None:
    csr = openssl_csr(tmp_path, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")
    cert = tls.sign_client_csr(ca, csr, "worker-7")
    assert verifies(tmp_path, ca.cert_pem, cert, "-purpose", "sslclient")
    assert not verifies(tmp_path, ca.cert_pem, cert, "-purpose", "sslserver")
    (tmp_path / "client.pem").write_bytes(cert)
    subject = openssl("x509", "-noout", "-subject", "-in", tmp_path / "client.pem")
    assert "worker-7" in subject and "evil" not in subject
    assert tls.common_name(cert) == "worker-7"
    assert "CA:FALSE" in ext(tmp_path, cert, "basicConstraints")
    assert "evil" not in ext(tmp_path, cert, "subjectAltName")
    assert "TLS Web Client Authentication" in ext(tmp_path, cert, "extendedKeyUsage")
    # the certificate is for the CSR's key, whose private half only the requester holds
    cert_key = openssl("x509", "-noout", "-pubkey", "-in", tmp_path / "client.pem")
    assert cert_key == openssl("pkey", "-pubout", "-in", tmp_path / "req.key")


@needs_openssl
@pytest.mark.parametrize(
    "newkey",
    [("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"), ("-newkey", "ed25519")],
    ids=["p384", "ed25519"],
)
def test_other_acceptable_csr_keys(tmp_path: Path, ca: Issued, newkey: tuple[str, ...]) -> None:
    cert = tls.sign_client_csr(ca, openssl_csr(tmp_path, *newkey), "worker-8")
    assert verifies(tmp_path, ca.cert_pem, cert, "-purpose", "sslclient")


@needs_openssl
@pytest.mark.parametrize(
    "newkey",
    [("-newkey", "rsa:1024"), ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521")],
    ids=["rsa1024", "p521"],
)
def test_weak_or_unsupported_csr_keys_are_refused(
    tmp_path: Path, ca: Issued, newkey: tuple[str, ...]
) -> None:
    csr = openssl_csr(tmp_path, *newkey)
    with pytest.raises(TlsError, match="too weak or of an unsupported type"):
        tls.check_csr(csr)
    with pytest.raises(TlsError, match="too weak or of an unsupported type"):
        tls.sign_client_csr(ca, csr, "worker-9")


@pytest.mark.parametrize("where", ["signature", "subject"])
def test_tampered_csr_is_refused(ca: Issued, where: str) -> None:
    pem = tls.make_csr(tls.new_key_pem(), "honest")
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    if where == "signature":
        der[-1] ^= 0x01
    else:
        der[der.index(b"honest")] ^= 0x01
    assert tls.sign_client_csr(ca, pem, "w") and x509.load_der_x509_csr(bytes(der))
    tls.check_csr(pem)
    with pytest.raises(TlsError, match="does not prove possession"):
        tls.check_csr(bytes(der))
    with pytest.raises(TlsError, match="does not prove possession"):
        tls.sign_client_csr(ca, bytes(der), "w")


def test_oversize_csr_is_refused_before_parsing(ca: Issued) -> None:
    csr = tls.make_csr(tls.new_key_pem())
    padded = csr + b"\n" * (MAX_CSR_BYTES - len(csr))
    assert tls.sign_client_csr(ca, padded, "w")  # at the limit: still parsed and signed
    with pytest.raises(TlsError, match=f"over the {MAX_CSR_BYTES}-byte limit"):
        tls.check_csr(padded + b"\n")


@pytest.mark.parametrize(
    "data",
    [
        b"not a csr",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        b"",
    ],
    ids=["garbage", "bad-pem", "empty"],
)
def test_garbage_csrs_are_refused(ca: Issued, data: bytes) -> None:
    with pytest.raises(TlsError, match="not a certificate signing request"):
        tls.check_csr(data)
    with pytest.raises(TlsError, match="not a certificate signing request"):
        tls.sign_client_csr(ca, data, "w")


def test_certificate_instead_of_csr_is_refused(ca: Issued, server: Issued) -> None:
    with pytest.raises(TlsError, match="not a certificate signing request"):
        tls.sign_client_csr(ca, server.cert_pem, "w")


@pytest.mark.parametrize("name", ["", "x" * 65, "tab\there"])
def test_unusable_common_names_are_refused(ca: Issued, name: str) -> None:
    with pytest.raises(TlsError, match="not a usable common name"):
        tls.sign_client_csr(ca, tls.make_csr(tls.new_key_pem()), name)


@needs_openssl
def test_admin_client_cert_holds_its_own_key(tmp_path: Path, ca: Issued) -> None:
    admin = tls.make_client_cert(ca, ADMIN_COMMON_NAME, days=30)
    assert tls.common_name(admin.cert_pem) == ADMIN_COMMON_NAME
    assert verifies(tmp_path, ca.cert_pem, admin.cert_pem, "-purpose", "sslclient")
    (tmp_path / "admin.pem").write_bytes(admin.cert_pem)
    (tmp_path / "admin.key").write_bytes(admin.key_pem)
    assert "BEGIN PRIVATE KEY" in admin.key_pem.decode()  # PKCS8, unencrypted
    assert "ASN1 OID: prime256v1" in openssl(
        "pkey", "-noout", "-text", "-in", tmp_path / "admin.key"
    )
    cert_key = openssl("x509", "-noout", "-pubkey", "-in", tmp_path / "admin.pem")
    assert cert_key == openssl("pkey", "-pubout", "-in", tmp_path / "admin.key")


def test_certificates_never_outlive_their_ca() -> None:
    short = tls.make_ca(days=2)
    cert = x509.load_pem_x509_certificate(tls.make_client_cert(short, "w", days=365).cert_pem)
    ca_cert = x509.load_pem_x509_certificate(short.cert_pem)
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc
    with pytest.raises(TlsError, match="at least one day"):
        tls.make_ca(days=0)


# -- fingerprints --------------------------------------------------------------------------------


@needs_openssl
def test_fingerprint_matches_openssl(tmp_path: Path, ca: Issued, server: Issued) -> None:
    (tmp_path / "chain.pem").write_bytes(server.cert_pem + ca.cert_pem)
    printed = openssl("x509", "-noout", "-fingerprint", "-sha256", "-in", tmp_path / "chain.pem")
    assert printed.lower().startswith("sha256 fingerprint=")
    ours = tls.fingerprint(server.cert_pem + ca.cert_pem)
    assert ours == tls.normalize_fingerprint(printed) == tls.fingerprint(server.cert_pem)
    assert ours != tls.fingerprint(ca.cert_pem)
    colons = printed.split("=", 1)[1].strip()
    assert tls.normalize_fingerprint(colons) == ours
    assert tls.normalize_fingerprint(ours.upper()) == ours
    assert tls.normalize_fingerprint(ours.removeprefix("sha256:")) == ours


@pytest.mark.parametrize(
    "text",
    ["", "sha256:", "sha256:" + "ab" * 31, "ab" * 33, "sha1:" + "ab" * 32, "zz" * 32, "md5"],
)
def test_normalize_fingerprint_rejects_garbage(text: str) -> None:
    with pytest.raises(TlsError, match="not a SHA-256 certificate fingerprint"):
        tls.normalize_fingerprint(text)


def test_non_certificates_get_a_clear_error() -> None:
    for call in (tls.fingerprint, tls.common_name):
        with pytest.raises(TlsError, match="not a PEM certificate"):
            call(b"hello")


# -- files --------------------------------------------------------------------------------------


@posix_only
def test_write_private_is_0600_and_never_overwrites(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        tls.write_private(tmp_path / "k.pem", b"secret")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    with pytest.raises(TlsError, match="already exists"):
        tls.write_private(tmp_path / "k.pem", b"other")
    assert (tmp_path / "k.pem").read_bytes() == b"secret"
    with pytest.raises(TlsError, match="cannot create"):
        tls.write_private(tmp_path / "missing" / "k.pem", b"x")


def test_load_ca_round_trips_and_explains(tmp_path: Path, ca: Issued, server: Issued) -> None:
    tls.write_private(tmp_path / "ca.key", ca.key_pem)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    loaded = tls.load_ca(tmp_path / "ca.pem", tmp_path / "ca.key")
    assert loaded == ca
    (tmp_path / "srv.pem").write_bytes(server.cert_pem)
    (tmp_path / "srv.key").write_bytes(server.key_pem)
    (tmp_path / "other.key").write_bytes(tls.new_key_pem())
    cases = {
        ("ca.pem", "nope.key"): "does not exist",
        ("srv.pem", "srv.key"): "is not a CA certificate",
        ("ca.pem", "other.key"): "does not belong",
        ("ca.key", "ca.key"): "not a PEM certificate",
        ("ca.pem", "ca.pem"): "not an unencrypted PEM private key",
    }
    for (cert, key), message in cases.items():
        with pytest.raises(TlsError, match=message):
            tls.load_ca(tmp_path / cert, tmp_path / key)
    assert issubclass(TlsError, TspaceError)


# -- fetching the CA from a real gRPC TLS server ------------------------------------------------


def grpc_server(
    chain: Issued, extra_pem: bytes = b"", client_ca: bytes | None = None
) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    creds = grpc.ssl_server_credentials(
        [(chain.key_pem, chain.cert_pem + extra_pem)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, port


@pytest.fixture
def coordinator(ca: Issued, server: Issued) -> Iterator[int]:
    srv, port = grpc_server(server, ca.cert_pem)
    yield port
    srv.stop(None)


def health_check(port: int, creds: grpc.ChannelCredentials) -> grpc.StatusCode:
    """The status of one real call; a failed handshake fails it at once with UNAVAILABLE."""
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.RpcError as exc:
            return exc.code()
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK


def test_fetch_ca_returns_the_pinned_ca_that_grpc_then_trusts(
    coordinator: int, ca: Issued, other_ca: Issued
) -> None:
    fetched = tls.fetch_ca(f"127.0.0.1:{coordinator}", tls.fingerprint(ca.cert_pem), timeout=5)
    assert fetched == ca.cert_pem
    trusted = grpc.ssl_channel_credentials(root_certificates=fetched)
    assert health_check(coordinator, trusted) == grpc.StatusCode.OK
    wrong = grpc.ssl_channel_credentials(root_certificates=other_ca.cert_pem)
    assert health_check(coordinator, wrong) == grpc.StatusCode.UNAVAILABLE


def test_fetch_ca_with_a_wrong_pin_names_what_was_presented(
    coordinator: int, ca: Issued, server: Issued, other_ca: Issued
) -> None:
    address = f"127.0.0.1:{coordinator}"
    with pytest.raises(TlsError, match="not the coordinator you pinned") as raised:
        tls.fetch_ca(address, tls.fingerprint(other_ca.cert_pem), timeout=5)
    message = str(raised.value)
    assert address in message and tls.fingerprint(other_ca.cert_pem) in message
    assert tls.fingerprint(ca.cert_pem) in message and tls.fingerprint(server.cert_pem) in message


def test_fetch_ca_refuses_a_pinned_server_cert(coordinator: int, server: Issued) -> None:
    with pytest.raises(TlsError, match="not a CA certificate"):
        tls.fetch_ca(f"127.0.0.1:{coordinator}", tls.fingerprint(server.cert_pem), timeout=5)


def test_fetch_ca_refuses_a_replayed_ca(ca: Issued, other_ca: Issued) -> None:
    # Anyone can send the real CA certificate; only the coordinator has a leaf signed by it.
    impostor = tls.make_server_cert(other_ca, ["coord.example.org"])
    srv, port = grpc_server(impostor, ca.cert_pem)
    try:
        with pytest.raises(TlsError, match="not signed by it"):
            tls.fetch_ca(f"127.0.0.1:{port}", tls.fingerprint(ca.cert_pem), timeout=5)
    finally:
        srv.stop(None)


def test_fetch_ca_reports_unreachable_and_malformed_addresses(ca: Issued) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the attempt: nobody listens there
    pin = tls.fingerprint(ca.cert_pem)
    with pytest.raises(TlsError, match=f"cannot reach 127.0.0.1:{port} over TLS"):
        tls.fetch_ca(f"127.0.0.1:{port}", pin, timeout=2)
    for address in ("127.0.0.1", "::1:443", "host:0", "host:http", ":443", "[::1]"):
        with pytest.raises(TlsError, match="not a coordinator address"):
            tls.fetch_ca(address, pin, timeout=2)
    with pytest.raises(TlsError, match="not a SHA-256"):
        tls.fetch_ca(f"127.0.0.1:{port}", "deadbeef", timeout=2)


def test_fetch_ca_from_a_plain_tcp_server_fails_clearly(ca: Issued) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(TlsError, match="over TLS"):
            tls.fetch_ca(f"127.0.0.1:{port}", tls.fingerprint(ca.cert_pem), timeout=0.2)


def test_fetch_ca_over_ipv6(ca: Issued, server: Issued) -> None:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    creds = grpc.ssl_server_credentials([(server.key_pem, server.cert_pem + ca.cert_pem)])
    try:
        port = srv.add_secure_port("[::1]:0", creds)
    except RuntimeError:
        pytest.skip("no IPv6 loopback here")
    if port == 0:
        pytest.skip("no IPv6 loopback here")
    srv.start()
    try:
        assert tls.fetch_ca(f"[::1]:{port}", tls.fingerprint(ca.cert_pem), timeout=5) == ca.cert_pem
    finally:
        srv.stop(None)


# -- mutual TLS ---------------------------------------------------------------------------------


def test_mutual_tls_admits_only_clients_with_a_cert_from_the_ca(
    ca: Issued, server: Issued, other_ca: Issued
) -> None:
    srv, port = grpc_server(server, ca.cert_pem, client_ca=ca.cert_pem)
    try:
        key = tls.new_key_pem()
        cert = tls.sign_client_csr(ca, tls.make_csr(key), "worker-1")
        ours = grpc.ssl_channel_credentials(ca.cert_pem, private_key=key, certificate_chain=cert)
        assert health_check(port, ours) == grpc.StatusCode.OK
        anonymous = grpc.ssl_channel_credentials(ca.cert_pem)
        assert health_check(port, anonymous) == grpc.StatusCode.UNAVAILABLE
        stranger = tls.make_client_cert(other_ca, "worker-2")
        theirs = grpc.ssl_channel_credentials(
            ca.cert_pem, private_key=stranger.key_pem, certificate_chain=stranger.cert_pem
        )
        assert health_check(port, theirs) == grpc.StatusCode.UNAVAILABLE
        # the CA can still be fetched by pin from a coordinator that requires client certs
        assert tls.fetch_ca(f"127.0.0.1:{port}", tls.fingerprint(ca.cert_pem)) == ca.cert_pem
    finally:
        srv.stop(None)
