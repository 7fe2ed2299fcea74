"""Checking a catalogued checkpoint against its file: signer, signature, statement, digest.

Used before sampling (the first problem refuses the member) and by the operator's
`checkpoints verify` (every problem is reported)."""

from __future__ import annotations

from pathlib import Path

from tspace_core.catalogue.records import CheckpointRecord
from tspace_core.errors import SignatureError
from tspace_core.fsio import sha256_file
from tspace_core.signing import Statement, verify


def checkpoint_problems(record: CheckpointRecord, path: Path) -> list[str]:
    """Every reason not to trust `record` with its file at `path`; an empty list means the
    file is there and digest, size, signature, statement and signer all check out."""
    problems = []
    if not record.trusted:
        problems.append(f"signed by a revoked worker ({record.worker_id}); retrain the unit")
    try:
        statement = Statement.from_bytes(record.statement)
        verify(record.public_key, record.statement, record.signature)
    except SignatureError as exc:
        problems.append(f"the signature does not verify ({exc})")
    else:
        signed = (statement.sha256, statement.size, statement.job, statement.unit, statement.step)
        recorded = (record.sha256, record.size, record.job, record.unit, record.step)
        if signed != recorded or statement.key_id != record.key_id:
            problems.append("the signed statement is for another checkpoint")
    if not path.is_file():
        problems.append(f"checkpoint {record.sha256[:12]} is missing from the store")
        return problems
    size = path.stat().st_size
    digest = sha256_file(path)
    if digest != record.sha256 or size != record.size:
        problems.append(
            f"checkpoint digest {digest[:12]} ({size} bytes) differs from the recorded "
            f"{record.sha256[:12]} ({record.size} bytes); the file is corrupt"
        )
    return problems
