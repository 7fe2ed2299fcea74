"""The worker's identity: its Ed25519 key (mode 0600), the credential a coordinator gave it, and
how it reaches that coordinator (the pinned CA, and a client certificate under mutual TLS)."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tspace_core import tls
from tspace_core.errors import TspaceError
from tspace_core.fsio import atomic_write_bytes
from tspace_core.proto.tspace.v1 import worker_pb2
from tspace_core.rpc import ChannelSecurity
from tspace_core.signing import key_id, load_or_create_key, public_key_bytes
from worker.client import Session, wait_for_coordinator

KEY_FILE = "worker.key"
IDENTITY_FILE = "identity.json"
CA_FILE = "ca.crt"  # the coordinator's CA, pinned at join
TLS_KEY_FILE = "tls.key"  # the key of the client certificate (mode 0600)
TLS_CERT_FILE = "tls.crt"  # the client certificate the coordinator issued


@dataclass(frozen=True)
class Identity:
    coordinator: str
    worker_id: str
    credential: str
    site: str
    key_id: str
    tls: bool = False  # the coordinator is reached over TLS, its CA pinned in CA_FILE
    client_cert: bool = False  # the coordinator issued a client certificate (TLS_CERT_FILE)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def security(state_dir: Path, identity: Identity) -> ChannelSecurity | None:
    """How this worker's saved identity reaches its coordinator: None for plaintext."""
    if not identity.tls:
        return None
    try:
        ca = (state_dir / CA_FILE).read_bytes()
        if not identity.client_cert:
            return ChannelSecurity(ca)
        key, cert = (
            (state_dir / TLS_KEY_FILE).read_bytes(),
            (state_dir / TLS_CERT_FILE).read_bytes(),
        )
    except OSError as exc:
        raise TspaceError(
            f"{state_dir} lacks {Path(exc.filename or '?').name}, which this worker's identity "
            "needs; join again with a new token"
        ) from None
    return ChannelSecurity(ca, key, cert)


def _tls_key(state_dir: Path) -> bytes:
    """The client certificate's key, made on first use."""
    path = state_dir / TLS_KEY_FILE
    if not path.exists():
        tls.write_private(path, tls.new_key_pem())
    return path.read_bytes()


def join(
    state_dir: Path,
    address: str,
    token: str | None,
    device: str,
    ca_pem: bytes | None = None,
    enrol_address: str | None = None,
) -> tuple[Identity, Ed25519PrivateKey, ChannelSecurity | None]:
    """Load this worker's identity for `address`, or register its key with the join token:
    over TLS pinned to `ca_pem` (plaintext without it), at `enrol_address` when the coordinator
    registers workers on a port of its own (mutual TLS)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    key, _ = load_or_create_key(state_dir / KEY_FILE)
    saved = state_dir / IDENTITY_FILE
    if saved.exists():
        identity = Identity(**json.loads(saved.read_text()))
        if identity.coordinator == address and identity.key_id == key_id(public_key_bytes(key)):
            return identity, key, security(state_dir, identity)
    if not token:
        raise TspaceError(
            f"this worker has not joined {address} yet; pass the join token from "
            "`tspace-coord tokens create --site NAME` with --token"
        )
    csr = b""
    if ca_pem is not None:
        csr = tls.make_csr(_tls_key(state_dir))
    register_at = enrol_address or address
    session = Session(register_at, security=None if ca_pem is None else ChannelSecurity(ca_pem))
    request = worker_pb2.RegisterRequest(
        token=token,
        public_key=public_key_bytes(key),
        device=device,
        hostname=socket.gethostname()[:256],
        csr=csr,
    )
    try:
        hint = (
            "register (if it serves TLS, pin its CA with --ca or --ca-fingerprint)"
            if ca_pem is None
            else "register (if it requires client certificates, register on its "
            "registration port with --enrol HOST:PORT)"
            if enrol_address is None
            else "register"
        )
        response = wait_for_coordinator(lambda: session.call("Register", request), hint)
    finally:
        session.close()
    if ca_pem is not None:
        atomic_write_bytes(state_dir / CA_FILE, ca_pem)
        if response.client_certificate:
            atomic_write_bytes(state_dir / TLS_CERT_FILE, bytes(response.client_certificate))
    identity = Identity(
        address,
        response.worker_id,
        response.credential,
        response.site,
        response.key_id,
        tls=ca_pem is not None,
        client_cert=bool(response.client_certificate),
    )
    _write_private(saved, json.dumps(asdict(identity)))
    return identity, key, security(state_dir, identity)
