"""The worker's identity: its Ed25519 key (mode 0600) and the credential a coordinator gave it."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tspace_core.errors import TspaceError
from tspace_core.proto.tspace.v1 import worker_pb2
from tspace_core.signing import key_id, load_or_create_key, public_key_bytes
from worker.client import Session, wait_for_coordinator

KEY_FILE = "worker.key"
IDENTITY_FILE = "identity.json"


@dataclass(frozen=True)
class Identity:
    coordinator: str
    worker_id: str
    credential: str
    site: str
    key_id: str


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def join(
    state_dir: Path, address: str, token: str | None, device: str
) -> tuple[Identity, Ed25519PrivateKey]:
    """Load this worker's identity for `address`, or register its key with the join token."""
    state_dir.mkdir(parents=True, exist_ok=True)
    key, _ = load_or_create_key(state_dir / KEY_FILE)
    saved = state_dir / IDENTITY_FILE
    if saved.exists():
        identity = Identity(**json.loads(saved.read_text()))
        if identity.coordinator == address and identity.key_id == key_id(public_key_bytes(key)):
            return identity, key
    if not token:
        raise TspaceError(
            f"this worker has not joined {address} yet; pass the join token from "
            "`tspace-coord tokens create --site NAME` with --token"
        )
    session = Session(address)
    request = worker_pb2.RegisterRequest(
        token=token, public_key=public_key_bytes(key), device=device, hostname=socket.gethostname()
    )
    try:
        response = wait_for_coordinator(lambda: session.call("Register", request), "register")
    finally:
        session.close()
    identity = Identity(
        address, response.worker_id, response.credential, response.site, response.key_id
    )
    _write_private(saved, json.dumps(asdict(identity)))
    return identity, key
