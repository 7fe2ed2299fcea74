"""Ed25519 worker keys and signed checkpoint statements that anyone can check with OpenSSL."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tspace_core.errors import SignatureError
from tspace_core.fsio import fsync_dir

STATEMENT_FORMAT = "tspace-statement/1"
MAX_STATEMENT_BYTES = 4096
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_MAX_INT = 2**63 - 1  # statements land in SQL BIGINT columns
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Write `key` as unencrypted PKCS8 PEM, mode 0600 from creation; never overwrite a file."""
    path = Path(path)
    if path.exists():
        raise SignatureError(f"{path} already exists; refusing to overwrite a key (move it away)")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # 0o600 at open: the key is never readable by others, not even for an instant.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        # link() fails if `path` appeared meanwhile, where replace() would silently clobber it.
        os.link(tmp, path)
    except FileExistsError:
        raise SignatureError(
            f"{path} already exists; refusing to overwrite a key (move it away)"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an Ed25519 PKCS8 PEM key, refusing files that others could read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise SignatureError(
            f"no private key at {path}; create one or pass the right path"
        ) from None
    except OSError as e:
        raise SignatureError(f"cannot read private key {path}: {e.strerror}") from None
    if os.name == "posix" and mode & 0o077:
        raise SignatureError(
            f"private key {path} is readable by other users (mode {mode & 0o777:o}); "
            f"run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SignatureError(f"private key {path} is encrypted; store it unencrypted") from None
    except ValueError:
        raise SignatureError(f"{path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_or_create_key(path: str | os.PathLike[str]) -> tuple[Ed25519PrivateKey, bool]:
    """The key at `path`, made and saved first if there is none; the bool says it was made."""
    if Path(path).exists():
        return load_private_key(path), False
    key = generate_key()
    save_private_key(key, path)
    return key, True


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key (RFC 8032 encoding)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_pem(public_key: bytes) -> bytes:
    """SubjectPublicKeyInfo PEM of a raw public key, for `openssl pkeyutl -verify -pubin`."""
    return _public_key(public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(public_key: bytes) -> str:
    """Short, stable name of a public key: the first 16 hex chars of its SHA-256."""
    _check_len("public key", public_key, PUBLIC_KEY_BYTES)
    return hashlib.sha256(public_key).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """A 64-byte pure Ed25519 signature (no prehash: what `openssl pkeyutl -rawin` makes)."""
    return key.sign(data)


def verify(public_key: bytes, data: bytes, signature: bytes) -> None:
    """Return if `signature` is `public_key`'s over `data`; raise SignatureError otherwise."""
    _check_len("signature", signature, SIGNATURE_BYTES)
    try:
        _public_key(public_key).verify(signature, data)
    except InvalidSignature:
        raise SignatureError(
            f"signature does not verify with key {key_id(public_key)}: "
            "the statement or signature was altered, or another key signed it"
        ) from None


@dataclass(frozen=True)
class Statement:
    """What a worker signs about one checkpoint; its canonical JSON bytes are what is signed.

    job, job_hash: the job name and the hash of its resolved spec.
    unit, attempt: the work unit (>= 0) and the lease attempt that trained it (>= 1).
    step, final: training steps done (>= 0) and whether the unit is finished.
    sha256, size: digest (64 lowercase hex) and byte length of the checkpoint file.
    key_id: the signer's key id (see key_id()); time: Unix seconds when signed.
    """

    job: str
    job_hash: str
    unit: int
    attempt: int
    step: int
    final: bool
    sha256: str
    size: int
    key_id: str
    time: float
    format: str = STATEMENT_FORMAT

    def __post_init__(self) -> None:
        # An int time would serialise as "17" and a float as "17.0": one spelling only.
        if type(self.time) is int:
            object.__setattr__(self, "time", float(self.time))
        _check_fields(self)

    def to_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no spaces, ASCII only."""
        text = json.dumps(
            dataclasses.asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        )
        return text.encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Statement:
        """Parse signed bytes, accepting only the canonical encoding of a valid statement."""
        if len(data) > MAX_STATEMENT_BYTES:
            raise SignatureError(f"statement is {len(data)} bytes; at most {MAX_STATEMENT_BYTES}")
        try:
            obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise SignatureError(f"statement is not valid UTF-8 JSON: {e}") from None
        if not isinstance(obj, dict):
            raise SignatureError("statement must be a JSON object")
        expected = {f.name for f in dataclasses.fields(cls)}
        if set(obj) != expected:
            missing, extra = sorted(expected - set(obj)), sorted(set(obj) - expected)
            raise SignatureError(f"statement keys wrong: missing {missing}, unexpected {extra}")
        if type(obj["time"]) is not float:
            raise SignatureError("statement field 'time' must be a JSON float (Unix seconds)")
        statement = cls(**obj)
        if statement.to_bytes() != data:
            raise SignatureError("statement is not in canonical form (sorted keys, no spaces)")
        return statement


_TYPES: dict[str, tuple[type, ...]] = {
    "job": (str,),
    "job_hash": (str,),
    "unit": (int,),
    "attempt": (int,),
    "step": (int,),
    "final": (bool,),
    "sha256": (str,),
    "size": (int,),
    "key_id": (str,),
    "time": (float,),
    "format": (str,),
}
_MINIMUM = {"unit": 0, "attempt": 1, "step": 0, "size": 0}


def _check_fields(s: Statement) -> None:
    for name, types in _TYPES.items():
        value: Any = getattr(s, name)
        # type() not isinstance(): bool is an int subclass and must not pass as one.
        if type(value) not in types:
            raise SignatureError(
                f"statement field {name!r} must be {types[0].__name__}, got {type(value).__name__}"
            )
    for name, low in _MINIMUM.items():
        if not low <= getattr(s, name) <= _MAX_INT:
            raise SignatureError(f"statement field {name!r} must be in [{low}, {_MAX_INT}]")
    if not s.job:
        raise SignatureError("statement field 'job' must not be empty")
    if not _SHA256.fullmatch(s.sha256):
        raise SignatureError("statement field 'sha256' must be 64 lowercase hex characters")
    if not _KEY_ID.fullmatch(s.key_id):
        raise SignatureError("statement field 'key_id' must be 16 lowercase hex characters")
    if not math.isfinite(s.time) or s.time < 0:
        raise SignatureError("statement field 'time' must be finite Unix seconds >= 0")
    if s.format != STATEMENT_FORMAT:
        raise SignatureError(f"statement format is {s.format!r}; expected {STATEMENT_FORMAT!r}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a statement")


def _check_len(what: str, value: bytes, n: int) -> None:
    if not isinstance(value, bytes) or len(value) != n:
        size = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise SignatureError(f"{what} must be {n} bytes, got {size}")


def _public_key(raw: bytes) -> Ed25519PublicKey:
    _check_len("public key", raw, PUBLIC_KEY_BYTES)
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise SignatureError("public key is not a valid Ed25519 key") from None
