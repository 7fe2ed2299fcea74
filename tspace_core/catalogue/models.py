"""SQLAlchemy models of the catalogue: portable types only, so one schema serves SQLite and
PostgreSQL. Changing anything here needs a new migration under migrations/versions/."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Double,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so migrations can name (and later drop) every constraint.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # Times are Unix seconds and must keep sub-second precision: DOUBLE, never a 4-byte REAL.
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        float: Double(),
        bytes: LargeBinary(),
        dict[str, Any]: JSON(),
        list[int]: JSON(),
        list[str]: JSON(),
    }


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    job_hash: Mapped[str]
    spec_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str]
    total_steps: Mapped[int]
    created_at: Mapped[float]


class Shard(Base):
    __tablename__ = "shards"
    __table_args__ = (UniqueConstraint("job_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    position: Mapped[int]
    name: Mapped[str]
    sha256: Mapped[str]
    size: Mapped[int] = mapped_column(BigInteger())
    count: Mapped[int]


class Unit(Base):
    __tablename__ = "units"
    __table_args__ = (UniqueConstraint("job_id", "unit"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    unit: Mapped[int]
    timesteps: Mapped[list[int]]
    status: Mapped[str] = mapped_column(index=True)
    attempts: Mapped[int]
    last_error: Mapped[str] = mapped_column(Text)


class Worker(Base):
    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(primary_key=True)
    site: Mapped[str]
    public_key: Mapped[bytes]
    key_id: Mapped[str] = mapped_column(unique=True)
    credential_hash: Mapped[str] = mapped_column(unique=True)
    status: Mapped[str]
    device: Mapped[str]
    hostname: Mapped[str]
    registered_at: Mapped[float]
    last_seen: Mapped[float]


class Token(Base):
    """A one-time join token; only its hash is stored."""

    __tablename__ = "tokens"

    token_hash: Mapped[str] = mapped_column(primary_key=True)
    site: Mapped[str]
    expires_at: Mapped[float]
    used_at: Mapped[float | None]
    created_at: Mapped[float | None]  # unknown for tokens enrolled before schema 0002
    revoked_at: Mapped[float | None]
    worker_id: Mapped[str | None] = mapped_column(ForeignKey("workers.worker_id"))


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_unit_id_step", "unit_id", "step"),)

    sha256: Mapped[str] = mapped_column(primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger())
    unit_id: Mapped[int] = mapped_column(ForeignKey("units.id"))  # the unit row names the job
    step: Mapped[int]
    final: Mapped[bool]
    attempt: Mapped[int]
    statement: Mapped[bytes]
    signature: Mapped[bytes]
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.worker_id"), index=True)
    metrics: Mapped[dict[str, Any]]
    shards_seen: Mapped[list[str]]
    created_at: Mapped[float]
    verified: Mapped[bool]
    # Set when an operator resets the unit to an earlier checkpoint, a revocation takes its line
    # out of use, or its blob is found corrupt: never resumed from again.
    discarded: Mapped[bool] = mapped_column(default=False, server_default=false())
    # Its blob failed its digest on the coordinator's disk (it is discarded too). Unlike a plain
    # discard, only the bytes received and verified again clear it: a signed header does not.
    corrupt: Mapped[bool] = mapped_column(default=False, server_default=false())


class Lease(Base):
    __tablename__ = "leases"

    lease_id: Mapped[str] = mapped_column(primary_key=True)
    unit_id: Mapped[int] = mapped_column(ForeignKey("units.id"), index=True)
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.worker_id"), index=True)
    attempt: Mapped[int]
    expires_at: Mapped[float]
    status: Mapped[str] = mapped_column(index=True)
    step: Mapped[int]
    loss: Mapped[float]
    images_per_s: Mapped[float]
    updated_at: Mapped[float]
    # The final checkpoint a completed lease delivered: the unit's member of the job's ensemble.
    checkpoint_sha256: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.sha256"))


class Ensemble(Base):
    __tablename__ = "ensembles"

    name: Mapped[str] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[float]


class EnsembleMember(Base):
    __tablename__ = "ensemble_members"

    ensemble: Mapped[str] = mapped_column(ForeignKey("ensembles.name"), primary_key=True)
    unit_id: Mapped[int] = mapped_column(ForeignKey("units.id"), primary_key=True)
    checkpoint_sha256: Mapped[str] = mapped_column(ForeignKey("checkpoints.sha256"))


class Alias(Base):
    """A second name for an ensemble (e.g. "production"), moved by setting it again."""

    __tablename__ = "aliases"

    name: Mapped[str] = mapped_column(primary_key=True)
    ensemble: Mapped[str] = mapped_column(ForeignKey("ensembles.name"))
    updated_at: Mapped[float]


class Event(Base):
    """A line of the coordinator's log; names are plain strings so any event can be recorded."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    time: Mapped[float]
    kind: Mapped[str]
    job: Mapped[str | None]
    unit: Mapped[int | None]
    worker_id: Mapped[str | None]
    message: Mapped[str] = mapped_column(Text)
