"""The coordinator's folder: its config file, admin credential, catalogue and blob store."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from tspace_core import tls
from tspace_core.errors import TspaceError
from tspace_core.fsio import atomic_write_bytes
from tspace_core.rpc import ChannelSecurity

CONFIG_FILE = "coordinator.json"
ADMIN_CREDENTIAL_FILE = "admin.credential"
ADDRESS_FILE = "address"  # `serve` writes the address it bound here, for scripts
ENDPOINT_FILE = "endpoint.json"  # `serve` writes how it can be reached here
TLS_DIR = "tls"
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"  # server.crt holds the chain, CA included
ADMIN_CERT, ADMIN_KEY = "admin.crt", "admin.key"  # the admin's client certificate (mutual TLS)


@dataclass(frozen=True)
class CoordinatorConfig:
    """Settings of one coordinator, stored as JSON in its folder.

    catalogue_url: SQLAlchemy URL of the catalogue (SQLite file in the folder by default).
    listen: address `serve` binds when --listen is not given.
    lease_ttl_s: how long a lease lives without a heartbeat.
    max_attempts: leases a unit may use up before it is marked failed.
    token_ttl_s: default lifetime of an enrolment token.
    max_checkpoint_bytes: the largest checkpoint an upload may announce.
    """

    catalogue_url: str
    listen: str = "127.0.0.1:50051"
    lease_ttl_s: float = 30.0
    max_attempts: int = 3
    token_ttl_s: float = 24 * 3600.0
    max_checkpoint_bytes: int = 4 * 2**30

    @property
    def lease_check_interval_s(self) -> float:
        return max(min(self.lease_ttl_s / 4, 5.0), 0.1)


def hash_secret(secret: str) -> str:
    """Tokens and credentials are stored only as SHA-256 digests."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A 256-bit random secret, URL-safe."""
    return secrets.token_urlsafe(32)


def init_dir(
    folder: Path,
    catalogue_url: str | None = None,
    listen: str | None = None,
    hosts: Sequence[str] = (),
) -> None:
    """Create a coordinator folder: config, admin credential (mode 0600), blob store, catalogue,
    and a CA with a server certificate for `hosts` (plus loopback names) and an admin client
    certificate (private keys mode 0600)."""
    from tspace_core.catalogue import Catalogue

    if (folder / CONFIG_FILE).exists():
        raise TspaceError(
            f"{folder} already holds a coordinator; serve it, or choose another folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    url = catalogue_url or f"sqlite:///{(folder / 'catalogue.db').resolve()}"
    defaults = CoordinatorConfig(catalogue_url=url)
    config = CoordinatorConfig(catalogue_url=url, listen=listen or defaults.listen)
    Catalogue(url).close()
    (folder / "blobs").mkdir(exist_ok=True)
    make_tls_dir(folder / TLS_DIR, hosts)
    credential = folder / ADMIN_CREDENTIAL_FILE
    credential.touch(mode=0o600, exist_ok=False)
    credential.write_text(new_secret() + "\n")
    atomic_write_bytes(folder / CONFIG_FILE, json.dumps(asdict(config), indent=2).encode())


def make_tls_dir(tls_dir: Path, hosts: Sequence[str]) -> None:
    """A new CA, a server certificate for `hosts` and the admin's client certificate."""
    if tls_dir.exists() and any(tls_dir.iterdir()):
        raise TspaceError(f"{tls_dir} is not empty; refusing to replace its certificates")
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = tls.make_ca()
    server = tls.make_server_cert(ca, hosts)
    admin = tls.make_client_cert(ca, tls.ADMIN_COMMON_NAME)
    tls.write_private(tls_dir / CA_KEY, ca.key_pem)
    tls.write_private(tls_dir / SERVER_KEY, server.key_pem)
    tls.write_private(tls_dir / ADMIN_KEY, admin.key_pem)
    atomic_write_bytes(tls_dir / CA_CERT, ca.cert_pem)
    atomic_write_bytes(tls_dir / SERVER_CERT, server.cert_pem + ca.cert_pem)
    atomic_write_bytes(tls_dir / ADMIN_CERT, admin.cert_pem)


@dataclass(frozen=True)
class ServerTls:
    """The server's TLS identity. `server` holds its key and its certificate chain (the server
    certificate followed by the CA's); `ca` signs client certificates at registration. With
    `client_certs`, every call on the main port needs a client certificate from this CA, and
    registration moves to a port of its own (TLS without client certificates)."""

    server: tls.Issued
    ca: tls.Issued
    client_certs: bool = False

    def credentials(self, client_certs: bool) -> grpc.ServerCredentials:
        # gRPC checks client certificates only with both root certificates and
        # require_client_auth; root certificates alone are silently ignored.
        return grpc.ssl_server_credentials(
            [(self.server.key_pem, self.server.cert_pem)],
            root_certificates=self.ca.cert_pem if client_certs else None,
            require_client_auth=client_certs,
        )


def server_tls(folder: Path, client_certs: bool) -> ServerTls | None:
    """The folder's TLS identity for serving, or None when it has no certificates."""
    tls_dir = folder / TLS_DIR
    if not (tls_dir / SERVER_CERT).exists():
        return None
    ca = tls.load_ca(tls_dir / CA_CERT, tls_dir / CA_KEY)
    server = tls.Issued(_read(tls_dir / SERVER_CERT), _read(tls_dir / SERVER_KEY))
    return ServerTls(server=server, ca=ca, client_certs=client_certs)


@dataclass(frozen=True)
class Endpoint:
    """How a running coordinator can be reached, as `serve` records it in its folder.

    address: host:port of the main port. tls: whether it serves TLS. client_certs: whether
    every call there needs a client certificate (mutual TLS). enrol_address: where workers
    register under mutual TLS.
    """

    address: str
    tls: bool = False
    client_certs: bool = False
    enrol_address: str | None = None


def write_endpoint(folder: Path, endpoint: Endpoint) -> None:
    atomic_write_bytes(
        folder / ENDPOINT_FILE, json.dumps(asdict(endpoint), indent=2).encode() + b"\n"
    )


def read_endpoint(folder: Path) -> Endpoint | None:
    """The endpoint `serve` recorded, or None when it has not run here."""
    path = folder / ENDPOINT_FILE
    try:
        return Endpoint(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise TspaceError(f"{path} is damaged ({exc}); restart `tspace-coord serve`") from None


def admin_security(folder: Path, endpoint: Endpoint) -> ChannelSecurity | None:
    """How the admin reaches the folder's coordinator: its CA, and under mutual TLS the
    admin's client certificate. A wildcard address is reached through loopback."""
    if not endpoint.tls:
        return None
    tls_dir = folder / TLS_DIR
    key, cert = None, None
    if endpoint.client_certs:
        key, cert = _read(tls_dir / ADMIN_KEY), _read(tls_dir / ADMIN_CERT)
    return ChannelSecurity(_read(tls_dir / CA_CERT), key, cert, server_name="localhost")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TspaceError(f"cannot read {path}: {exc.strerror}") from None


def load_config(folder: Path) -> CoordinatorConfig:
    path = folder / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
        return CoordinatorConfig(**raw)
    except FileNotFoundError:
        raise TspaceError(
            f"{folder} is not a coordinator folder; create one with `tspace-coord init {folder}`"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise TspaceError(f"{path} is not a valid coordinator config: {exc}") from None


def read_admin_credential(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise TspaceError(f"cannot read the admin credential {path}: {exc}") from None
