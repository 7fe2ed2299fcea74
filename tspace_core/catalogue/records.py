"""What the catalogue hands out: frozen records, free of SQLAlchemy and protobuf types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

# Unit and lease life cycles. A unit is pending -> leased -> done, or back to pending when its
# lease expires or fails, and failed once it has used up its attempts. An operator can retry a
# failed unit or reset any unit to one of its checkpoints (both: back to pending).
UNIT_PENDING, UNIT_LEASED, UNIT_DONE, UNIT_FAILED = "pending", "leased", "done", "failed"
LEASE_ACTIVE, LEASE_EXPIRED, LEASE_COMPLETED, LEASE_FAILED = (
    "active",
    "expired",
    "completed",
    "failed",
)
# Ended by the operator (job paused or cancelled, unit reset, worker revoked): the attempt is
# given back, since the unit did nothing wrong.
LEASE_CANCELLED = "cancelled"
# A job is active until every unit is done (done) or no unit can make progress any more because
# some failed (failed). Paused jobs hand out no units; cancelled is for good.
JOB_ACTIVE, JOB_DONE, JOB_FAILED = "active", "done", "failed"
JOB_PAUSED, JOB_CANCELLED = "paused", "cancelled"
WORKER_ACTIVE, WORKER_REVOKED = "active", "revoked"
TOKEN_UNUSED, TOKEN_USED, TOKEN_EXPIRED, TOKEN_REVOKED = "unused", "used", "expired", "revoked"


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
    # The checkpoint a new lease would resume from (trusted, not discarded), if any.
    newest_step: int | None = None
    newest_checkpoint_at: float | None = None


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


class Beat(NamedTuple):
    """One heartbeat of a lease: its progress, and the time and TTL it extends the lease by."""

    lease_id: str
    worker_id: str
    now: float
    ttl: float
    step: int
    loss: float
    images_per_s: float


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
class Revocation:
    """What revoking a worker did: the worker as it is now, the checkpoints it signed (all
    untrusted from now on), and the units back to pending to be trained again, as (job, unit)
    sorted by job name, then unit: those it was training and the done ones whose completion
    rests on a checkpoint it signed."""

    worker: WorkerRecord
    requeued: tuple[tuple[str, int], ...] = ()
    checkpoints: int = 0


@dataclass(frozen=True)
class CorruptCheckpoint:
    """What finding a checkpoint's blob corrupt did: `marked` when it was not marked corrupt
    before; `requeued` when its unit was done resting on it and goes back to pending;
    `cancelled` is the lease ended because its worker could not fetch it to resume from."""

    checkpoint: CheckpointRecord
    marked: bool = False
    requeued: bool = False
    cancelled: str | None = None


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
    discarded: bool = False  # True once a reset, a revocation or corruption took it out of use
    corrupt: bool = False  # its blob failed its digest on the coordinator's disk (discarded too)

    @property
    def in_use(self) -> bool:
        """Trusted and not discarded: a point to resume from, select, or vouch for as is."""
        return self.trusted and not self.discarded


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
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class AliasRecord:
    alias: str
    ensemble: str
    updated_at: float


@dataclass(frozen=True)
class TokenRecord:
    """A join token as the operator sees it: named by a prefix of its hash, never the token."""

    token_id: str
    site: str
    status: str
    created_at: float | None
    expires_at: float
    used_at: float | None = None
    worker_id: str | None = None


@dataclass(frozen=True)
class EventRecord:
    time: float
    kind: str
    message: str
    job: str | None = None
    unit: int | None = None
    worker_id: str | None = None
