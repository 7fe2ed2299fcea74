"""Row lookups that refuse with a CatalogueError, and the conversions from rows to records."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from tspace_core.catalogue.errors import CatalogueError
from tspace_core.catalogue.models import Checkpoint, Job, Lease, Shard, Unit, Worker
from tspace_core.catalogue.records import (
    LEASE_ACTIVE,
    LEASE_COMPLETED,
    UNIT_DONE,
    UNIT_FAILED,
    WORKER_ACTIVE,
    WORKER_REVOKED,
    CheckpointRecord,
    JobRecord,
    LeaseRecord,
    ShardRecord,
    UnitRecord,
    WorkerRecord,
)


def job_row(session: Session, name: str, *, lock: bool = False) -> Job:
    query = select(Job).where(Job.name == name)
    job = session.scalar(query.with_for_update() if lock else query)
    if job is None:
        raise CatalogueError(
            "not_found", f"no job named {name!r}; `tspace-coord jobs list` shows them"
        )
    return job


def unit_row(session: Session, job: str, unit: int) -> tuple[Unit, Job]:
    row = session.execute(
        select(Unit, Job).join(Job, Unit.job_id == Job.id).where(Job.name == job, Unit.unit == unit)
    ).first()
    if row is None:
        raise CatalogueError("not_found", f"job {job!r} has no unit {unit}")
    return row[0], row[1]


def worker_row(session: Session, worker_id: str, *, active: bool = False) -> Worker:
    worker = session.get(Worker, worker_id)
    if worker is None:
        raise CatalogueError(
            "not_found", f"no worker {worker_id!r}; `tspace-coord workers list` shows them"
        )
    if active and worker.status == WORKER_REVOKED:
        raise CatalogueError(
            "unauthenticated", f"worker {worker_id!r} is revoked; enrol again with a new join token"
        )
    return worker


def lease_row(session: Session, lease_id: str, *, lock: bool = False) -> Lease:
    query = select(Lease).where(Lease.lease_id == lease_id)
    lease = session.scalar(query.with_for_update() if lock else query)
    if lease is None:
        raise CatalogueError("not_found", f"no lease {lease_id!r}")
    return lease


def owned_active_lease(session: Session, lease_id: str, worker_id: str) -> Lease:
    """The lease, locked, when it is active and held by `worker_id`; refused otherwise."""
    lease = lease_row(session, lease_id, lock=True)
    if lease.worker_id != worker_id:
        raise CatalogueError(
            "failed_precondition",
            f"lease {lease_id!r} is held by another worker, not {worker_id!r}",
        )
    if lease.status != LEASE_ACTIVE:
        raise CatalogueError(
            "failed_precondition",
            f"lease {lease_id!r} has ended ({lease.status}); acquire a new unit",
        )
    return lease


def shard_record(shard: Shard) -> ShardRecord:
    return ShardRecord(name=shard.name, sha256=shard.sha256, size=shard.size, count=shard.count)


def job_records(session: Session, jobs: Iterable[Job]) -> list[JobRecord]:
    """Records of `jobs` with their shards and unit counts, in three queries."""
    jobs = list(jobs)
    ids = [job.id for job in jobs]
    counts: dict[tuple[int, str], int] = {}
    shards: dict[int, list[ShardRecord]] = {i: [] for i in ids}
    if ids:
        for job_id, status, n in session.execute(
            select(Unit.job_id, Unit.status, func.count())
            .where(Unit.job_id.in_(ids))
            .group_by(Unit.job_id, Unit.status)
        ):
            counts[(job_id, status)] = n
        for shard in session.scalars(
            select(Shard).where(Shard.job_id.in_(ids)).order_by(Shard.job_id, Shard.position)
        ):
            shards[shard.job_id].append(shard_record(shard))
    return [
        JobRecord(
            name=job.name,
            job_hash=job.job_hash,
            spec_json=job.spec_json,
            status=job.status,
            total_steps=job.total_steps,
            created_at=job.created_at,
            shards=tuple(shards[job.id]),
            units=sum(n for (j, _), n in counts.items() if j == job.id),
            units_done=counts.get((job.id, UNIT_DONE), 0),
            units_failed=counts.get((job.id, UNIT_FAILED), 0),
        )
        for job in jobs
    ]


def unit_record(unit: Unit, job: Job, lease: Lease | None) -> UnitRecord:
    """The unit and, while `lease` (its active lease) is given, that lease's progress."""
    record = UnitRecord(
        job=job.name,
        unit=unit.unit,
        timesteps=tuple(unit.timesteps),
        status=unit.status,
        attempts=unit.attempts,
        total_steps=job.total_steps,
        last_error=unit.last_error,
    )
    if lease is None:
        return record
    return replace(
        record,
        lease_id=lease.lease_id,
        worker_id=lease.worker_id,
        step=lease.step,
        loss=lease.loss,
        images_per_s=lease.images_per_s,
    )


def lease_record(lease: Lease, job: str, unit: int) -> LeaseRecord:
    return LeaseRecord(
        lease_id=lease.lease_id,
        job=job,
        unit=unit,
        worker_id=lease.worker_id,
        attempt=lease.attempt,
        expires_at=lease.expires_at,
        status=lease.status,
        step=lease.step,
        loss=lease.loss,
        images_per_s=lease.images_per_s,
    )


def lease_records(session: Session, leases: Iterable[Lease]) -> list[LeaseRecord]:
    out = []
    for lease in leases:
        unit = session.get_one(Unit, lease.unit_id)
        job = session.get_one(Job, unit.job_id)
        out.append(lease_record(lease, job.name, unit.unit))
    return out


def worker_records(session: Session, workers: Iterable[Worker]) -> list[WorkerRecord]:
    workers = list(workers)
    done: dict[str, int] = dict(
        session.execute(
            select(Lease.worker_id, func.count())
            .where(
                Lease.status == LEASE_COMPLETED, Lease.worker_id.in_([w.worker_id for w in workers])
            )
            .group_by(Lease.worker_id)
        ).all()
    )
    return [
        WorkerRecord(
            worker_id=w.worker_id,
            site=w.site,
            public_key=w.public_key,
            key_id=w.key_id,
            status=w.status,
            device=w.device,
            hostname=w.hostname,
            registered_at=w.registered_at,
            last_seen=w.last_seen,
            units_done=done.get(w.worker_id, 0),
        )
        for w in workers
    ]


def checkpoint_query() -> Select[Checkpoint, Unit, Job, Worker]:
    """Checkpoints with the rows their records need: unit, job and signing worker."""
    return (
        select(Checkpoint, Unit, Job, Worker)
        .join(Unit, Checkpoint.unit_id == Unit.id)
        .join(Job, Unit.job_id == Job.id)
        .join(Worker, Checkpoint.worker_id == Worker.worker_id)
    )


def checkpoint_record(ckpt: Checkpoint, unit: Unit, job: Job, worker: Worker) -> CheckpointRecord:
    return CheckpointRecord(
        sha256=ckpt.sha256,
        size=ckpt.size,
        job=job.name,
        unit=unit.unit,
        step=ckpt.step,
        final=ckpt.final,
        statement=ckpt.statement,
        signature=ckpt.signature,
        worker_id=worker.worker_id,
        key_id=worker.key_id,
        public_key=worker.public_key,
        created_at=ckpt.created_at,
        attempt=ckpt.attempt,
        metrics=dict(ckpt.metrics),
        shards_seen=tuple(ckpt.shards_seen),
        trusted=worker.status == WORKER_ACTIVE,
        discarded=ckpt.discarded,
        corrupt=ckpt.corrupt,
    )
