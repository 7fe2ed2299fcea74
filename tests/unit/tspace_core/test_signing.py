"""Tests for tspace_core.signing: keys on disk, canonical statements, and OpenSSL as the oracle."""

import dataclasses
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from tspace_core.errors import SignatureError, TspaceError
from tspace_core.signing import (
    Statement,
    generate_key,
    key_id,
    load_or_create_key,
    load_private_key,
    public_key_bytes,
    public_key_pem,
    save_private_key,
    sign,
    verify,
)

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl CLI is not installed")
posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX-only")


def statement(**changes: object) -> Statement:
    fields: dict[str, object] = {
        "job": "digits",
        "job_hash": "ab" * 32,
        "unit": 3,
        "attempt": 1,
        "step": 500,
        "final": True,
        "sha256": "0123456789abcdef" * 4,
        "size": 123456,
        "key_id": "fedcba9876543210",
        "time": 1700000000.25,
    }
    fields.update(changes)
    return Statement(**fields)  # type: ignore[arg-type]


def openssl(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *map(str, args)], capture_output=True, timeout=30)


def write_stmt(tmp_path: Path) -> tuple[Path, bytes]:
    data = statement().to_bytes()
    path = tmp_path / "stmt.json"
    path.write_bytes(data)
    return path, data


# -- OpenSSL as the independent oracle --------------------------------------------------------


@needs_openssl
def test_our_signature_verifies_with_openssl(tmp_path: Path) -> None:
    key = generate_key()
    stmt, data = write_stmt(tmp_path)
    (tmp_path / "sig.bin").write_bytes(sign(key, data))
    (tmp_path / "pub.pem").write_bytes(public_key_pem(public_key_bytes(key)))
    args: list[str | Path] = [
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        tmp_path / "pub.pem",
        "-rawin",
    ]
    ok = openssl(*args, "-in", stmt, "-sigfile", tmp_path / "sig.bin")
    assert ok.returncode == 0, ok.stderr
    # The oracle must be able to say no: one flipped byte and it refuses.
    tampered = data.replace(b'"unit":3', b'"unit":4')
    assert tampered != data
    stmt.write_bytes(tampered)
    bad = openssl(*args, "-in", stmt, "-sigfile", tmp_path / "sig.bin")
    assert bad.returncode != 0


@needs_openssl
def test_openssl_key_and_signature_accepted_by_us(tmp_path: Path) -> None:
    pem = tmp_path / "k.pem"
    assert openssl("genpkey", "-algorithm", "ed25519", "-out", pem).returncode == 0
    pem.chmod(0o600)
    key = load_private_key(pem)
    stmt, data = write_stmt(tmp_path)
    made = openssl("pkeyutl", "-sign", "-inkey", pem, "-rawin", "-in", stmt, "-out", tmp_path / "s")
    assert made.returncode == 0, made.stderr
    signature = (tmp_path / "s").read_bytes()
    verify(public_key_bytes(key), data, signature)
    # Ed25519 is deterministic (RFC 8032): OpenSSL and we must produce the same bytes.
    assert sign(key, data) == signature
    with pytest.raises(SignatureError, match="does not verify"):
        verify(public_key_bytes(key), data + b" ", signature)


@needs_openssl
def test_our_private_key_is_readable_by_openssl(tmp_path: Path) -> None:
    key = generate_key()
    save_private_key(key, tmp_path / "key.pem")
    out = openssl("pkey", "-in", tmp_path / "key.pem", "-pubout")
    assert out.returncode == 0, out.stderr
    assert out.stdout == public_key_pem(public_key_bytes(key))


# -- signatures ---------------------------------------------------------------------------------


