"""Catalogue operations an operator starts: pause, resume and cancel jobs, retry and reset
units, revoke tokens, and find checkpoints by a digest prefix. Each runs in the caller's
transaction and either changes everything it says or nothing."""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tspace_core.catalogue.enrolment import add_event
from tspace_core.catalogue.errors import CatalogueError
from tspace_core.catalogue.models import Checkpoint, Job, Lease, Token, Unit
from tspace_core.catalogue.records import (
    JOB_ACTIVE,
    JOB_CANCELLED,
    JOB_DONE,
    JOB_FAILED,
    JOB_PAUSED,
    LEASE_ACTIVE,
    LEASE_CANCELLED,
    TOKEN_EXPIRED,
    TOKEN_REVOKED,
    TOKEN_UNUSED,
    TOKEN_USED,
    UNIT_DONE,
    UNIT_FAILED,
    UNIT_LEASED,
    UNIT_PENDING,
    WORKER_REVOKED,
    CheckpointRecord,
    JobRecord,
    Revocation,
    TokenRecord,
    UnitRecord,
)
from tspace_core.catalogue.rows import (
    checkpoint_query,
    checkpoint_record,
    job_records,
    job_row,
    unit_record,
    worker_records,
    worker_row,
)

JOB_ACTIONS = ("pause", "resume", "cancel")
MIN_CHECKPOINT_PREFIX = 8
MIN_TOKEN_PREFIX = 6
TOKEN_ID_LENGTH = 12
_HEX = re.compile(r"[0-9a-f]+")


def cancel_lease(session: Session, lease: Lease, reason: str, now: float) -> None:
    """End an active lease on the operator's behalf: its unit goes back to pending and gets the
    attempt back. The worker learns at its next heartbeat and stops the unit."""
    unit = session.get_one(Unit, lease.unit_id)
    job = session.get_one(Job, unit.job_id)
    lease.status, lease.updated_at = LEASE_CANCELLED, now
    unit.status = UNIT_PENDING
    unit.attempts = max(unit.attempts - 1, 0)
    add_event(
        session,
        "lease_cancelled",
        f"lease {lease.lease_id} on {job.name} unit {unit.unit} cancelled: {reason}",
        now,
        job=job.name,
        unit=unit.unit,
        worker_id=lease.worker_id,
    )


def active_leases(session: Session, *, job_id: int | None = None, worker_id: str | None = None):
    query = select(Lease).join(Unit, Lease.unit_id == Unit.id).where(Lease.status == LEASE_ACTIVE)
    if job_id is not None:
        query = query.where(Unit.job_id == job_id)
    if worker_id is not None:
        query = query.where(Lease.worker_id == worker_id)
    return session.scalars(query.order_by(Unit.unit).with_for_update(of=Lease)).all()


def settle_job(session: Session, job: Job, now: float) -> None:
    """Mark an active job failed once none of its units can make progress and some failed."""
    if job.status != JOB_ACTIVE:
        return
    counts = dict(
        session.execute(
            select(Unit.status, func.count()).where(Unit.job_id == job.id).group_by(Unit.status)
        ).all()
    )
    if counts.get(UNIT_FAILED) and not counts.get(UNIT_PENDING) and not counts.get(UNIT_LEASED):
        job.status = JOB_FAILED
        add_event(
            session,
            "job_failed",
            f"job {job.name}: {counts[UNIT_FAILED]} unit(s) failed, nothing left to train; "
            f"`tspace-coord units retry {job.name} UNIT` gives a unit new attempts",
            now,
            job=job.name,
        )


def change_job(session: Session, name: str, action: str, now: float) -> JobRecord:
    """Pause, resume or cancel a job; refused with a message naming the job's state otherwise."""
    if action not in JOB_ACTIONS:
        raise CatalogueError(
            "invalid_argument",
            f"unknown job action {action!r}; use one of {', '.join(JOB_ACTIONS)}",
        )
    job = job_row(session, name, lock=True)
    allowed = {
        "pause": (JOB_ACTIVE,),
        "resume": (JOB_PAUSED,),
        "cancel": (JOB_ACTIVE, JOB_PAUSED, JOB_FAILED),
    }[action]
    if job.status not in allowed:
        raise CatalogueError("failed_precondition", _refusal(job, action))
    if action in ("pause", "cancel"):
        verb = "paused" if action == "pause" else "cancelled"
        for lease in active_leases(session, job_id=job.id):
            cancel_lease(session, lease, f"job {verb}", now)
        job.status = JOB_PAUSED if action == "pause" else JOB_CANCELLED
    else:
        job.status = JOB_ACTIVE
    past = {"pause": "paused", "resume": "resumed", "cancel": "cancelled"}[action]
    add_event(session, f"job_{past}", f"job {job.name} {past}", now, job=job.name)
    session.flush()
    return job_records(session, [job])[0]


