"""Catalogue operations on jobs, units and leases; each runs in the caller's transaction."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import cast

from sqlalchemy import CursorResult, Table, and_, bindparam, case, func, select, update
from sqlalchemy.orm import Session

from tspace_core.catalogue.enrolment import add_event
from tspace_core.catalogue.errors import CatalogueError
from tspace_core.catalogue.models import Checkpoint, Job, Lease, Shard, Unit, Worker
from tspace_core.catalogue.operator import settle_job
from tspace_core.catalogue.records import (
    JOB_ACTIVE,
    LEASE_ACTIVE,
    LEASE_EXPIRED,
    LEASE_FAILED,
    UNIT_FAILED,
    UNIT_LEASED,
    UNIT_PENDING,
    WORKER_ACTIVE,
    JobRecord,
    LeaseRecord,
    ShardRecord,
    UnitRecord,
)
from tspace_core.catalogue.rows import (
    job_records,
    job_row,
    lease_record,
    lease_records,
    lease_row,
    owned_active_lease,
    unit_record,
    worker_row,
)

Choose = Callable[[list[UnitRecord]], UnitRecord | None]


def create_job(
    session: Session,
    name: str,
    job_hash: str,
    spec_json: str,
    units: Sequence[Sequence[int]],
    total_steps: int,
    shards: Sequence[ShardRecord],
    now: float,
) -> JobRecord:
    """A new job with its units (numbered by position) and shards; the same job again is a no-op."""
    existing = session.scalar(select(Job).where(Job.name == name))
    if existing is not None:
        if existing.job_hash == job_hash:
            return job_records(session, [existing])[0]
        raise CatalogueError(
            "already_exists",
            f"a different job named {name!r} exists (hash {existing.job_hash[:12]}); "
            "choose another name",
        )
    if not units or any(len(timesteps) == 0 for timesteps in units):
        raise CatalogueError("invalid_argument", f"job {name!r} needs units, each with timesteps")
    if total_steps < 1:
        raise CatalogueError("invalid_argument", f"total_steps must be >= 1, got {total_steps}")
    job = Job(
        name=name,
        job_hash=job_hash,
        spec_json=spec_json,
        status=JOB_ACTIVE,
        total_steps=total_steps,
        created_at=now,
    )
    session.add(job)
    session.flush()
    session.add_all(
        Unit(
            job_id=job.id,
            unit=index,
            timesteps=[int(t) for t in timesteps],
            status=UNIT_PENDING,
            attempts=0,
            last_error="",
        )
        for index, timesteps in enumerate(units)
    )
    session.add_all(
        Shard(job_id=job.id, position=i, name=s.name, sha256=s.sha256, size=s.size, count=s.count)
        for i, s in enumerate(shards)
    )
    session.flush()
    return job_records(session, [job])[0]


def get_job(session: Session, name: str) -> JobRecord:
    return job_records(session, [job_row(session, name)])[0]


def list_jobs(session: Session) -> list[JobRecord]:
    return job_records(session, session.scalars(select(Job).order_by(Job.created_at, Job.id)))


def units(session: Session, job: str | None = None) -> list[UnitRecord]:
    """Units in job then unit order, with the progress of the active lease where there is one
    and the step and time of the newest checkpoint a lease would resume from."""
    # Per unit, the checkpoint newest_checkpoint() would resume from: highest step, then newest.
    ranked = (
        select(
            Checkpoint.unit_id,
            Checkpoint.step.label("step"),
            Checkpoint.created_at.label("at"),
            func.row_number()
            .over(
                partition_by=Checkpoint.unit_id,
                order_by=(Checkpoint.step.desc(), Checkpoint.created_at.desc()),
            )
            .label("rank"),
        )
        .join(Worker, Checkpoint.worker_id == Worker.worker_id)
        .where(Checkpoint.discarded.is_(False), Worker.status == WORKER_ACTIVE)
        .subquery()
    )
    newest = (
        select(ranked.c.unit_id, ranked.c.step, ranked.c.at).where(ranked.c.rank == 1).subquery()
    )
    query = (
        select(Unit, Job, Lease, newest.c.step, newest.c.at)
        .join(Job, Unit.job_id == Job.id)
        .outerjoin(Lease, and_(Lease.unit_id == Unit.id, Lease.status == LEASE_ACTIVE))
        .outerjoin(newest, newest.c.unit_id == Unit.id)
        .order_by(Job.created_at, Job.id, Unit.unit)
    )
    if job is not None:
        query = query.where(Unit.job_id == job_row(session, job).id)
    return [
        replace(unit_record(u, j, lease), newest_step=step, newest_checkpoint_at=at)
        for u, j, lease, step, at in session.execute(query)
    ]


# How many pending units an acquire reads at a time, fewest attempts first.
ACQUIRE_WINDOW = 16


def acquire(
    session: Session, worker_id: str, now: float, ttl: float, choose: Choose
) -> LeaseRecord | None:
    """Lease the pending unit of an active job that `choose` picks, or None when it picks none.

    `choose` is offered at most ACQUIRE_WINDOW pending units at a time, fewest attempts first,
    then in catalogue order (jobs by creation, units by index): the units a fewest-attempts
    policy would pick, without reading every pending unit. On PostgreSQL the window skips units
    another acquire has locked, so concurrent acquires take different units instead of queueing
    on one row. A unit is claimed by a conditional UPDATE (status still pending); when another
    transaction won it, the unit leaves the candidates and `choose` is asked again, and when
    the window runs out the next one is read. The lease is logged as a "unit_leased" event.
    """
    worker_row(session, worker_id, active=True)
    if ttl <= 0:
        raise CatalogueError("invalid_argument", f"lease ttl must be > 0 seconds, got {ttl}")
    tried: set[int] = set()
    skip_locked = True
    while True:
        pending = (
            select(Unit, Job)
            .join(Job, Unit.job_id == Job.id)
            .where(Unit.status == UNIT_PENDING, Job.status == JOB_ACTIVE, Unit.id.not_in(tried))
        )
        rows = session.execute(
            pending.order_by(Unit.attempts, Job.created_at, Job.id, Unit.unit)
            .limit(ACQUIRE_WINDOW)
            .with_for_update(of=Unit, skip_locked=skip_locked)
        ).all()
        if not rows:
            # PostgreSQL leaves out rows that are locked or were taken since the statement
            # began, so an empty window does not mean nothing is pending: when something is,
            # wait for the locks this time.
            if session.execute(pending.limit(1)).first() is None:
                return None
            skip_locked = False
            continue
        ids = {(j.name, u.unit): u.id for u, j in rows}
        candidates = [unit_record(u, j, None) for u, j in rows]
        tried.update(ids.values())
        while candidates:
            pick = choose(list(candidates))
            if pick is None:
                return None
            key = (pick.job, pick.unit)
            if key not in ids:
                raise ValueError(f"choose returned unit {key}, which was not offered")
            claimed: CursorResult[tuple[()]] = session.execute(  # type: ignore[assignment]
                update(Unit)
                .where(Unit.id == ids[key], Unit.status == UNIT_PENDING)
                .values(status=UNIT_LEASED, attempts=Unit.attempts + 1)
                .execution_options(synchronize_session=False)
            )
            if claimed.rowcount == 1:
                return _lease(session, ids[key], pick, worker_id, now, ttl)
            candidates = [c for c in candidates if (c.job, c.unit) != key]


def _lease(
    session: Session, unit_id: int, unit: UnitRecord, worker_id: str, now: float, ttl: float
) -> LeaseRecord:
    attempt = int(session.scalar(select(Unit.attempts).where(Unit.id == unit_id)) or 0)
    lease = Lease(
        lease_id="l-" + secrets.token_hex(8),
        unit_id=unit_id,
        worker_id=worker_id,
        attempt=attempt,
        expires_at=now + ttl,
        status=LEASE_ACTIVE,
        step=0,
        loss=0.0,
        images_per_s=0.0,
        updated_at=now,
    )
    session.add(lease)
    add_event(
        session,
        "unit_leased",
        f"unit {unit.unit} of {unit.job} to {worker_id} (attempt {attempt})",
        now,
        job=unit.job,
        unit=unit.unit,
        worker_id=worker_id,
    )
    session.flush()
    return lease_record(lease, unit.job, unit.unit)


_lease_table = cast(Table, Lease.__table__)
_leases = _lease_table.c
# Built once: a statement built per call costs more than running it. Core, not ORM, for the same
# reason; no Lease object of the session is ever stale by it, as beat loads none first.
_BEAT = (
    update(_lease_table)
    .where(
        _leases.lease_id == bindparam("b_lease_id"),
        _leases.worker_id == bindparam("b_worker_id"),
        _leases.status == LEASE_ACTIVE,
    )
    .values(
        expires_at=case(
            (_leases.expires_at < bindparam("b_expiry"), bindparam("b_expiry")),
            else_=_leases.expires_at,
        ),
        step=bindparam("b_step"),
        loss=bindparam("b_loss"),
        images_per_s=bindparam("b_images_per_s"),
        updated_at=bindparam("b_now"),
    )
)


def beat(
    session: Session,
    lease_id: str,
    worker_id: str,
    now: float,
    ttl: float,
    step: int,
    loss: float,
    images_per_s: float,
) -> None:
    """Record progress and extend the lease to now + ttl; refused once it has ended.

    One UPDATE guarded by holder and status, the hot path of every worker's heartbeat; only
    when it matches no row is the lease read, to say why. A lease past its expiry that the
    reaper has not ended yet is extended: only the reaper expires leases. A beat held up by a
    database outage lands late, and the reaper gives leases a TTL's grace after one (see
    Coordinator._reap), which it could not if beats were refused. The expiry is never
    shortened: a beat retried through an outage carries the time it was first sent, and the
    reaper may have granted more since."""
    if ttl <= 0:
        raise CatalogueError("invalid_argument", f"lease ttl must be > 0 seconds, got {ttl}")
    updated = session.connection().execute(
        _BEAT,
        {
            "b_lease_id": lease_id,
            "b_worker_id": worker_id,
            "b_expiry": now + ttl,
            "b_step": step,
            "b_loss": loss,
            "b_images_per_s": images_per_s,
            "b_now": now,
        },
    )
    if updated.rowcount != 1:
        owned_active_lease(session, lease_id, worker_id)  # raises the reason
        raise AssertionError(f"lease {lease_id!r} is active but was not updated")


def heartbeat(
    session: Session,
    lease_id: str,
    worker_id: str,
    now: float,
    ttl: float,
    step: int,
    loss: float,
    images_per_s: float,
) -> LeaseRecord:
    """`beat`, then the lease as it is now."""
    beat(session, lease_id, worker_id, now, ttl, step, loss, images_per_s)
    return lease_records(session, [lease_row(session, lease_id)])[0]


def get_lease(session: Session, lease_id: str) -> LeaseRecord:
    return lease_records(session, [lease_row(session, lease_id)])[0]


def expire_leases(session: Session, now: float, max_attempts: int) -> list[LeaseRecord]:
    """End every active lease past its expiry and requeue (or fail) its unit."""
    leases = session.scalars(
        select(Lease)
        .where(Lease.status == LEASE_ACTIVE, Lease.expires_at < now)
        .order_by(Lease.expires_at, Lease.lease_id)
        .with_for_update()
    ).all()
    for lease in leases:
        _end_lease(session, lease, LEASE_EXPIRED, "lease expired", now, max_attempts)
    return lease_records(session, leases)


def fail_lease(
    session: Session, lease_id: str, worker_id: str, error: str, now: float, max_attempts: int
) -> UnitRecord:
    """End the lease as failed with `error`; the unit is requeued or, out of attempts, failed."""
    lease = owned_active_lease(session, lease_id, worker_id)
    return _end_lease(session, lease, LEASE_FAILED, error, now, max_attempts)


def _end_lease(
    session: Session, lease: Lease, status: str, error: str, now: float, max_attempts: int
) -> UnitRecord:
    unit = session.get_one(Unit, lease.unit_id)
    job = session.get_one(Job, unit.job_id)
    lease.status = status
    lease.updated_at = now
    unit.status = UNIT_FAILED if unit.attempts >= max_attempts else UNIT_PENDING
    unit.last_error = error
    outcome = "unit failed" if unit.status == UNIT_FAILED else "unit requeued"
    add_event(
        session,
        f"lease_{status}",
        f"lease {lease.lease_id} on {job.name} unit {unit.unit} {status} "
        f"(attempt {lease.attempt}/{max_attempts}): {error}; {outcome}",
        now,
        job=job.name,
        unit=unit.unit,
        worker_id=lease.worker_id,
    )
    if unit.status == UNIT_FAILED:
        settle_job(session, job, now)
    return unit_record(unit, job, None)


def grant_grace(session: Session, until: float) -> int:
    """Move the expiry of every active lease up to `until` if it is earlier; how many moved."""
    result: CursorResult[tuple[()]] = session.execute(  # type: ignore[assignment]
        update(Lease)
        .where(Lease.status == LEASE_ACTIVE, Lease.expires_at < until)
        .values(expires_at=until)
    )
    return int(result.rowcount or 0)
