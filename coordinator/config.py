"""The coordinator's folder: its config file, admin credential, catalogue and blob store."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from tspace_core.errors import TspaceError
from tspace_core.fsio import atomic_write_bytes

CONFIG_FILE = "coordinator.json"
ADMIN_CREDENTIAL_FILE = "admin.credential"


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


def init_dir(folder: Path, catalogue_url: str | None = None, listen: str | None = None) -> None:
    """Create a coordinator folder: config, admin credential (mode 0600), blob store, catalogue."""
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
    credential = folder / ADMIN_CREDENTIAL_FILE
    credential.touch(mode=0o600, exist_ok=False)
    credential.write_text(new_secret() + "\n")
    atomic_write_bytes(folder / CONFIG_FILE, json.dumps(asdict(config), indent=2).encode())


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