def _refusal(job: Job, action: str) -> str:
    name, status = job.name, job.status
    if status == {"pause": JOB_PAUSED, "cancel": JOB_CANCELLED}.get(action):
        return f"job {name!r} is already {status}"
    if status == JOB_DONE:
        return f"job {name!r} is done (every unit trained); there is nothing to {action}"
    if status == JOB_CANCELLED:
        return f"job {name!r} was cancelled, which is final; create it again under a new name"
    if action == "resume" and status == JOB_ACTIVE:
        return f"job {name!r} is active, not paused; there is nothing to resume"
    if status == JOB_FAILED:
        return (
            f"job {name!r} failed (units out of attempts); give them new attempts with "
            f"`tspace-coord units retry {name} UNIT`"
        )
    return f"job {name!r} is {status}; it cannot be {action}d"


def _unit_for_change(session: Session, job_name: str, unit: int) -> tuple[Unit, Job]:
    job = job_row(session, job_name, lock=True)
    row = session.scalar(select(Unit).where(Unit.job_id == job.id, Unit.unit == unit))
    if row is None:
        count = session.scalar(select(func.count()).where(Unit.job_id == job.id))
        raise CatalogueError(
            "not_found", f"job {job_name!r} has no unit {unit}; its units are 0..{(count or 0) - 1}"
        )
    if job.status == JOB_CANCELLED:
        raise CatalogueError(
            "failed_precondition",
            f"job {job_name!r} was cancelled, which is final; its units cannot be trained again",
        )
    return row, job


def reopen(session: Session, job: Job, now: float) -> None:
    """A job that had ended (done or failed) has work again."""
    if job.status in (JOB_DONE, JOB_FAILED):
        job.status = JOB_ACTIVE
        add_event(session, "job_reopened", f"job {job.name} active again", now, job=job.name)


def retry_unit(session: Session, job_name: str, unit: int, now: float) -> UnitRecord:
    """Give a failed unit fresh attempts; it resumes from its newest checkpoint."""
    row, job = _unit_for_change(session, job_name, unit)
    if row.status != UNIT_FAILED:
        hint = (
            "; to train it again, reset it to one of its checkpoints"
            if row.status == UNIT_DONE
            else ""
        )
        raise CatalogueError(
            "failed_precondition",
            f"unit {unit} of {job_name!r} is {row.status}, not failed; nothing to retry{hint}",
        )
    previous = row.last_error
    row.status, row.attempts, row.last_error = UNIT_PENDING, 0, ""
    reopen(session, job, now)
    add_event(
        session,
        "unit_retried",
        f"unit {unit} of {job.name} retried with new attempts (last error: {previous or '-'})",
        now,
        job=job.name,
        unit=unit,
    )
    return unit_record(row, job, None)


def reset_unit(
    session: Session, job_name: str, unit: int, checkpoint: str, now: float
) -> UnitRecord:
    """Train the unit again from `checkpoint` (one of its own, trusted, not final). Checkpoints
    at a later step, or others at the same step, are discarded: no lease resumes from them."""
    row, job = _unit_for_change(session, job_name, unit)
    target = resolve_checkpoint(session, checkpoint)
    if (target.job, target.unit) != (job.name, unit):
        raise CatalogueError(
            "invalid_argument",
            f"checkpoint {target.sha256[:12]} belongs to {target.job} unit {target.unit}, "
            f"not to {job.name} unit {unit}",
        )
    if not target.trusted:
        raise CatalogueError(
            "failed_precondition",
            f"checkpoint {target.sha256[:12]} was signed by revoked worker {target.worker_id}",
        )
    if target.final:
        raise CatalogueError(
            "failed_precondition",
            f"checkpoint {target.sha256[:12]} is the unit's final one (step {target.step}); "
            "reset to an earlier checkpoint to train again",
        )
    if target.corrupt:
        raise CatalogueError(
            "failed_precondition",
            f"checkpoint {target.sha256[:12]} is corrupt on the coordinator's disk; "
            "reset to another checkpoint of the unit",
        )
    for lease in active_leases(session, job_id=job.id):
        if lease.unit_id == row.id:
            cancel_lease(session, lease, f"unit reset to {target.sha256[:12]}", now)
    discarded = 0
    for ckpt in session.scalars(select(Checkpoint).where(Checkpoint.unit_id == row.id)):
        later = ckpt.step > target.step or (
            ckpt.step == target.step and ckpt.sha256 != target.sha256
        )
        discarded += later and not ckpt.discarded
        ckpt.discarded = later or ckpt.corrupt  # corrupt bytes stay out of use
    row.status, row.attempts, row.last_error = UNIT_PENDING, 0, ""
    reopen(session, job, now)
    add_event(
        session,
        "unit_reset",
        f"unit {unit} of {job.name} reset to step {target.step} ({target.sha256[:12]}); "
        f"{discarded} later checkpoint(s) discarded",
        now,
        job=job.name,
        unit=unit,
    )
    session.flush()
    return unit_record(row, job, None)


