"""The catalogue's one entry point: every method is one transaction and returns records.

The coordinator is the only writer, but it serves RPCs from a thread pool, so a Catalogue keeps
one engine and opens a session per call; it is safe to share between threads. Times are the
coordinator's clock, passed in as `now` (float Unix seconds); nothing here reads a clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from tspace_core.catalogue import enrolment, operator, reconnect, results, scheduling
from tspace_core.catalogue.engine import WRITE_OPTION, is_busy, is_disconnect, make_engine, upgrade
from tspace_core.catalogue.errors import CatalogueError, unavailable
from tspace_core.catalogue.records import (
    AliasRecord,
    Beat,
    CheckpointRecord,
    CorruptCheckpoint,
    EnsembleRecord,
    EventRecord,
    JobRecord,
    LeaseRecord,
    Revocation,
    ShardRecord,
    TokenRecord,
    UnitRecord,
    WorkerRecord,
)
from tspace_core.catalogue.selection import choose_members

__all__ = ["Catalogue", "CatalogueError"]

T = TypeVar("T")
# A transaction that lost a race (a unique key inserted meanwhile, a PostgreSQL deadlock or
# serialisation failure) is run again from the start; the rerun sees the winner's rows.
RETRIES = 3
RETRYABLE_SQLSTATES = {"40001", "40P01"}
# A transaction that lost the database (a server restart, failover or dropped connection) is
# run again with capped, jittered backoff for up to RECONNECT_BUDGET_S seconds from the first
# loss, then fails as "unavailable" (UNAVAILABLE to RPC callers, who retry). The budget stays
# under a worker's 30 s deadline per call, so the worker hears that clear error, not a timeout.
RECONNECT_BUDGET_S = 20.0
RECONNECT_FIRST_DELAY_S = 0.1
RECONNECT_MAX_DELAY_S = 2.0


class Catalogue:
    """Jobs, units, leases, workers, checkpoints, ensembles and events in one SQL database."""

    def __init__(self, url: str, reconnect_budget_s: float = RECONNECT_BUDGET_S) -> None:
        """Open the catalogue at `url` (sqlite:///PATH or postgresql+psycopg://...) and migrate
        it to the newest schema. A transaction that loses the database is retried for up to
        `reconnect_budget_s` seconds."""
        self.url = url
        self.reconnect_budget_s = reconnect_budget_s
        # Transactions that lost the database and were retried, whatever became of them.
        self.lost_transactions = 0
        self._count_lock = threading.Lock()
        self._engine = make_engine(url)
        try:
            upgrade(self._engine)
        except OperationalError as e:
            self._engine.dispose()
            shown = self._engine.url.render_as_string(hide_password=True)
            raise CatalogueError(
                "failed_precondition",
                f"cannot open the catalogue at {shown}: {e.orig}; "
                "check that the database server is running and the URL is right",
            ) from e
        except BaseException:
            self._engine.dispose()
            raise
        self._writer = self._engine.execution_options(**{WRITE_OPTION: True})

    def close(self) -> None:
        """Close every pooled connection; the catalogue is unusable afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(
        self,
        work: Callable[[Session], T],
        *,
        write: bool = True,
        recover: Callable[[Session], tuple[T] | None] | None = None,
    ) -> T:
        """Run `work` in one transaction; run it again from the start when it lost a race
        (RETRIES times in all) or the database connection (for the reconnect budget).

        A connection lost before COMMIT rolled the transaction back. One lost during COMMIT
        leaves the outcome unknown, and running `work` again must then be harmless: reads are;
        heartbeat, touch_worker, expire_leases and set_alias write the same values again or
        find nothing left to do; add_checkpoint and create_job are idempotent (by digest, by
        name and hash), add_checkpoint then answering (record, False); the operator's changes
        (change_job, revoke_*, retry_unit, register_*) are refused as already made, so the
        operator sees a refusal for a change that did happen (a listing shows it); reset_unit
        runs again, repeating the reset (a second event, and a lease granted on the unit in
        between cancelled); add_event may log its event twice. The writes that would wrongly be
        refused (complete_unit, fail_lease, register_worker, add_token) or repeated (acquire,
        which would lease a second unit) pass `recover`: once an outcome is unknown it runs
        first and returns (result,) when that COMMIT took effect.
        """
        races, outcome_unknown = 0, False
        backend = self._engine.dialect.name
        wait = reconnect.Reconnect(
            self.reconnect_budget_s, RECONNECT_FIRST_DELAY_S, RECONNECT_MAX_DELAY_S
        )
        while True:
            committing = False
            try:
                bind = self._writer if write else self._engine
                with Session(bind) as session, session.begin():
                    done = recover(session) if recover is not None and outcome_unknown else None
                    result = done[0] if done is not None else work(session)
                    committing = True
                wait.recovered()
                return result
            except DBAPIError as e:
                if is_disconnect(e, backend):
                    outcome_unknown = outcome_unknown or committing
                    if wait.losses == 0:
                        with self._count_lock:
                            self.lost_transactions += 1
                    wait.wait(e)  # raises the "unreachable" error once the budget is spent
                    continue
                if is_busy(e, backend):
                    raise unavailable(str(e.orig), busy=True) from e
                race = isinstance(e, IntegrityError) or (
                    isinstance(e, OperationalError)
                    and getattr(e.orig, "sqlstate", None) in RETRYABLE_SQLSTATES
                )
                races += 1
                if not race or races == RETRIES:
                    raise

    # Enrolment and workers.

    def add_token(self, token_hash: str, site: str, expires_at: float, now: float) -> None:
        """Enrol a one-time join token (stored by its hash) for `site`."""
        self._run(
            lambda s: enrolment.add_token(s, token_hash, site, expires_at, now),
            recover=reconnect.enrolled(token_hash, now),
        )

    def list_tokens(self, now: float) -> list[TokenRecord]:
        """Every join token, oldest first, with its status at `now`."""
        return self._run(lambda s: operator.list_tokens(s, now), write=False)

    def revoke_token(self, token_id: str, now: float) -> TokenRecord:
        """Revoke the unused token whose id (hash prefix, >= 6 hex digits) is `token_id`."""
        return self._run(lambda s: operator.revoke_token(s, token_id, now))

    def register_worker(
        self,
        token_hash: str,
        public_key: bytes,
        key_id: str,
        credential_hash: str,
        device: str,
        hostname: str,
        now: float,
    ) -> WorkerRecord:
        """Consume a join token and register a worker's key and session credential."""
        return self._run(
            lambda s: enrolment.register_worker(
                s, token_hash, public_key, key_id, credential_hash, device, hostname, now
            ),
            recover=reconnect.registered(token_hash, credential_hash),
        )

    def worker_by_credential(self, credential_hash: str) -> WorkerRecord | None:
        """The worker holding this session credential (revoked ones too), or None."""
        return self._run(lambda s: enrolment.worker_by_credential(s, credential_hash), write=False)

    def touch_worker(self, worker_id: str, now: float) -> None:
        """Record that the worker was seen at `now`."""
        self._run(lambda s: enrolment.touch_worker(s, worker_id, now))

    def list_workers(self) -> list[WorkerRecord]:
        return self._run(enrolment.list_workers, write=False)

    def get_worker(self, worker_id: str) -> WorkerRecord:
        return self._run(lambda s: enrolment.get_worker(s, worker_id), write=False)

    def revoke_worker(self, worker_id: str, now: float) -> Revocation:
        """Revoke a worker: its checkpoints become untrusted and it can lease no more units. The
        units it was training go back to pending, and so do done units completed with a
        checkpoint it signed (their jobs reopen); the revocation names them all. Refused when
        already revoked."""
        return self._run(lambda s: operator.revoke_worker(s, worker_id, now))

    # Jobs and units.

    def create_job(
        self,
        name: str,
        job_hash: str,
        spec_json: str,
        units: Sequence[Sequence[int]],
        total_steps: int,
        shards: Sequence[ShardRecord],
        now: float,
    ) -> JobRecord:
        """Create a job whose unit i trains `units[i]`; the same name and hash again returns the
        existing job unchanged, the same name with another hash is refused."""
        return self._run(
            lambda s: scheduling.create_job(
                s, name, job_hash, spec_json, units, total_steps, shards, now
            )
        )

    def get_job(self, name: str) -> JobRecord:
        return self._run(lambda s: scheduling.get_job(s, name), write=False)

    def list_jobs(self) -> list[JobRecord]:
        """Every job, oldest first, with its unit counts."""
        return self._run(scheduling.list_jobs, write=False)

    def units(self, job: str | None = None) -> list[UnitRecord]:
        """Units (of one job, or all), with the progress of their active leases."""
        return self._run(lambda s: scheduling.units(s, job), write=False)

    def change_job(self, name: str, action: str, now: float) -> JobRecord:
        """Pause (running leases are cancelled, units keep their checkpoints), resume or cancel
        (final) a job; a job in the wrong state for `action` is refused."""
        return self._run(lambda s: operator.change_job(s, name, action, now))

    def retry_unit(self, job: str, unit: int, now: float) -> UnitRecord:
        """Give a failed unit fresh attempts (a failed job becomes active again)."""
        return self._run(lambda s: _with_progress(s, operator.retry_unit(s, job, unit, now)))

    def reset_unit(self, job: str, unit: int, checkpoint: str, now: float) -> UnitRecord:
        """Train a unit again from one of its checkpoints (digest or prefix); later ones are
        discarded and a lease running on the unit is cancelled."""
        return self._run(
            lambda s: _with_progress(s, operator.reset_unit(s, job, unit, checkpoint, now))
        )

    # Leases.

    def acquire(
        self,
        worker_id: str,
        now: float,
        ttl: float,
        choose: Callable[[list[UnitRecord]], UnitRecord | None],
    ) -> LeaseRecord | None:
        """Lease the pending unit `choose` picks (a pure policy) for `ttl` seconds; None when no
        unit is pending or `choose` picks none. No unit is ever leased twice at once."""
        return self._run(
            lambda s: scheduling.acquire(s, worker_id, now, ttl, choose),
            recover=reconnect.acquired(worker_id, now),
        )

    def heartbeat(
        self,
        lease_id: str,
        worker_id: str,
        now: float,
        ttl: float,
        step: int,
        loss: float,
        images_per_s: float,
    ) -> LeaseRecord:
        """Record progress and extend an active lease to at least now + ttl; the lease after."""
        return self._run(
            lambda s: scheduling.heartbeat(
                s, lease_id, worker_id, now, ttl, step, loss, images_per_s
            )
        )

    def beat_many(self, beats: Sequence[Beat]) -> list[CatalogueError | None]:
        """`heartbeat` without reading the leases back, for many beats in one transaction
        (one commit, one fsync, instead of one each; the coordinator's hot path); each beat's
        outcome, in order: None, or the error `heartbeat` would have raised for it."""

        def work(session: Session) -> list[CatalogueError | None]:
            outcomes: list[CatalogueError | None] = []
            for b in beats:
                try:
                    scheduling.beat(session, *b)
                    outcomes.append(None)
                except CatalogueError as e:  # raised before any write of its own
                    outcomes.append(e)
            return outcomes

        return self._run(work)

    def get_lease(self, lease_id: str) -> LeaseRecord:
        return self._run(lambda s: scheduling.get_lease(s, lease_id), write=False)

    def expire_leases(self, now: float, max_attempts: int) -> list[LeaseRecord]:
        """Expire active leases past their expiry; each unit goes back to pending, or to failed
        once it has had `max_attempts` leases. Logs a "lease_expired" event per lease."""
        return self._run(lambda s: scheduling.expire_leases(s, now, max_attempts))

    def grant_grace(self, until: float) -> int:
        """Let every active lease live until at least `until`; returns how many were extended.
        A restarted coordinator calls it so that workers which trained on while it was down
        get one lease TTL to check in before their leases expire."""
        return self._run(lambda s: scheduling.grant_grace(s, until))

    def fail_lease(
        self, lease_id: str, worker_id: str, error: str, now: float, max_attempts: int
    ) -> UnitRecord:
        """End a lease the worker gave up on; requeue or fail the unit as `expire_leases` does.
        Logs a "lease_failed" event and returns the unit."""
        return self._run(
            lambda s: scheduling.fail_lease(s, lease_id, worker_id, error, now, max_attempts),
            recover=reconnect.lease_failed(lease_id, worker_id, now),
        )

    # Checkpoints, completion and ensembles.

    def add_checkpoint(self, rec: CheckpointRecord) -> tuple[CheckpointRecord, bool]:
        """Record a verified checkpoint of an existing unit; (record, created). Idempotent by
        digest: a known, trusted sha256 returns (existing record, False). A known one that is
        untrusted or discarded, reproduced by an active worker (same job, unit and step), is
        re-attributed to that worker: (record, True), logged as "checkpoint_reattributed"."""
        return self._run(lambda s: results.add_checkpoint(s, rec))

    def get_checkpoint(self, sha256: str) -> CheckpointRecord:
        return self._run(lambda s: results.get_checkpoint(s, sha256), write=False)

    def mark_corrupt(
        self, sha256: str, problem: str, now: float, fetcher: str | None = None
    ) -> CorruptCheckpoint:
        """Record that checkpoint `sha256`'s blob failed its digest (`problem` says how): it is
        marked corrupt and discarded, a done unit whose completion rests on it is requeued, and
        the lease of `fetcher` (a worker that could not fetch it to resume) on its unit is
        cancelled with the attempt given back. Logs "checkpoint_corrupt" the first time."""
        return self._run(lambda s: results.mark_corrupt(s, sha256, problem, now, fetcher))

    def resolve_checkpoint(self, ref: str) -> CheckpointRecord:
        """The checkpoint whose digest is `ref` or starts with it (>= 8 hex digits)."""
        return self._run(lambda s: operator.resolve_checkpoint(s, ref), write=False)

    def newest_checkpoint(self, job: str, unit: int) -> CheckpointRecord | None:
        """The unit's trusted, verified checkpoint with the highest step: where to resume."""
        return self._run(lambda s: results.newest_checkpoint(s, job, unit), write=False)

    def list_checkpoints(
        self, job: str | None = None, unit: int | None = None, worker_id: str | None = None
    ) -> list[CheckpointRecord]:
        """Checkpoints in job, unit and step order, optionally of one job, unit or signer."""
        return self._run(lambda s: results.list_checkpoints(s, job, unit, worker_id), write=False)

    def complete_unit(self, lease_id: str, worker_id: str, sha256: str, now: float) -> str | None:
        """Mark the lease's unit done with its final checkpoint `sha256`. When it was the job's
        last unit, the job is done and ensemble "<job>:final" registered: its name is returned
        (and a "job_done" event logged); otherwise None."""
        return self._run(
            lambda s: results.complete_unit(s, lease_id, worker_id, sha256, now),
            recover=reconnect.completed(lease_id, worker_id, sha256, now),
        )

    def register_ensemble(
        self, name: str, job: str, members: Mapping[int, str], now: float
    ) -> EnsembleRecord:
        """Register `name` as the ensemble {unit: checkpoint sha256} covering every unit of job."""
        return self._run(lambda s: results.register_ensemble(s, name, job, members, now))

    def register_selected(
        self, name: str, job: str, rule: str, picks: Mapping[int, str], now: float
    ) -> EnsembleRecord:
        """Register `name` from job's checkpoints chosen by `rule` (see selection.RULES), with
        `picks` ({unit: digest or prefix}) overriding the rule for their units."""

        def work(s: Session) -> EnsembleRecord:
            units = [u.unit for u in scheduling.units(s, job)]
            chosen = {u: operator.resolve_checkpoint(s, ref) for u, ref in picks.items()}
            members = choose_members(units, results.list_checkpoints(s, job), rule, chosen)
            record = results.register_ensemble(s, name, job, members, now)
            enrolment.add_event(
                s, "ensemble_registered", f"ensemble {name} of {job} ({rule})", now, job=job
            )
            return record

        return self._run(work)

    def get_ensemble(self, name: str) -> EnsembleRecord:
        """The ensemble named `name`, or the one the alias `name` points at."""
        return self._run(lambda s: results.get_ensemble(s, name), write=False)

    def list_ensembles(self) -> list[EnsembleRecord]:
        return self._run(results.list_ensembles, write=False)

    def set_alias(self, alias: str, ensemble: str, now: float) -> AliasRecord:
        """Point `alias` at an ensemble; an existing alias moves."""
        return self._run(lambda s: results.set_alias(s, alias, ensemble, now))

    def list_aliases(self) -> list[AliasRecord]:
        return self._run(results.list_aliases, write=False)

    # Events.

    def add_event(
        self,
        kind: str,
        message: str,
        now: float,
        job: str | None = None,
        unit: int | None = None,
        worker_id: str | None = None,
    ) -> None:
        self._run(lambda s: enrolment.add_event(s, kind, message, now, job, unit, worker_id))

    def events(self, limit: int = 50) -> list[EventRecord]:
        """The newest `limit` events, newest first."""
        return self._run(lambda s: enrolment.events(s, limit), write=False)


def _with_progress(session: Session, unit: UnitRecord) -> UnitRecord:
    """`unit` as `units()` reads it: with its lease's progress and newest checkpoint."""
    return next(u for u in scheduling.units(session, unit.job) if u.unit == unit.unit)
