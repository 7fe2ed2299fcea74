"""Catalogue operations on join tokens, workers and the event log; each runs in the caller's
transaction."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from tspace_core.catalogue.errors import CatalogueError
from tspace_core.catalogue.models import Event, Token, Worker
from tspace_core.catalogue.records import WORKER_ACTIVE, EventRecord, WorkerRecord
from tspace_core.catalogue.rows import worker_records, worker_row


def add_token(session: Session, token_hash: str, site: str, expires_at: float, now: float) -> None:
    if session.get(Token, token_hash) is not None:
        raise CatalogueError("already_exists", "this join token is already enrolled")
    session.add(Token(token_hash=token_hash, site=site, expires_at=expires_at, created_at=now))


def register_worker(
    session: Session,
    token_hash: str,
    public_key: bytes,
    key_id: str,
    credential_hash: str,
    device: str,
    hostname: str,
    now: float,
) -> WorkerRecord:
    """Consume the join token and record the worker's key; the worker inherits the token's site."""
    token = session.scalar(select(Token).where(Token.token_hash == token_hash).with_for_update())
    if token is None:
        raise CatalogueError("unauthenticated", "unknown join token")
    if token.revoked_at is not None:
        raise CatalogueError("unauthenticated", "join token revoked")
    if token.used_at is not None:
        raise CatalogueError("unauthenticated", "join token already used")
    if now >= token.expires_at:
        raise CatalogueError("unauthenticated", "join token expired")
    if session.scalar(select(Worker.worker_id).where(Worker.key_id == key_id)) is not None:
        raise CatalogueError(
            "already_exists", f"a worker with key id {key_id!r} is already registered"
        )
    if session.scalar(select(Worker.worker_id).where(Worker.credential_hash == credential_hash)):
        raise CatalogueError("already_exists", "this session credential is already in use")
    worker = Worker(
        worker_id="w-" + secrets.token_hex(6),
        site=token.site,
        public_key=public_key,
        key_id=key_id,
        credential_hash=credential_hash,
        status=WORKER_ACTIVE,
        device=device,
        hostname=hostname,
        registered_at=now,
        last_seen=now,
    )
    session.add(worker)
    session.flush()  # the token's foreign key needs the worker row
    token.used_at = now
    token.worker_id = worker.worker_id
    return worker_records(session, [worker])[0]


def worker_by_credential(session: Session, credential_hash: str) -> WorkerRecord | None:
    worker = session.scalar(select(Worker).where(Worker.credential_hash == credential_hash))
    return None if worker is None else worker_records(session, [worker])[0]


def touch_worker(session: Session, worker_id: str, now: float) -> None:
    worker_row(session, worker_id).last_seen = now


def list_workers(session: Session) -> list[WorkerRecord]:
    workers = session.scalars(select(Worker).order_by(Worker.registered_at, Worker.worker_id))
    return worker_records(session, workers)


def get_worker(session: Session, worker_id: str) -> WorkerRecord:
    return worker_records(session, [worker_row(session, worker_id)])[0]


def add_event(
    session: Session,
    kind: str,
    message: str,
    now: float,
    job: str | None = None,
    unit: int | None = None,
    worker_id: str | None = None,
) -> None:
    session.add(
        Event(time=now, kind=kind, job=job, unit=unit, worker_id=worker_id, message=message)
    )


def events(session: Session, limit: int = 50) -> list[EventRecord]:
    if limit < 0:
        raise CatalogueError("invalid_argument", f"events limit must be >= 0, got {limit}")
    rows = session.scalars(select(Event).order_by(Event.id.desc()).limit(limit))
    return [
        EventRecord(
            time=e.time,
            kind=e.kind,
            message=e.message,
            job=e.job,
            unit=e.unit,
            worker_id=e.worker_id,
        )
        for e in rows
    ]
