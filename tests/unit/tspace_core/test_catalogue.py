"""Contract tests for tspace_core.catalogue, run against a SQLite file and a real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from tspace_core.catalogue import (
    JOB_ACTIVE,
    JOB_DONE,
    JOB_FAILED,
    LEASE_ACTIVE,
    LEASE_COMPLETED,
    LEASE_EXPIRED,
    LEASE_FAILED,
    UNIT_DONE,
    UNIT_FAILED,
    UNIT_LEASED,
    UNIT_PENDING,
    WORKER_ACTIVE,
    WORKER_REVOKED,
    Beat,
    Catalogue,
    CatalogueError,
    CheckpointRecord,
    EnsembleMemberRecord,
    EnsembleRecord,
    EventRecord,
    JobRecord,
    LeaseRecord,
    ShardRecord,
    UnitRecord,
    WorkerRecord,
    migrate,
    sqlite_url,
)
from tspace_core.catalogue.engine import alembic_config
from tspace_core.catalogue.models import Base
from tspace_core.catalogue.scheduling import ACQUIRE_WINDOW

T0 = 1_700_000_000.0
TTL = 30.0
UNITS = [[999, 899], [799, 699], [599]]
SHARDS = [
    ShardRecord("shard-00000.safetensors", "a" * 64, 1000, 10),
    ShardRecord("s1", "b" * 64, 5, 1),
]


# --- helpers ---


def first(units: list[UnitRecord]) -> UnitRecord | None:
    return units[0] if units else None


def add_job(cat: Catalogue, name: str = "digits", units: list[list[int]] = UNITS) -> None:
    cat.create_job(name, "hash-" + name, json.dumps({"name": name}), units, 500, SHARDS, T0)


def enrol(cat: Catalogue, key: str = "k1", site: str = "site-a") -> WorkerRecord:
    token = hashlib.sha256(key.encode()).hexdigest()
    cat.add_token(token, site, T0 + 3600, T0)
    return cat.register_worker(token, b"pk-" + key.encode(), key, "cred-" + key, "cpu", "host", T0)


def checkpoint(
    worker: WorkerRecord, unit: int, step: int, final: bool = False, job: str = "digits"
) -> CheckpointRecord:
    sha = hashlib.sha256(f"{job}/{unit}/{step}/{final}/{worker.key_id}".encode()).hexdigest()
    return CheckpointRecord(
        sha256=sha,
        size=1234,
        job=job,
        unit=unit,
        step=step,
        final=final,
        statement=b'{"step": %d}' % step,
        signature=b"\x00sig",
        worker_id=worker.worker_id,
        key_id=worker.key_id,
        public_key=worker.public_key,
        created_at=T0 + step,
        attempt=1,
        metrics={"loss": 0.5, "steps": [1, 2]},
        shards_seen=("s0", "s1"),
    )


def refused(
    code: str, call: Callable[..., object], *args: Any, match: str | None = None
) -> CatalogueError:
    """Assert that call(*args) raises a CatalogueError with `code`, and return it."""
    with pytest.raises(CatalogueError, match=match) as excinfo:
        call(*args)
    assert excinfo.value.code == code
    return excinfo.value


def in_threads(target: Callable[..., None], args: list[tuple[Any, ...]]) -> None:
    """Run target(*a) for each a in its own thread, all released at once; re-raise any error."""
    start, errors = threading.Barrier(len(args)), []

    def run(*a: Any) -> None:
        try:
            start.wait()
            target(*a)
        except BaseException as e:  # a thread cannot fail the test itself
            errors.append(e)

    threads = [threading.Thread(target=run, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --- schema and lifetime ---


def test_migrations_match_models(url: str) -> None:
    migrate(url)
    migrate(url)  # a second upgrade is a no-op
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn)
            assert compare_metadata(context, Base.metadata) == []
            head = ScriptDirectory.from_config(alembic_config()).get_current_head()
            assert context.get_current_revision() == head == "0003"
    finally:
        engine.dispose()


def test_restart_sees_all_state(url: str) -> None:
    with Catalogue(url) as cat:
        add_job(cat)
        worker = enrol(cat)
        lease = cat.acquire(worker.worker_id, T0, TTL, first)
        assert lease is not None
        cat.heartbeat(lease.lease_id, worker.worker_id, T0 + 1, TTL, 7, 0.25, 99.0)
        cat.add_checkpoint(checkpoint(worker, 0, 7))
        cat.add_event("note", "hello", T0 + 2)
        before = (cat.list_jobs(), cat.units(), cat.list_workers(), cat.list_checkpoints())
        events = cat.events()
    with Catalogue(url) as again:
        after = (again.list_jobs(), again.units(), again.list_workers(), again.list_checkpoints())
        assert after == before
        assert again.events() == events
        assert again.get_lease(lease.lease_id).step == 7
        used = hashlib.sha256(b"k1").hexdigest()
        refused("unauthenticated", join, again, used, "k9", match="already used")


def test_bad_urls_and_codes_are_refused() -> None:
    for bad in ["sqlite://", "sqlite:///:memory:", "mysql://x@y/z", "::not a url::"]:
        refused("invalid_argument", Catalogue, bad)
    unreachable = "postgresql+psycopg://nobody:secret@127.0.0.1:1/none?connect_timeout=2"
    error = refused(
        "failed_precondition", Catalogue, unreachable, match="cannot open the catalogue"
    )
    assert "secret" not in str(error)
    with pytest.raises(ValueError, match="unknown catalogue error code"):
        CatalogueError("oops", "x")


def test_sqlite_is_wal_with_foreign_keys(tmp_path: Path) -> None:
    with Catalogue(sqlite_url(tmp_path / "c.db")) as cat, cat._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert (conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000


# --- enrolment ---


def join(cat: Catalogue, token: str, key: str, now: float = T0) -> WorkerRecord:
    return cat.register_worker(token, b"pk", key, "cred-" + key, "cuda:0", "gpu1", now)


def test_register_worker_consumes_the_token_once(cat: Catalogue) -> None:
    cat.add_token("t1", "site-a", T0 + 60, T0)
    refused("already_exists", cat.add_token, "t1", "site-b", T0 + 60, T0)
    worker = join(cat, "t1", "key-1")
    assert re.fullmatch(r"w-[0-9a-f]{12}", worker.worker_id)
    expected = WorkerRecord(
        worker.worker_id, "site-a", b"pk", "key-1", WORKER_ACTIVE, "cuda:0", "gpu1", T0, T0
    )
    assert worker == expected
    refused("unauthenticated", join, cat, "t1", "key-2", match="join token already used")
    refused("unauthenticated", join, cat, "nope", "key-2", match="unknown join token")


def test_expired_token_and_duplicate_key_are_refused(cat: Catalogue) -> None:
    cat.add_token("t1", "site-a", T0 + 60, T0)
    refused("unauthenticated", join, cat, "t1", "key-1", T0 + 60, match="join token expired")
    enrol(cat, "key-1")
    refused("already_exists", join, cat, "t1", "key-1")
    # The refused registration rolled back: the token is still unused.
    assert join(cat, "t1", "key-2").key_id == "key-2"


def test_worker_lookups(cat: Catalogue) -> None:
    a, b = enrol(cat, "ka"), enrol(cat, "kb", site="site-b")
    assert cat.worker_by_credential("cred-kb") == b
    assert cat.worker_by_credential("missing") is None
    cat.touch_worker(a.worker_id, T0 + 50)
    assert cat.get_worker(a.worker_id) == replace(a, last_seen=T0 + 50)
    # Registered at the same time: listed by worker id.
    assert [w.worker_id for w in cat.list_workers()] == sorted([a.worker_id, b.worker_id])
    refused("not_found", cat.get_worker, "w-0")
    refused("not_found", cat.touch_worker, "w-0", T0)


# --- jobs and units ---


def test_create_job_is_idempotent_by_hash(cat: Catalogue) -> None:
    job = cat.create_job("digits", "h1", "{}", UNITS, 500, SHARDS, T0)
    assert job == JobRecord("digits", "h1", "{}", JOB_ACTIVE, 500, T0, tuple(SHARDS), 3, 0, 0)
    assert cat.create_job("digits", "h1", "{}", [[1]], 9, [], T0 + 5) == job
    assert cat.get_job("digits") == job
    refused("already_exists", cat.create_job, "digits", "h2", "{}", UNITS, 500, SHARDS, T0)
    for units, steps in [([], 5), ([[1], []], 5), ([[1]], 0)]:
        refused("invalid_argument", cat.create_job, "bad", "h", "{}", units, steps, [], T0)
    refused("not_found", cat.get_job, "bad")


def test_units_and_job_counts(cat: Catalogue) -> None:
    add_job(cat, "a")
    add_job(cat, "b", [[5]])
    assert cat.units("a") == [
        UnitRecord("a", i, tuple(t), UNIT_PENDING, 0, 500) for i, t in enumerate(UNITS)
    ]
    assert [(u.job, u.unit) for u in cat.units()] == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    assert [(j.name, j.units) for j in cat.list_jobs()] == [("a", 3), ("b", 1)]
    refused("not_found", cat.units, "zzz")


# --- leases ---


def test_acquire_leases_pending_units(cat: Catalogue) -> None:
    add_job(cat)
    worker = enrol(cat).worker_id
    offered: list[list[int]] = []

    def last(units: list[UnitRecord]) -> UnitRecord:
        offered.append([u.unit for u in units])
        return units[-1]

    lease = cat.acquire(worker, T0, TTL, last)
    assert lease is not None and re.fullmatch(r"l-[0-9a-f]{16}", lease.lease_id)
    assert lease == LeaseRecord(lease.lease_id, "digits", 2, worker, 1, T0 + TTL, LEASE_ACTIVE)
    unit = cat.units("digits")[2]
    assert (unit.status, unit.attempts, unit.lease_id, unit.worker_id) == (
        UNIT_LEASED,
        1,
        lease.lease_id,
        worker,
    )
    assert cat.acquire(worker, T0, TTL, lambda units: None) is None
    assert [u.status for u in cat.units()] == [UNIT_PENDING, UNIT_PENDING, UNIT_LEASED]
    assert cat.acquire(worker, T0, TTL, last) is not None
    assert cat.acquire(worker, T0, TTL, last) is not None
    assert cat.acquire(worker, T0, TTL, last) is None  # nothing pending
    assert offered == [[0, 1, 2], [0, 1], [0]]
    refused("not_found", cat.acquire, "w-0", T0, TTL, first)
    refused("invalid_argument", cat.acquire, worker, T0, 0, first)


def test_acquire_offers_a_window_fewest_attempts_first(cat: Catalogue) -> None:
    n_units = ACQUIRE_WINDOW * 2 + 3
    add_job(cat, units=[[i] for i in range(n_units)])
    worker = enrol(cat).worker_id
    # Units 5 and 6 have had an attempt each (failed once), so they come after the fresh ones.
    for unit in (5, 6):
        lease = cat.acquire(worker, T0, TTL, lambda us, u=unit: next(x for x in us if x.unit == u))
        assert lease is not None and lease.unit == unit
        cat.fail_lease(lease.lease_id, worker, "x", T0, max_attempts=5)
    offered: list[list[tuple[int, int]]] = []

    def refuse_first_window(units: list[UnitRecord]) -> UnitRecord | None:
        offered.append([(u.attempts, u.unit) for u in units])
        return units[0]

    fresh = [(0, u) for u in range(n_units) if u not in (5, 6)]
    leased = []
    for _ in range(n_units):
        lease = cat.acquire(worker, T0, TTL, refuse_first_window)
        assert lease is not None
        leased.append(lease.unit)
    assert cat.acquire(worker, T0, TTL, refuse_first_window) is None
    # Every unit leased once, fewest attempts first, each time from a window of the best ones.
    assert leased == [u for _, u in fresh] + [5, 6]
    assert offered[0] == fresh[:ACQUIRE_WINDOW]
    assert all(len(window) <= ACQUIRE_WINDOW for window in offered)
    assert offered[-1] == [(1, 6)]


def test_heartbeat_extends_and_reports_progress(cat: Catalogue) -> None:
    add_job(cat)
    a, b = enrol(cat, "ka").worker_id, enrol(cat, "kb").worker_id
    lease = cat.acquire(a, T0, TTL, first)
    assert lease is not None
    beat = cat.heartbeat(lease.lease_id, a, T0 + TTL, TTL, 42, 0.125, 310.5)
    assert beat == replace(lease, expires_at=T0 + 2 * TTL, step=42, loss=0.125, images_per_s=310.5)
    assert cat.get_lease(lease.lease_id) == beat
    unit = cat.units("digits")[0]
    assert (unit.step, unit.loss, unit.images_per_s) == (42, 0.125, 310.5)
    beat_args = (TTL, 1, 0.0, 0.0)
    refused("failed_precondition", cat.heartbeat, lease.lease_id, b, T0 + 1, *beat_args)
    refused("not_found", cat.heartbeat, "l-0", a, T0, *beat_args)
    refused("not_found", cat.get_lease, "l-0")


def test_beat_many_gives_each_beat_its_own_outcome(cat: Catalogue) -> None:
    add_job(cat)
    a, b = enrol(cat, "ka").worker_id, enrol(cat, "kb").worker_id
    good, ended = cat.acquire(a, T0, TTL, first), cat.acquire(a, T0, TTL, first)
    assert good is not None and ended is not None
    cat.fail_lease(ended.lease_id, a, "boom", T0, max_attempts=3)
    outcomes = cat.beat_many(
        [
            Beat(good.lease_id, a, T0 + 1, TTL, 5, 0.5, 10.0),
            Beat(ended.lease_id, a, T0 + 1, TTL, 5, 0.5, 10.0),
            Beat(good.lease_id, b, T0 + 1, TTL, 6, 0.5, 10.0),
            Beat("l-0000000000000000", a, T0 + 1, TTL, 5, 0.5, 10.0),
            Beat(good.lease_id, a, T0 + 2, TTL, 7, 0.25, 20.0),
        ]
    )
    assert outcomes[0] is None and outcomes[4] is None
    codes = [(o.code, str(o)) for o in outcomes[1:4] if o is not None]
    assert [c for c, _ in codes] == ["failed_precondition", "failed_precondition", "not_found"]
    assert "has ended (failed)" in codes[0][1] and "held by another worker" in codes[1][1]
    # The refused beats wrote nothing; the good ones landed in order.
    assert cat.get_lease(good.lease_id) == replace(
        good, expires_at=T0 + 2 + TTL, step=7, loss=0.25, images_per_s=20.0
    )
    assert cat.get_lease(ended.lease_id).step == 0


def test_expire_requeues_until_attempts_are_exhausted(cat: Catalogue) -> None:
    add_job(cat, units=[[9]])
    worker = enrol(cat).worker_id
    lease = cat.acquire(worker, T0, TTL, first)
    assert lease is not None
    assert cat.expire_leases(T0 + TTL, max_attempts=2) == []  # due, not yet past
    assert cat.expire_leases(T0 + TTL + 1, max_attempts=2) == [replace(lease, status=LEASE_EXPIRED)]
    assert cat.units() == [UnitRecord("digits", 0, (9,), UNIT_PENDING, 1, 500, "lease expired")]
    args = (lease.lease_id, worker, T0 + 1, TTL, 1, 0.0, 0.0)
    refused("failed_precondition", cat.heartbeat, *args, match="ended")
    second = cat.acquire(worker, T0 + 100, TTL, first)
    assert second is not None and second.attempt == 2
    assert [x.lease_id for x in cat.expire_leases(T0 + 200, max_attempts=2)] == [second.lease_id]
    assert cat.units() == [UnitRecord("digits", 0, (9,), UNIT_FAILED, 2, 500, "lease expired")]
    assert cat.acquire(worker, T0 + 300, TTL, first) is None
    # Its only unit is out of attempts: the job has failed, until an operator retries the unit.
    assert (cat.get_job("digits").units_failed, cat.get_job("digits").status) == (1, JOB_FAILED)
    kinds = [(e.kind, e.job, e.unit, e.worker_id) for e in cat.events()]
    expired, leased = ("lease_expired", "digits", 0, worker), ("unit_leased", "digits", 0, worker)
    assert kinds == [("job_failed", "digits", None, None), expired, leased, expired, leased]
    assert "unit failed" in cat.events()[1].message
    assert cat.events()[2].message == f"unit 0 of digits to {worker} (attempt 2)"


def test_only_the_reaper_expires_and_a_beat_never_shortens_a_lease(cat: Catalogue) -> None:
    add_job(cat, units=[[9]])
    worker = enrol(cat).worker_id
    lease = cat.acquire(worker, T0, TTL, first)
    assert lease is not None
    # Past its expiry but not yet reaped (a beat held up by a database outage): extended.
    late = cat.heartbeat(lease.lease_id, worker, T0 + TTL + 5, TTL, 3, 0.5, 1.0)
    assert (late.status, late.expires_at, late.step) == (LEASE_ACTIVE, T0 + 2 * TTL + 5, 3)
    # A beat that carries an older time (retried through an outage) keeps the later expiry.
    stale = cat.heartbeat(lease.lease_id, worker, T0 + 1, TTL, 4, 0.4, 1.0)
    assert (stale.expires_at, stale.step) == (late.expires_at, 4)
    assert cat.expire_leases(late.expires_at + 1, max_attempts=3) != []
    args = (lease.lease_id, worker, late.expires_at + 2, TTL, 5, 0.0, 0.0)
    refused("failed_precondition", cat.heartbeat, *args, match="expired")


def test_grace_after_a_restart_extends_only_active_leases_that_end_sooner(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [19], [29]])
    worker = enrol(cat).worker_id
    early, late, ended = (cat.acquire(worker, T0 + i * 50, TTL, first) for i in range(3))
    assert early is not None and late is not None and ended is not None
    cat.fail_lease(ended.lease_id, worker, "gave up", T0 + 101, max_attempts=3)
    # The coordinator was down; it is back at T0 + 100 and gives each lease until T0 + 100 + TTL.
    until = late.expires_at - 1
    assert cat.grant_grace(until) == 1
    assert cat.get_lease(early.lease_id).expires_at == until
    assert cat.get_lease(late.lease_id).expires_at == late.expires_at  # already later: unchanged
    assert cat.get_lease(ended.lease_id).status != LEASE_ACTIVE
    assert cat.expire_leases(until - 1, max_attempts=3) == []
    assert [x.lease_id for x in cat.expire_leases(until + 1, max_attempts=3)] == [early.lease_id]


def test_fail_lease_records_the_error(cat: Catalogue) -> None:
    add_job(cat)
    a, b = enrol(cat, "ka").worker_id, enrol(cat, "kb").worker_id
    lease = cat.acquire(a, T0, TTL, first)
    assert lease is not None
    refused("failed_precondition", cat.fail_lease, lease.lease_id, b, "boom", T0, 3)
    unit = cat.fail_lease(lease.lease_id, a, "CUDA out of memory", T0 + 1, 3)
    assert (unit.status, unit.attempts, unit.last_error) == (UNIT_PENDING, 1, "CUDA out of memory")
    assert cat.get_lease(lease.lease_id).status == LEASE_FAILED
    refused("failed_precondition", cat.fail_lease, lease.lease_id, a, "again", T0 + 2, 3)
    # Units with fewer attempts are offered first; this policy insists on the failed one.
    again = cat.acquire(a, T0 + 3, TTL, lambda us: next(u for u in us if u.unit == lease.unit))
    assert again is not None and again.unit == lease.unit
    unit = cat.fail_lease(again.lease_id, a, "NaN loss", T0 + 4, max_attempts=2)
    assert (unit.status, unit.last_error) == (UNIT_FAILED, "NaN loss")
    assert cat.events(limit=1)[0].kind == "lease_failed"


def test_concurrent_acquire_never_leases_a_unit_twice(cat: Catalogue) -> None:
    threads, each = 16, 4
    add_job(cat, units=[[i] for i in range(threads * each)])
    leased: list[tuple[str, int] | None] = []

    def take(worker_id: str) -> None:
        # Every thread asks for the same first unit: the most contention there can be. While
        # units are pending, every acquire must get one.
        for _ in range(each):
            lease = cat.acquire(worker_id, T0, TTL, first)
            leased.append(None if lease is None else (lease.job, lease.unit))

    workers = [enrol(cat, f"k{i}").worker_id for i in range(threads)]
    in_threads(take, [(w,) for w in workers])
    assert None not in leased
    assert sorted(leased) == [("digits", i) for i in range(threads * each)]  # type: ignore[type-var]
    assert all(u.status == UNIT_LEASED and u.attempts == 1 for u in cat.units())
    assert cat.acquire(workers[0], T0, TTL, first) is None


def test_concurrent_completions_finish_the_job_exactly_once(cat: Catalogue) -> None:
    n_units = 8
    add_job(cat, units=[[i] for i in range(n_units)])
    work = []
    for i in range(n_units):
        worker = enrol(cat, f"k{i}")
        lease = cat.acquire(worker.worker_id, T0, TTL, first)
        assert lease is not None
        rec = checkpoint(worker, lease.unit, 500, final=True)
        cat.add_checkpoint(rec)
        work.append((lease.lease_id, worker.worker_id, rec.sha256))
    names: list[str | None] = []

    def complete(lease_id: str, worker_id: str, sha256: str) -> None:
        names.append(cat.complete_unit(lease_id, worker_id, sha256, T0 + 1))

    in_threads(complete, work)
    assert sorted(names, key=str) == [None] * (n_units - 1) + ["digits:final"]
    assert cat.get_job("digits").status == JOB_DONE
    members = {m.unit: m.checkpoint.sha256 for m in cat.get_ensemble("digits:final").members}
    assert members == {i: sha for i, (_, _, sha) in enumerate(work)}


# --- checkpoints, completion and ensembles ---


def test_add_checkpoint_is_idempotent_by_digest(cat: Catalogue) -> None:
    add_job(cat)
    worker = enrol(cat)
    rec = checkpoint(worker, 1, 100)
    assert cat.add_checkpoint(rec) == (rec, True) and rec.trusted
    assert cat.add_checkpoint(replace(rec, final=True, step=7)) == (rec, False)
    assert cat.get_checkpoint(rec.sha256) == rec
    refused("not_found", cat.add_checkpoint, checkpoint(worker, 7, 1))
    refused("not_found", cat.add_checkpoint, checkpoint(worker, 0, 1, job="nojob"))
    refused("invalid_argument", cat.add_checkpoint, replace(checkpoint(worker, 0, 1), key_id="k"))
    refused("not_found", cat.add_checkpoint, replace(checkpoint(worker, 0, 1), worker_id="w-0"))
    refused("not_found", cat.get_checkpoint, "0" * 64)


def test_newest_and_listed_checkpoints(cat: Catalogue) -> None:
    add_job(cat)
    add_job(cat, "other", [[3]])
    worker = enrol(cat)
    assert cat.newest_checkpoint("digits", 0) is None
    uploads = [(0, 300, "digits"), (0, 100, "digits"), (0, 200, "digits"), (1, 50, "digits")]
    for unit, step, job in [*uploads, (0, 10, "other")]:
        cat.add_checkpoint(checkpoint(worker, unit, step, job=job))
    newest = cat.newest_checkpoint("digits", 0)
    assert newest is not None and newest.step == 300
    assert [c.step for c in cat.list_checkpoints("digits", 0)] == [100, 200, 300]
    listed = [(c.unit, c.step) for c in cat.list_checkpoints("digits")]
    assert listed == [(0, 100), (0, 200), (0, 300), (1, 50)]
    assert len(cat.list_checkpoints()) == 5
    refused("not_found", cat.newest_checkpoint, "digits", 9)


def finish(cat: Catalogue, worker: WorkerRecord, now: float) -> tuple[str | None, str]:
    """Lease the first pending unit, upload its final checkpoint and complete it."""
    lease = cat.acquire(worker.worker_id, now, TTL, first)
    assert lease is not None
    rec = checkpoint(worker, lease.unit, 500, final=True)
    cat.add_checkpoint(rec)
    return cat.complete_unit(lease.lease_id, worker.worker_id, rec.sha256, now + 1), rec.sha256


def test_complete_all_units_registers_the_final_ensemble(cat: Catalogue) -> None:
    add_job(cat)
    a, b = enrol(cat, "ka"), enrol(cat, "kb")
    finals = [finish(cat, a, T0)]
    # A later, higher-step checkpoint must not displace the final one the lease delivered.
    cat.add_checkpoint(checkpoint(a, 0, 900))
    finals.append(finish(cat, b, T0 + 10))
    assert [name for name, _ in finals] == [None, None]
    assert cat.get_job("digits").status == JOB_ACTIVE
    finals.append(finish(cat, a, T0 + 20))
    assert finals[-1][0] == "digits:final"
    job = cat.get_job("digits")
    assert (job.status, job.units_done) == (JOB_DONE, 3)
    ensemble = cat.get_ensemble("digits:final")
    assert ensemble == EnsembleRecord(
        "digits:final",
        "digits",
        "hash-digits",
        '{"name": "digits"}',
        T0 + 21,
        tuple(
            EnsembleMemberRecord(i, tuple(t), cat.get_checkpoint(sha))
            for i, (t, (_, sha)) in enumerate(zip(UNITS, finals, strict=True))
        ),
    )
    done = {w.worker_id: w.units_done for w in cat.list_workers()}
    assert done == {a.worker_id: 2, b.worker_id: 1}
    assert cat.list_ensembles() == [ensemble]
    assert cat.events(limit=1)[0].kind == "job_done"
    assert all(u.status == UNIT_DONE for u in cat.units())


def test_complete_unit_refusals(cat: Catalogue) -> None:
    add_job(cat)
    a, b = enrol(cat, "ka"), enrol(cat, "kb")
    lease = cat.acquire(a.worker_id, T0, TTL, first)
    assert lease is not None
    partial, final = checkpoint(a, 0, 10), checkpoint(a, 0, 500, True)
    other_unit = checkpoint(a, 1, 500, True)
    for rec in (partial, other_unit, final):
        cat.add_checkpoint(rec)
    refusals = [
        ("l-0", a, final, "not_found"),
        (lease.lease_id, b, final, "failed_precondition"),
        (lease.lease_id, a, checkpoint(a, 0, 999, True), "not_found"),
        (lease.lease_id, a, partial, "failed_precondition"),
        (lease.lease_id, a, other_unit, "invalid_argument"),
    ]
    for lease_id, worker, rec, code in refusals:
        refused(code, cat.complete_unit, lease_id, worker.worker_id, rec.sha256, T0 + 1)
    assert cat.get_lease(lease.lease_id).status == LEASE_ACTIVE  # refusals changed nothing
    args = (lease.lease_id, a.worker_id, final.sha256)
    assert cat.complete_unit(*args, T0 + 2) is None
    assert cat.get_lease(lease.lease_id).status == LEASE_COMPLETED
    refused("failed_precondition", cat.complete_unit, *args, T0 + 3)


def test_register_ensemble(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    add_job(cat, "other", [[3]])
    worker = enrol(cat)
    c0, c1, c1b = checkpoint(worker, 0, 10), checkpoint(worker, 1, 10), checkpoint(worker, 1, 20)
    foreign = checkpoint(worker, 0, 10, job="other")
    for rec in (c0, c1, c1b, foreign):
        cat.add_checkpoint(rec)
    best = cat.register_ensemble("best", "digits", {1: c1b.sha256, 0: c0.sha256}, T0 + 5)
    assert [(m.unit, m.checkpoint) for m in best.members] == [(0, c0), (1, c1b)]
    assert best.created_at == T0 + 5 and cat.get_ensemble("best") == best
    refusals = [
        ("best", "digits", {0: c0.sha256, 1: c1.sha256}, "already_exists"),
        ("x", "nojob", {0: c0.sha256}, "not_found"),
        ("x", "digits", {0: c0.sha256}, "invalid_argument"),
        ("x", "digits", {0: c0.sha256, 1: c1.sha256, 2: c1.sha256}, "invalid_argument"),
        ("x", "digits", {0: c1.sha256, 1: c0.sha256}, "invalid_argument"),
        ("x", "digits", {0: foreign.sha256, 1: c1.sha256}, "invalid_argument"),
        ("x", "digits", {0: "0" * 64, 1: c1.sha256}, "not_found"),
    ]
    for name, job, members, code in refusals:
        refused(code, cat.register_ensemble, name, job, members, T0)
    assert [e.name for e in cat.list_ensembles()] == ["best"]
    refused("not_found", cat.get_ensemble, "x")


def test_revocation_makes_checkpoints_untrusted(cat: Catalogue) -> None:
    add_job(cat, units=[[9]])
    good, bad = enrol(cat, "good"), enrol(cat, "bad")
    mine, theirs = checkpoint(good, 0, 100), checkpoint(bad, 0, 200)
    cat.add_checkpoint(mine)
    cat.add_checkpoint(theirs)
    assert (
        cat.register_ensemble("e", "digits", {0: theirs.sha256}, T0).members[0].checkpoint.trusted
    )
    assert cat.newest_checkpoint("digits", 0) == theirs
    revoked = cat.revoke_worker(bad.worker_id, T0 + 1).worker
    assert revoked == cat.worker_by_credential("cred-bad") == replace(bad, status=WORKER_REVOKED)
    assert cat.get_checkpoint(theirs.sha256) == replace(theirs, trusted=False, discarded=True)
    assert cat.get_checkpoint(mine.sha256) == mine
    assert not cat.get_ensemble("e").members[0].checkpoint.trusted
    assert cat.newest_checkpoint("digits", 0) == mine
    refused("failed_precondition", cat.register_ensemble, "f", "digits", {0: theirs.sha256}, T0)
    refused("unauthenticated", cat.acquire, bad.worker_id, T0 + 2, TTL, first)
    refused("unauthenticated", cat.add_checkpoint, checkpoint(bad, 0, 300))
    assert cat.events(limit=1)[0].kind == "worker_revoked"


# --- events ---


def test_events_newest_first(cat: Catalogue) -> None:
    for i in range(5):
        job = "j" if i % 2 else None
        cat.add_event("tick", f"message {i}", T0 + i, job=job, unit=i, worker_id="w")
    assert cat.events(limit=3) == [
        EventRecord(T0 + i, "tick", f"message {i}", "j" if i % 2 else None, i, "w")
        for i in (4, 3, 2)
    ]
    assert len(cat.events()) == 5
    refused("invalid_argument", cat.events, -1)
