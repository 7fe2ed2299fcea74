"""What the catalogue hands out: frozen records, free of SQLAlchemy and protobuf types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Unit and lease life cycles. A unit is pending -> leased -> done, or back to pending when its
# lease expires or fails, and failed once it has used up its attempts.
UNIT_PENDING, UNIT_LEASED, UNIT_DONE, UNIT_FAILED = "pending", "leased", "done", "failed"
LEASE_ACTIVE, LEASE_EXPIRED, LEASE_COMPLETED, LEASE_FAILED = (
    "active",
    "expired",
    "completed",
    "failed",
)
JOB_ACTIVE, JOB_DONE, JOB_FAILED = "active", "done", "failed"
WORKER_ACTIVE, WORKER_REVOKED = "active", "revoked"


@dataclass(frozen=True)
class ShardRecord:
    """A dataset shard stored content-addressed; `name` is its file name in the dataset."""

    name: str
    sha256: str
    size: int
    count: int


@dataclass(frozen=True)
class JobRecord:
    name: str
    job_hash: str
    spec_json: str
    status: str
    total_steps: int
    created_at: float
    shards: tuple[ShardRecord, ...] = ()
    units: int = 0
    units_done: int = 0
    units_failed: int = 0


@dataclass(frozen=True)
class UnitRecord:
    """A unit and, while it is leased, its lease's latest progress."""

    job: str
    unit: int
    timesteps: tuple[int, ...]
    status: str
    attempts: int
    total_steps: int
    last_error: str = ""
    lease_id: str | None = None
    worker_id: str | None = None
    step: int = 0
    loss: float = 0.0
    images_per_s: float = 0.0


@dataclass(frozen=True)
class LeaseRecord:
    lease_id: str
    job: str
    unit: int
    worker_id: str
    attempt: int
    expires_at: float
    status: str
    step: int = 0
    loss: float = 0.0
    images_per_s: float = 0.0


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    site: str
    public_key: bytes
    key_id: str
    status: str
    device: str
    hostname: str
    registered_at: float
    last_seen: float
    units_done: int = 0


@dataclass(frozen=True)
class CheckpointRecord:
    """A verified, signed checkpoint; `statement` is the exact signed bytes."""

    sha256: str
    size: int
    job: str
    unit: int
    step: int
    final: bool
    statement: bytes
    signature: bytes
    worker_id: str
    key_id: str
    public_key: bytes
    created_at: float
    attempt: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    shards_seen: tuple[str, ...] = ()
    trusted: bool = True  # False once the signing worker is revoked


@dataclass(frozen=True)
class EnsembleMemberRecord:
    unit: int
    timesteps: tuple[int, ...]
    checkpoint: CheckpointRecord


@dataclass(frozen=True)
class EnsembleRecord:
    name: str
    job: str
    job_hash: str
    spec_json: str
    created_at: float
    members: tuple[EnsembleMemberRecord, ...]


@dataclass(frozen=True)
class EventRecord:
    time: float
    kind: str
    message: str
    job: str | None = None
    unit: int | None = None
    worker_id: str | None = None