def test_tampering_and_wrong_key_are_refused() -> None:
    key, other = generate_key(), generate_key()
    data = statement().to_bytes()
    signature = sign(key, data)
    public = public_key_bytes(key)
    verify(public, data, signature)
    assert len(signature) == 64 and len(public) == 32
    for i in (0, len(data) // 2, len(data) - 1):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(SignatureError, match="does not verify"):
            verify(public, bytes(tampered), signature)
    for i in (0, 31, 63):
        bad_sig = bytearray(signature)
        bad_sig[i] ^= 0x80
        with pytest.raises(SignatureError, match="does not verify"):
            verify(public, data, bytes(bad_sig))
    with pytest.raises(SignatureError, match="does not verify"):
        verify(public_key_bytes(other), data, signature)


def test_wrong_lengths_are_refused() -> None:
    key = generate_key()
    data = b"x"
    signature, public = sign(key, data), public_key_bytes(key)
    with pytest.raises(SignatureError, match="signature must be 64 bytes"):
        verify(public, data, signature[:-1])
    with pytest.raises(SignatureError, match="public key must be 32 bytes"):
        verify(public + b"\0", data, signature)
    with pytest.raises(SignatureError):
        key_id(public[:16])


def test_key_id_is_sha256_prefix() -> None:
    import hashlib

    public = public_key_bytes(generate_key())
    assert key_id(public) == hashlib.sha256(public).hexdigest()[:16]
    assert public_key_bytes(generate_key().public_key()) != public


# -- statements ---------------------------------------------------------------------------------


def test_statement_round_trip_is_canonical_json() -> None:
    s = statement(job="ünïcode")
    data = s.to_bytes()
    assert Statement.from_bytes(data) == s
    obj = json.loads(data)
    assert obj["format"] == "tspace-statement/1"
    assert list(obj) == sorted(obj)
    assert b" " not in data and data.isascii()
    assert data == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def test_int_time_has_one_spelling() -> None:
    assert statement(time=17).to_bytes() == statement(time=17.0).to_bytes()
    with pytest.raises(SignatureError, match="time"):
        Statement.from_bytes(statement(time=17.0).to_bytes().replace(b"17.0", b"17"))


def canon(obj: dict[str, Any], **kw: Any) -> bytes:
    return json.dumps(obj, **{"sort_keys": True, "separators": (",", ":"), **kw}).encode()


NOT_CANONICAL: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "spaces": lambda o: json.dumps(o, sort_keys=True).encode(),
    "order": lambda o: json.dumps(dict(reversed(o.items())), separators=(",", ":")).encode(),
    "extra-key": lambda o: canon({**o, "extra": 1}),
    "missing-key": lambda o: canon({k: v for k, v in o.items() if k != "size"}),
    "bool-for-int": lambda o: canon({**o, "unit": True}),
    "int-for-bool": lambda o: canon({**o, "final": 1}),
    "str-for-int": lambda o: canon({**o, "step": "500"}),
    "uppercase-hex": lambda o: canon({**o, "sha256": o["sha256"].upper()}),
    "short-hex": lambda o: canon({**o, "sha256": o["sha256"][:-1]}),
    "negative-size": lambda o: canon({**o, "size": -1}),
    "attempt-0": lambda o: canon({**o, "attempt": 0}),
    "format": lambda o: canon({**o, "format": "tspace-statement/2"}),
    "nan-time": lambda o: canon({**o, "time": float("nan")}),
    "non-ascii": lambda o: canon(o, ensure_ascii=False),
    "newline": lambda o: canon(o) + b"\n",
    "duplicate-key": lambda o: canon(o).replace(b'"job"', b'"job":"x","job"', 1),
    "not-object": lambda o: b"[1,2]",
    "not-utf8": lambda o: b"\xff\xfe",
    "too-big": lambda o: canon({**o, "job": "x" * 5000}),
}


@pytest.mark.parametrize("name", NOT_CANONICAL)
def test_non_canonical_or_invalid_statements_rejected(name: str) -> None:
    good = statement(job="ünï").to_bytes()
    assert canon(json.loads(good)) == good  # the helper itself is canonical
    data = NOT_CANONICAL[name](json.loads(good))
    assert data != good
    with pytest.raises(SignatureError):
        Statement.from_bytes(data)


def test_invalid_statement_cannot_be_built() -> None:
    with pytest.raises(SignatureError, match="'unit'"):
        statement(unit=-1)
    with pytest.raises(SignatureError, match="'step'"):
        statement(step=True)
    with pytest.raises(SignatureError, match="'key_id'"):
        statement(key_id="XYZ")
    with pytest.raises(SignatureError, match="'size'"):
        statement(size=2**63)
    assert dataclasses.replace(statement(), step=0).step == 0


# -- keys on disk -------------------------------------------------------------------------------


@posix_only
def test_saved_key_is_0600_and_loads(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "keys" / "worker.pem"
    save_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_bytes(load_private_key(path)) == public_key_bytes(key)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in path.parent.iterdir()) == ["worker.pem"]


def test_overwrite_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    save_private_key(generate_key(), path)
    before = path.read_bytes()
    with pytest.raises(SignatureError, match="refusing to overwrite"):
        save_private_key(generate_key(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]


@posix_only
def test_group_readable_key_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    save_private_key(generate_key(), path)
    path.chmod(0o644)
    with pytest.raises(TspaceError, match=f"chmod 600 {path}"):
        load_private_key(path)


def test_bad_key_files_refused(tmp_path: Path) -> None:
    with pytest.raises(TspaceError, match="no private key"):
        load_private_key(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    with pytest.raises(TspaceError, match="not a PEM private key"):
        load_private_key(junk)
    ec = tmp_path / "ec.pem"
    ec.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ec.chmod(0o600)
    with pytest.raises(TspaceError, match="not an Ed25519 key"):
        load_private_key(ec)


def test_load_or_create_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    key, created = load_or_create_key(path)
    again, created_again = load_or_create_key(path)
    assert created and not created_again
    assert public_key_bytes(key) == public_key_bytes(again)
