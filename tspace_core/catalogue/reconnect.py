"""Riding out a lost database connection: the retry budget and backoff of one transaction, and
the checks that tell whether a write whose COMMIT was cut off took effect."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from tspace_core.catalogue.errors import unavailable
from tspace_core.catalogue.models import Ensemble, Job, Lease, Token, Unit, Worker
from tspace_core.catalogue.records import (
    LEASE_ACTIVE,
    LEASE_COMPLETED,
    LEASE_FAILED,
    LeaseRecord,
    UnitRecord,
    WorkerRecord,
)
from tspace_core.catalogue.rows import lease_record, unit_record, worker_records

log = logging.getLogger("tspace.catalogue")


class Reconnect:
    """The waits of one transaction between attempts that lost the connection: capped,
    jittered exponential backoff, for at most `budget_s` seconds from the first loss."""

    def __init__(
        self,
        budget_s: float,
        first_delay_s: float,
        max_delay_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.budget_s, self.first_delay_s, self.max_delay_s = budget_s, first_delay_s, max_delay_s
        self._clock, self._sleep, self._rng = clock, sleep, rng
        self.started: float | None = None
        self.losses = 0

    def wait(self, error: BaseException) -> None:
        """Sleep before the next attempt, or raise the "unreachable" CatalogueError when the
        budget would run out first."""
        now = self._clock()
        if self.started is None:
            self.started = now
            log.warning(
                "lost the catalogue database (%s); retrying for up to %.0f s",
                _first_line(error),
                self.budget_s,
            )
        self.losses += 1
        cap = min(self.max_delay_s, self.first_delay_s * 2 ** (self.losses - 1))
        # Half fixed, half random: spread out, yet never a busy loop of instant retries.
        delay = cap * (0.5 + self._rng() / 2)
        spent = now - self.started
        if spent >= self.budget_s:
            log.warning(
                "the catalogue database stayed unreachable for %.1f s (%d attempts); giving up",
                spent,
                self.losses,
            )
            raise unavailable(_first_line(error)) from error
        self._sleep(min(delay, self.budget_s - spent))  # the last attempt ends the budget

    def recovered(self) -> None:
        """Log that a transaction got through after losing the connection."""
        if self.started is not None:
            log.info(
                "the catalogue database is back: a transaction got through after %d lost "
                "attempt(s) over %.1f s",
                self.losses,
                self._clock() - self.started,
            )


def _first_line(error: BaseException) -> str:
    orig = getattr(error, "orig", None)
    text = str(orig if orig is not None else error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# Checks run before a write is tried again after its COMMIT was cut off: each returns (result,)
# when that COMMIT took effect, None when the write must run again. They match on the `now` the
# call passed, which the write stored, so they find only what this very call wrote.


def acquired(worker_id: str, now: float) -> Callable[[Session], tuple[LeaseRecord] | None]:
    """The lease an `acquire` at `now` made: running it again would lease a second unit and
    leave this one held by a lease its worker never heard of until it expired."""

    def check(session: Session) -> tuple[LeaseRecord] | None:
        row = session.execute(
            select(Lease, Job.name, Unit.unit)
            .join(Unit, Lease.unit_id == Unit.id)
            .join(Job, Unit.job_id == Job.id)
            .where(
                Lease.worker_id == worker_id,
                Lease.status == LEASE_ACTIVE,
                Lease.updated_at == now,
            )
        ).first()
        return None if row is None else (lease_record(row[0], row[1], row[2]),)

    return check


def completed(
    lease_id: str, worker_id: str, sha256: str, now: float
) -> Callable[[Session], tuple[str | None] | None]:
    """A `complete_unit` at `now` that took effect: run again it would be refused (the lease
    has ended). Its result is the ensemble it registered, if it finished the job."""

    def check(session: Session) -> tuple[str | None] | None:
        lease = session.get(Lease, lease_id)
        if lease is None or (lease.worker_id, lease.status, lease.checkpoint_sha256) != (
            worker_id,
            LEASE_COMPLETED,
            sha256,
        ):
            return None
        if lease.updated_at != now:
            return None
        unit = session.get_one(Unit, lease.unit_id)
        ensemble = session.scalar(
            select(Ensemble.name).where(Ensemble.job_id == unit.job_id, Ensemble.created_at == now)
        )
        return (ensemble,)

    return check


def lease_failed(
    lease_id: str, worker_id: str, now: float
) -> Callable[[Session], tuple[UnitRecord] | None]:
    """A `fail_lease` at `now` that took effect: run again it would be refused."""

    def check(session: Session) -> tuple[UnitRecord] | None:
        lease = session.get(Lease, lease_id)
        if lease is None or (lease.worker_id, lease.status, lease.updated_at) != (
            worker_id,
            LEASE_FAILED,
            now,
        ):
            return None
        unit = session.get_one(Unit, lease.unit_id)
        return (unit_record(unit, session.get_one(Job, unit.job_id), None),)

    return check


def registered(
    token_hash: str, credential_hash: str
) -> Callable[[Session], tuple[WorkerRecord] | None]:
    """A `register_worker` that took effect: run again it would find its token used."""

    def check(session: Session) -> tuple[WorkerRecord] | None:
        worker = session.scalar(select(Worker).where(Worker.credential_hash == credential_hash))
        token = session.get(Token, token_hash)
        if worker is None or token is None or token.worker_id != worker.worker_id:
            return None
        return (worker_records(session, [worker])[0],)

    return check


def enrolled(token_hash: str, now: float) -> Callable[[Session], tuple[None] | None]:
    """An `add_token` at `now` that took effect: run again it would be refused as a duplicate."""

    def check(session: Session) -> tuple[None] | None:
        token = session.get(Token, token_hash)
        return (None,) if token is not None and token.created_at == now else None

    return check