def resolve_checkpoint(session: Session, ref: str) -> CheckpointRecord:
    """The checkpoint whose digest is `ref` or starts with it (at least 8 hex digits)."""
    ref = ref.strip().lower()
    if not _HEX.fullmatch(ref) or not MIN_CHECKPOINT_PREFIX <= len(ref) <= 64:
        raise CatalogueError(
            "invalid_argument",
            f"{ref[:70]!r} is not a checkpoint digest: give its sha256, or at least "
            f"{MIN_CHECKPOINT_PREFIX} of its leading hex digits",
        )
    rows = session.execute(
        checkpoint_query().where(Checkpoint.sha256.startswith(ref)).limit(2)
    ).all()
    if not rows:
        raise CatalogueError(
            "not_found",
            f"no checkpoint with digest {ref}...; `tspace-coord checkpoints list` shows them",
        )
    if len(rows) > 1:
        raise CatalogueError(
            "conflict", f"digest prefix {ref} matches several checkpoints; give more digits"
        )
    return checkpoint_record(*rows[0])


def token_record(token: Token, now: float) -> TokenRecord:
    if token.revoked_at is not None:
        status = TOKEN_REVOKED
    elif token.used_at is not None:
        status = TOKEN_USED
    elif now >= token.expires_at:
        status = TOKEN_EXPIRED
    else:
        status = TOKEN_UNUSED
    return TokenRecord(
        token_id=token.token_hash[:TOKEN_ID_LENGTH],
        site=token.site,
        status=status,
        created_at=token.created_at,
        expires_at=token.expires_at,
        used_at=token.used_at,
        worker_id=token.worker_id,
    )


def list_tokens(session: Session, now: float) -> list[TokenRecord]:
    tokens = session.scalars(
        select(Token).order_by(Token.created_at.is_(None), Token.created_at, Token.token_hash)
    )
    return [token_record(t, now) for t in tokens]


def revoke_token(session: Session, token_id: str, now: float) -> TokenRecord:
    """Make an unused join token worthless; a used one is refused (revoke its worker)."""
    ref = token_id.strip().lower()
    if not _HEX.fullmatch(ref) or not MIN_TOKEN_PREFIX <= len(ref) <= 64:
        raise CatalogueError(
            "invalid_argument",
            f"{ref[:70]!r} is not a token id: give the id `tspace-coord tokens list` shows "
            f"(at least {MIN_TOKEN_PREFIX} hex digits)",
        )
    tokens = session.scalars(
        select(Token).where(Token.token_hash.startswith(ref)).limit(2).with_for_update()
    ).all()
    if not tokens:
        raise CatalogueError(
            "not_found", f"no join token {ref}; `tspace-coord tokens list` shows them"
        )
    if len(tokens) > 1:
        raise CatalogueError("conflict", f"token id {ref} matches several tokens; give more digits")
    token = tokens[0]
    shown = token.token_hash[:TOKEN_ID_LENGTH]
    if token.revoked_at is not None:
        raise CatalogueError("failed_precondition", f"join token {shown} is already revoked")
    if token.used_at is not None:
        raise CatalogueError(
            "failed_precondition",
            f"join token {shown} was already used by worker {token.worker_id}; "
            f"revoke the worker instead: `tspace-coord workers revoke {token.worker_id}`",
        )
    token.revoked_at = now
    add_event(session, "token_revoked", f"join token {shown} for site {token.site} revoked", now)
    return token_record(token, now)


