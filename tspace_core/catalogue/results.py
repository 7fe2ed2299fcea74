"""Catalogue operations on checkpoints, unit completion and ensembles; each runs in the caller's
transaction."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tspace_core.catalogue.enrolment import add_event
from tspace_core.catalogue.errors import CatalogueError
from tspace_core.catalogue.models import (
    Alias,
    Checkpoint,
    Ensemble,
    EnsembleMember,
    Job,
    Lease,
    Unit,
    Worker,
)
from tspace_core.catalogue.operator import active_leases, cancel_lease, reopen, settle_job
from tspace_core.catalogue.records import (
    JOB_CANCELLED,
    JOB_DONE,
    LEASE_COMPLETED,
    UNIT_DONE,
    UNIT_PENDING,
    WORKER_ACTIVE,
    AliasRecord,
    CheckpointRecord,
    CorruptCheckpoint,
    EnsembleMemberRecord,
    EnsembleRecord,
)
from tspace_core.catalogue.rows import (
    checkpoint_query,
    checkpoint_record,
    job_row,
    owned_active_lease,
    unit_row,
    worker_row,
)


def add_checkpoint(session: Session, rec: CheckpointRecord) -> tuple[CheckpointRecord, bool]:
    """Record a verified checkpoint; (record, True) when new, (existing record, False) when its
    digest is already known and trusted.

    Training is deterministic, so a unit trained again after a revocation or a reset can reach a
    recorded checkpoint byte for byte. A known digest that is untrusted (its signer revoked) or
    discarded is then re-attributed: it takes `rec`'s signature, signer and attempt, is no longer
    discarded, and (record, True) is returned; (record, False) when `rec` is the very statement
    already recorded, which only makes it current again."""
    existing = session.get(Checkpoint, rec.sha256, with_for_update=True)
    known = None if existing is None else get_checkpoint(session, rec.sha256)
    if known is not None and known.in_use:
        return known, False
    unit, _ = unit_row(session, rec.job, rec.unit)
    worker = worker_row(session, rec.worker_id, active=True)
    if (rec.key_id, rec.public_key) != (worker.key_id, worker.public_key):
        raise CatalogueError(
            "invalid_argument",
            f"checkpoint {rec.sha256[:12]} names key {rec.key_id!r}, "
            f"but worker {rec.worker_id} registered key {worker.key_id!r}",
        )
    if rec.size < 0 or rec.step < 0:
        raise CatalogueError("invalid_argument", "checkpoint size and step must be >= 0")
    if existing is not None and known is not None:
        return _reattribute(session, existing, known, rec)
    session.add(
        Checkpoint(
            sha256=rec.sha256,
            size=rec.size,
            unit_id=unit.id,
            step=rec.step,
            final=rec.final,
            attempt=rec.attempt,
            statement=rec.statement,
            signature=rec.signature,
            worker_id=rec.worker_id,
            metrics=dict(rec.metrics),
            shards_seen=list(rec.shards_seen),
            created_at=rec.created_at,
            verified=True,  # the coordinator checks digest and signature before recording
        )
    )
    session.flush()
    return get_checkpoint(session, rec.sha256), True


def _reattribute(
    session: Session, row: Checkpoint, known: CheckpointRecord, rec: CheckpointRecord
) -> tuple[CheckpointRecord, bool]:
    """Let `rec`, from an active signer, vouch for the untrusted or discarded `row`."""
    theirs = (known.job, known.unit, known.step, known.final, known.size)
    ours = (rec.job, rec.unit, rec.step, rec.final, rec.size)
    if ours != theirs:
        raise CatalogueError(
            "conflict",
            f"checkpoint {rec.sha256[:12]} is recorded as {known.job} unit {known.unit} step "
            f"{known.step} (final={known.final}, {known.size} bytes), not as {rec.job} unit "
            f"{rec.unit} step {rec.step} (final={rec.final}, {rec.size} bytes); the same bytes "
            "cannot be two checkpoints",
        )
    # Only an upload whose bytes were received and verified again reaches here for a corrupt
    # checkpoint (a header alone is refused for one), so its blob is whole again.
    was = (
        "corrupt on disk, received again"
        if row.corrupt
        else f"signer {known.worker_id} revoked"
        if not known.trusted
        else "discarded"
    )
    row.discarded = row.corrupt = False
    signed = (rec.worker_id, rec.statement, rec.signature)
    if (row.worker_id, row.statement, row.signature) == signed:
        session.flush()
        return get_checkpoint(session, rec.sha256), False
    row.worker_id, row.statement, row.signature = signed
    row.attempt, row.created_at = rec.attempt, rec.created_at
    add_event(
        session,
        "checkpoint_reattributed",
        f"checkpoint {rec.sha256[:12]} of {rec.job} unit {rec.unit} step {rec.step} "
        f"({was}) reproduced byte for byte and signed by worker {rec.worker_id}",
        rec.created_at,
        job=rec.job,
        unit=rec.unit,
        worker_id=rec.worker_id,
    )
    session.flush()
    return get_checkpoint(session, rec.sha256), True


def mark_corrupt(
    session: Session, sha256: str, problem: str, now: float, fetcher: str | None = None
) -> CorruptCheckpoint:
    """Record that checkpoint `sha256`'s blob failed its digest: it is marked corrupt and
    discarded, so no lease resumes from it and no ensemble takes it. A done unit whose
    completion rests on it goes back to pending with fresh attempts (its job reopens; the next
    lease resumes from its newest good checkpoint), as a reset would; a unit of a cancelled job
    stays as it is. `fetcher`, a worker that failed to fetch it to resume from, has its lease
    on the unit cancelled, which gives the attempt back: the unit did nothing wrong. Marking it
    again changes nothing but that lease."""
    found = session.get(Checkpoint, sha256)
    if found is None:
        raise CatalogueError("not_found", f"no checkpoint with digest {sha256!r}")
    unit = session.get_one(Unit, found.unit_id)
    # Lock the job, as complete_unit does, so that no completion resting on this checkpoint
    # lands meanwhile; then read the rows again under the lock.
    job = session.scalars(
        select(Job)
        .where(Job.id == unit.job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()
    row = session.get_one(Checkpoint, sha256, with_for_update=True, populate_existing=True)
    session.refresh(unit)
    cancelled = None
    if fetcher is not None:
        for lease in active_leases(session, job_id=job.id, worker_id=fetcher):
            if lease.unit_id == unit.id:
                reason = f"its resume checkpoint {sha256[:12]} is corrupt on the coordinator's disk"
                cancel_lease(session, lease, reason, now)
                cancelled = lease.lease_id
    if row.corrupt:
        session.flush()
        return CorruptCheckpoint(get_checkpoint(session, sha256), cancelled=cancelled)
    row.corrupt = row.discarded = True
    requeued = _requeue_resting_on(session, unit, job, sha256, now)
    what = (
        f"unit {unit.unit} was done with it and is requeued to train again"
        if requeued
        else "it is no longer handed out"
    )
    add_event(
        session,
        "checkpoint_corrupt",
        f"checkpoint {sha256[:12]} of {job.name} unit {unit.unit} step {row.step} is corrupt on "
        f"the coordinator's disk ({problem}); marked corrupt, {what}",
        now,
        job=job.name,
        unit=unit.unit,
    )
    session.flush()
    return CorruptCheckpoint(get_checkpoint(session, sha256), True, requeued, cancelled)


def _requeue_resting_on(session: Session, unit: Unit, job: Job, sha256: str, now: float) -> bool:
    """Put a done unit of a job not cancelled back to pending, with fresh attempts, when what
    its most recent completion delivered is `sha256`; whether it did."""
    delivered = session.scalar(
        select(Lease.checkpoint_sha256)
        .where(Lease.unit_id == unit.id, Lease.status == LEASE_COMPLETED)
        .order_by(Lease.updated_at.desc(), Lease.lease_id.desc())
        .limit(1)
    )
    if unit.status != UNIT_DONE or delivered != sha256 or job.status == JOB_CANCELLED:
        return False
    unit.status, unit.attempts, unit.last_error = UNIT_PENDING, 0, ""
    reopen(session, job, now)
    return True


def get_checkpoint(session: Session, sha256: str) -> CheckpointRecord:
    row = session.execute(checkpoint_query().where(Checkpoint.sha256 == sha256)).first()
    if row is None:
        raise CatalogueError("not_found", f"no checkpoint with digest {sha256!r}")
    return checkpoint_record(*row)


def newest_checkpoint(session: Session, job: str, unit: int) -> CheckpointRecord | None:
    """The unit's verified, trusted, not discarded checkpoint with the highest step (the newest
    among equals)."""
    unit_id = unit_row(session, job, unit)[0].id
    row = session.execute(
        checkpoint_query()
        .where(
            Checkpoint.unit_id == unit_id,
            Checkpoint.verified.is_(True),
            Checkpoint.discarded.is_(False),
            Checkpoint.corrupt.is_(False),
            Worker.status == WORKER_ACTIVE,
        )
        .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc(), Checkpoint.sha256)
        .limit(1)
    ).first()
    return None if row is None else checkpoint_record(*row)


def list_checkpoints(
    session: Session, job: str | None = None, unit: int | None = None, worker_id: str | None = None
) -> list[CheckpointRecord]:
    query = checkpoint_query().order_by(
        Job.created_at, Job.id, Unit.unit, Checkpoint.step, Checkpoint.created_at
    )
    if job is not None:
        query = query.where(Job.id == job_row(session, job).id)
    if unit is not None:
        query = query.where(Unit.unit == unit)
    if worker_id is not None:
        query = query.where(Checkpoint.worker_id == worker_id)
    return [checkpoint_record(*row) for row in session.execute(query)]


def complete_unit(
    session: Session, lease_id: str, worker_id: str, sha256: str, now: float
) -> str | None:
    """Finish the lease's unit with its final checkpoint; when that was the job's last unit, mark
    the job done and register the ensemble "<job>:final", whose name is returned."""
    lease = owned_active_lease(session, lease_id, worker_id)
    unit = session.get_one(Unit, lease.unit_id)
    # Locking the job serialises the job's completions, so exactly one sees the last unit done.
    job = session.scalars(select(Job).where(Job.id == unit.job_id).with_for_update()).one()
    ckpt = get_checkpoint(session, sha256)
    if (ckpt.job, ckpt.unit) != (job.name, unit.unit):
        raise CatalogueError(
            "invalid_argument",
            f"checkpoint {sha256[:12]} belongs to {ckpt.job} unit {ckpt.unit}, "
            f"not to {job.name} unit {unit.unit}",
        )
    if not ckpt.final:
        raise CatalogueError(
            "failed_precondition", f"checkpoint {sha256[:12]} is not final; upload the final one"
        )
    if not ckpt.trusted:
        raise CatalogueError(
            "failed_precondition", f"checkpoint {sha256[:12]} was signed by a revoked worker"
        )
    if ckpt.corrupt:
        raise CatalogueError(
            "failed_precondition",
            f"checkpoint {sha256[:12]} is corrupt on the coordinator's disk; upload it again",
        )
    # Training is deterministic: a unit reset and trained again may reach a discarded checkpoint
    # bit for bit. Reaching it again makes it the unit's line once more.
    session.get_one(Checkpoint, sha256).discarded = False
    lease.status, lease.updated_at, lease.checkpoint_sha256 = LEASE_COMPLETED, now, sha256
    unit.status, unit.last_error = UNIT_DONE, ""
    session.flush()
    remaining = session.scalar(
        select(func.count()).where(Unit.job_id == job.id, Unit.status != UNIT_DONE)
    )
    if remaining:
        settle_job(session, job, now)  # the others may all have failed
        return None
    job.status = JOB_DONE
    # A job finished again after an operator reset a unit gets a new name: ensembles are frozen.
    name, n = f"{job.name}:final", 1
    while session.get(Ensemble, name) is not None or session.get(Alias, name) is not None:
        n += 1
        name = f"{job.name}:final-{n}"
    # Each unit's member is what its most recent completed lease delivered.
    members = {
        unit_index: sha256
        for unit_index, sha256 in session.execute(
            select(Unit.unit, Lease.checkpoint_sha256)
            .join(Lease, Lease.unit_id == Unit.id)
            .where(Unit.job_id == job.id, Lease.status == LEASE_COMPLETED)
            .order_by(Lease.updated_at, Lease.lease_id)
        )
        if sha256 is not None
    }
    register_ensemble(session, name, job.name, members, now)
    add_event(session, "job_done", f"job {job.name} done; ensemble {name}", now, job=job.name)
    return name


def register_ensemble(
    session: Session, name: str, job: str, members: Mapping[int, str], now: float
) -> EnsembleRecord:
    """Freeze one trusted checkpoint per unit of `job` under `name`."""
    job_rec = job_row(session, job)
    if not name:
        raise CatalogueError("invalid_argument", "an ensemble needs a name")
    if session.get(Ensemble, name) is not None:
        raise CatalogueError("already_exists", f"an ensemble named {name!r} already exists")
    if session.get(Alias, name) is not None:
        raise CatalogueError("already_exists", f"{name!r} is already an alias; choose another name")
    unit_ids = dict(
        session.execute(select(Unit.unit, Unit.id).where(Unit.job_id == job_rec.id)).all()
    )
    if set(members) != set(unit_ids):
        missing, extra = sorted(set(unit_ids) - set(members)), sorted(set(members) - set(unit_ids))
        raise CatalogueError(
            "invalid_argument",
            f"ensemble {name!r} needs exactly one checkpoint for each unit of {job!r}; "
            f"missing units {missing}, unknown units {extra}",
        )
    for unit, sha256 in members.items():
        ckpt = get_checkpoint(session, sha256)
        if (ckpt.job, ckpt.unit) != (job, unit):
            raise CatalogueError(
                "invalid_argument",
                f"checkpoint {sha256[:12]} belongs to {ckpt.job} unit {ckpt.unit}, not unit {unit}",
            )
        if not ckpt.trusted:
            raise CatalogueError(
                "failed_precondition",
                f"checkpoint {sha256[:12]} of unit {unit} was signed by a revoked worker",
            )
        if ckpt.corrupt:
            raise CatalogueError(
                "failed_precondition",
                f"checkpoint {sha256[:12]} of unit {unit} is corrupt on the coordinator's disk",
            )
    session.add(Ensemble(name=name, job_id=job_rec.id, created_at=now))
    session.flush()
    session.add_all(
        EnsembleMember(ensemble=name, unit_id=unit_ids[u], checkpoint_sha256=sha)
        for u, sha in members.items()
    )
    session.flush()
    return get_ensemble(session, name)


def get_ensemble(session: Session, name: str) -> EnsembleRecord:
    """The ensemble called `name`, or the one the alias `name` points at."""
    ensemble = session.get(Ensemble, name)
    if ensemble is None:
        alias = session.get(Alias, name)
        if alias is None:
            raise CatalogueError(
                "not_found",
                f"no ensemble or alias named {name!r}; `tspace-coord ensembles list` shows them",
            )
        ensemble = session.get_one(Ensemble, alias.ensemble)
    return _ensemble_record(session, ensemble)


def list_ensembles(session: Session) -> list[EnsembleRecord]:
    ensembles = session.scalars(select(Ensemble).order_by(Ensemble.created_at, Ensemble.name))
    return [_ensemble_record(session, e) for e in ensembles]


def set_alias(session: Session, alias: str, ensemble: str, now: float) -> AliasRecord:
    """Point `alias` at `ensemble` (itself possibly an alias); an existing alias moves."""
    if not alias:
        raise CatalogueError("invalid_argument", "an alias needs a name")
    if session.get(Ensemble, alias) is not None:
        raise CatalogueError(
            "already_exists", f"{alias!r} is an ensemble's own name; an alias needs another name"
        )
    target = get_ensemble(session, ensemble).name
    row = session.get(Alias, alias)
    previous = None if row is None else row.ensemble
    if row is None:
        row = Alias(name=alias, ensemble=target, updated_at=now)
        session.add(row)
    else:
        row.ensemble, row.updated_at = target, now
    moved = f" (was {previous})" if previous and previous != target else ""
    add_event(session, "alias_set", f"alias {alias} -> {target}{moved}", now)
    session.flush()
    return AliasRecord(alias=alias, ensemble=target, updated_at=now)


def list_aliases(session: Session) -> list[AliasRecord]:
    return [
        AliasRecord(alias=a.name, ensemble=a.ensemble, updated_at=a.updated_at)
        for a in session.scalars(select(Alias).order_by(Alias.name))
    ]


def _ensemble_record(session: Session, ensemble: Ensemble) -> EnsembleRecord:
    job = session.get_one(Job, ensemble.job_id)
    rows = session.execute(
        checkpoint_query()
        .join(EnsembleMember, EnsembleMember.checkpoint_sha256 == Checkpoint.sha256)
        .where(EnsembleMember.ensemble == ensemble.name)
        .order_by(Unit.unit)
    ).all()
    members = tuple(
        EnsembleMemberRecord(
            unit=unit.unit,
            timesteps=tuple(unit.timesteps),
            checkpoint=checkpoint_record(ckpt, unit, unit_job, worker),
        )
        for ckpt, unit, unit_job, worker in rows
    )
    aliases = session.scalars(
        select(Alias.name).where(Alias.ensemble == ensemble.name).order_by(Alias.name)
    )
    return EnsembleRecord(
        name=ensemble.name,
        job=job.name,
        job_hash=job.job_hash,
        spec_json=job.spec_json,
        created_at=ensemble.created_at,
        members=members,
        aliases=tuple(aliases),
    )