def revoke_worker(session: Session, worker_id: str, now: float) -> Revocation:
    """Mark the worker revoked: its credential is refused and every checkpoint it signed reads as
    untrusted from now on. Whatever may descend from its work is trained again: in every unit
    where it signed a checkpoint still in use, that checkpoint and all later ones (whoever
    signed them: they may have resumed from it) are discarded, a done unit goes back to pending
    with fresh attempts (its job is active again), and another worker's lease on such a unit is
    cancelled. The units it was leasing go back to pending too. The next lease resumes from the
    newest trusted checkpoint before its first one. Units of cancelled jobs stay as they are."""
    worker = worker_row(session, worker_id)
    if worker.status == WORKER_REVOKED:
        raise CatalogueError("failed_precondition", f"worker {worker_id!r} is already revoked")
    worker.status = WORKER_REVOKED
    training: set[tuple[str, int]] = set()
    for lease in active_leases(session, worker_id=worker_id):
        cancel_lease(session, lease, "worker revoked", now)
        unit = session.get_one(Unit, lease.unit_id)
        training.add((session.get_one(Job, unit.job_id).name, unit.unit))
    tainted = _tainted(session, worker_id)
    if tainted:
        # Lock the jobs, as complete_unit does, so that no job is marked done meanwhile with a
        # unit about to go back to pending; then read the units again under the lock.
        ids = sorted({unit.job_id for unit, _, _ in tainted})
        session.scalars(
            select(Job)
            .where(Job.id.in_(ids))
            .order_by(Job.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).all()
        tainted = _tainted(session, worker_id)
    reopened: set[tuple[str, int]] = set()
    for unit, job, first_step in tainted:
        session.execute(
            update(Checkpoint)
            .where(
                Checkpoint.unit_id == unit.id,
                Checkpoint.step >= first_step,
                Checkpoint.discarded.is_(False),
            )
            .values(discarded=True)
        )
        for lease in active_leases(session, job_id=job.id):
            if lease.unit_id == unit.id:  # another worker, perhaps resumed from its checkpoint
                cancel_lease(session, lease, f"worker {worker_id} revoked", now)
                reopened.add((job.name, unit.unit))
        if unit.status == UNIT_DONE:
            unit.status, unit.attempts, unit.last_error = UNIT_PENDING, 0, ""
            reopen(session, job, now)
            reopened.add((job.name, unit.unit))
    reopened -= training
    requeued = tuple(sorted(training | reopened))
    counts = f"{len(training)} it was training, {len(reopened)} resting on checkpoints it signed"
    what = (
        f"{len(requeued)} unit(s) requeued to train again ({counts}): {_unit_names(requeued)}"
        if requeued
        else "no unit requeued"
    )
    add_event(
        session, "worker_revoked", f"worker {worker_id} revoked; {what}", now, worker_id=worker_id
    )
    signed = session.scalar(select(func.count()).where(Checkpoint.worker_id == worker_id))
    session.flush()
    return Revocation(
        worker=worker_records(session, [worker])[0], requeued=requeued, checkpoints=signed or 0
    )


def _tainted(session: Session, worker_id: str) -> list[tuple[Unit, Job, int]]:
    """Units of jobs not cancelled holding a checkpoint signed by `worker_id` that is still in
    use (not discarded), with the lowest step of those, by job name, then unit."""
    rows = session.execute(
        select(Unit, Job, func.min(Checkpoint.step))
        .join(Job, Unit.job_id == Job.id)
        .join(Checkpoint, Checkpoint.unit_id == Unit.id)
        .where(
            Checkpoint.worker_id == worker_id,
            Checkpoint.discarded.is_(False),
            Job.status != JOB_CANCELLED,
        )
        .group_by(Unit.id, Job.id)
        .order_by(Job.name, Unit.unit)
        .execution_options(populate_existing=True)
    ).all()
    return [(unit, job, int(step)) for unit, job, step in rows]


def _unit_names(units: Iterable[tuple[str, int]]) -> str:
    """Units for a message, grouped by job: [("a", 0), ("a", 2), ("b", 1)] reads "a units 0, 2;
    b unit 1"."""
    by_job: dict[str, list[int]] = {}
    for job, unit in units:
        by_job.setdefault(job, []).append(unit)
    return "; ".join(
        f"{job} unit{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"
        for job, numbers in by_job.items()
    )
