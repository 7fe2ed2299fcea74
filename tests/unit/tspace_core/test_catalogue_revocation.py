"""Contract tests for what revoking a worker requeues, and for checkpoints reproduced byte for
byte after a revocation or a reset; run against a SQLite file and a real PostgreSQL."""

from __future__ import annotations

from dataclasses import replace

from test_catalogue import T0, TTL, add_job, checkpoint, enrol, finish, first, refused

from tspace_core.catalogue import (
    JOB_ACTIVE,
    JOB_CANCELLED,
    JOB_DONE,
    JOB_FAILED,
    JOB_PAUSED,
    LEASE_CANCELLED,
    UNIT_DONE,
    UNIT_FAILED,
    UNIT_LEASED,
    UNIT_PENDING,
    WORKER_REVOKED,
    Catalogue,
    CheckpointRecord,
    LeaseRecord,
    UnitRecord,
    WorkerRecord,
)
from tspace_core.catalogue.records import Revocation


def lease_of(cat: Catalogue, worker: WorkerRecord, now: float = T0) -> LeaseRecord:
    lease = cat.acquire(worker.worker_id, now, TTL, first)
    assert lease is not None
    return lease


def complete(
    cat: Catalogue, worker: WorkerRecord, lease: LeaseRecord, rec: CheckpointRecord, now: float
) -> str | None:
    cat.add_checkpoint(rec)
    return cat.complete_unit(lease.lease_id, worker.worker_id, rec.sha256, now)


def states(cat: Catalogue, job: str = "digits") -> list[tuple[str, int, str]]:
    return [(u.status, u.attempts, u.last_error) for u in cat.units(job)]


def reproduced(
    rec: CheckpointRecord, worker: WorkerRecord, now: float, attempt: int = 1
) -> CheckpointRecord:
    """`rec`'s bytes (same digest) as `worker` signs them when its training reaches them."""
    return replace(
        rec,
        worker_id=worker.worker_id,
        key_id=worker.key_id,
        public_key=worker.public_key,
        statement=b'{"by": "%s", "step": %d}' % (worker.key_id.encode(), rec.step),
        signature=b"\x01sig-" + worker.key_id.encode(),
        attempt=attempt,
        created_at=now,
        metrics={"loss": 9.0},  # what the catalogue already holds for these bytes stays
        trusted=True,
        discarded=False,
    )


# --- revocation requeues what it affects ---


def test_revoke_requeues_a_unit_completed_with_the_workers_checkpoint(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    bad, good, fresh = enrol(cat, "bad"), enrol(cat, "good"), enrol(cat, "fresh")
    trusted_early = checkpoint(good, 0, 100)
    cat.add_checkpoint(trusted_early)
    lease = lease_of(cat, bad)
    assert lease.unit == 0
    later, final_bad = checkpoint(bad, 0, 300), checkpoint(bad, 0, 500, final=True)
    cat.add_checkpoint(later)
    assert complete(cat, bad, lease, final_bad, T0 + 1) is None
    name, final_good = finish(cat, good, T0 + 2)
    assert name == "digits:final" and cat.get_job("digits").status == JOB_DONE

    revocation = cat.revoke_worker(bad.worker_id, T0 + 10)
    assert revocation == Revocation(
        worker=replace(bad, status=WORKER_REVOKED, units_done=1),
        requeued=(("digits", 0),),
        checkpoints=2,
    )
    # The unit is leasable again with fresh attempts; the job has work again.
    assert states(cat) == [(UNIT_PENDING, 0, ""), (UNIT_DONE, 1, "")]
    assert cat.get_job("digits").status == JOB_ACTIVE
    event, reopened = cat.events(limit=2)
    assert (event.kind, event.worker_id) == ("worker_revoked", bad.worker_id)
    assert "1 unit(s) requeued" in event.message and "digits unit 0" in event.message
    assert "0 it was training, 1 resting on checkpoints it signed" in event.message
    assert (reopened.kind, reopened.job) == ("job_reopened", "digits")
    # It resumes from the newest trusted checkpoint, skipping the revoked worker's.
    assert cat.newest_checkpoint("digits", 0) == trusted_early
    assert cat.units("digits")[0].newest_step == 100
    # The first ensemble is frozen and now reads untrusted for the requeued unit.
    old = cat.get_ensemble("digits:final")
    assert [(m.unit, m.checkpoint.sha256, m.checkpoint.trusted) for m in old.members] == [
        (0, final_bad.sha256, False),
        (1, final_good, True),
    ]

    # Another worker trains it again; the job completes under a new ensemble name.
    again = lease_of(cat, fresh, T0 + 11)
    assert (again.unit, again.attempt) == (0, 1)
    final_fresh = checkpoint(fresh, 0, 500, final=True)
    assert complete(cat, fresh, again, final_fresh, T0 + 12) == "digits:final-2"
    assert cat.get_job("digits").status == JOB_DONE
    second = cat.get_ensemble("digits:final-2")
    assert [(m.unit, m.checkpoint.sha256, m.checkpoint.trusted) for m in second.members] == [
        (0, final_fresh.sha256, True),
        (1, final_good, True),
    ]
    assert not cat.get_ensemble("digits:final").members[0].checkpoint.trusted
    refused("failed_precondition", cat.revoke_worker, bad.worker_id, T0 + 13, match="already")


def test_revoke_names_leased_and_completed_units_once_each(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5], [3]])
    add_job(cat, "other", [[9]])
    bad, good = enrol(cat, "bad"), enrol(cat, "good")
    done = lease_of(cat, bad)
    assert complete(cat, bad, done, checkpoint(bad, 0, 500, final=True), T0 + 1) is None
    running = lease_of(cat, bad, T0 + 2)
    theirs = lease_of(cat, good, T0 + 2)
    other = lease_of(cat, bad, T0 + 3)
    assert [(x.job, x.unit) for x in (running, theirs, other)] == [
        ("digits", 1),
        ("digits", 2),
        ("other", 0),
    ]
    final_other = checkpoint(bad, 0, 500, final=True, job="other")
    assert complete(cat, bad, other, final_other, T0 + 4) == "other:final"
    other_again = cat.acquire(bad.worker_id, T0 + 5, TTL, first)
    assert other_again is None  # nothing left to lease

    revocation = cat.revoke_worker(bad.worker_id, T0 + 10)
    assert revocation.requeued == (("digits", 0), ("digits", 1), ("other", 0))
    assert cat.get_lease(running.lease_id).status == LEASE_CANCELLED
    assert [u.status for u in cat.units("digits")] == [UNIT_PENDING, UNIT_PENDING, UNIT_LEASED]
    assert [(j.name, j.status) for j in cat.list_jobs()] == [
        ("digits", JOB_ACTIVE),
        ("other", JOB_ACTIVE),
    ]
    message = cat.events(limit=1)[0].message
    assert "3 unit(s) requeued" in message and "1 it was training, 2 resting" in message
    assert "digits units 0, 1; other unit 0" in message


def test_revoking_requeues_only_units_resting_on_its_checkpoints(cat: Catalogue) -> None:
    add_job(cat)
    add_job(cat, "gone", [[9], [5]])
    bad, good = enrol(cat, "bad"), enrol(cat, "good")
    # It signed checkpoints, but every done unit rests on someone else's: one it completed was
    # reset and completed again by another worker, and a job it completed a unit of was
    # cancelled, which is final. Only unit 1, which another worker may have resumed from its
    # checkpoint, is requeued.
    early = checkpoint(good, 0, 100)
    cat.add_checkpoint(early)
    lease = lease_of(cat, bad)
    assert complete(cat, bad, lease, checkpoint(bad, 0, 500, final=True), T0 + 1) is None
    cat.reset_unit("digits", 0, early.sha256, T0 + 2)
    name, _ = finish(cat, good, T0 + 3)
    assert name is None
    cat.add_checkpoint(checkpoint(bad, 1, 200))
    gone = cat.acquire(
        bad.worker_id, T0 + 4, TTL, lambda us: next(u for u in us if u.job == "gone")
    )
    assert gone is not None
    assert complete(cat, bad, gone, checkpoint(bad, 0, 500, True, "gone"), T0 + 5) is None
    cat.change_job("gone", "cancel", T0 + 6)
    lease_of(cat, good, T0 + 7)  # digits unit 1, leased by the other worker
    before = (states(cat, "digits"), states(cat, "gone"), cat.list_jobs())

    revocation = cat.revoke_worker(bad.worker_id, T0 + 10)
    assert revocation.requeued == (("digits", 1),) and revocation.checkpoints == 3
    assert (states(cat, "gone"), cat.list_jobs()) == before[1:]
    assert [u.status for u in cat.units("digits")] == [UNIT_DONE, UNIT_PENDING, UNIT_PENDING]
    assert cat.get_job("gone").status == JOB_CANCELLED
    event = next(e for e in cat.events(limit=5) if e.kind == "worker_revoked")
    assert event.message.endswith("digits unit 1")
    # Its checkpoint on unit 1 is no place to resume from any more.
    assert cat.units("digits")[1].newest_step is None


def test_an_unrelated_failed_unit_stays_failed(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    bad, good = enrol(cat, "bad"), enrol(cat, "good")
    lease = lease_of(cat, bad)
    assert complete(cat, bad, lease, checkpoint(bad, 0, 500, final=True), T0 + 1) is None
    failing = lease_of(cat, good, T0 + 2)
    cat.fail_lease(failing.lease_id, good.worker_id, "CUDA out of memory", T0 + 3, max_attempts=1)
    assert cat.get_job("digits").status == JOB_FAILED

    assert cat.revoke_worker(bad.worker_id, T0 + 10).requeued == (("digits", 0),)
    assert states(cat) == [(UNIT_PENDING, 0, ""), (UNIT_FAILED, 1, "CUDA out of memory")]
    assert cat.get_job("digits").status == JOB_ACTIVE
    # Unit 0 trained again; with unit 1 still failed the job fails again, as before.
    again = lease_of(cat, good, T0 + 11)
    assert (again.unit, again.attempt) == (0, 1)
    assert complete(cat, good, again, checkpoint(good, 0, 500, final=True), T0 + 12) is None
    assert cat.get_job("digits").status == JOB_FAILED
    assert states(cat) == [(UNIT_DONE, 1, ""), (UNIT_FAILED, 1, "CUDA out of memory")]


def test_a_paused_job_stays_paused(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    bad = enrol(cat, "bad")
    lease = lease_of(cat, bad)
    assert complete(cat, bad, lease, checkpoint(bad, 0, 500, final=True), T0 + 1) is None
    cat.change_job("digits", "pause", T0 + 2)
    assert cat.revoke_worker(bad.worker_id, T0 + 3).requeued == (("digits", 0),)
    assert [u.status for u in cat.units()] == [UNIT_PENDING, UNIT_PENDING]
    assert cat.get_job("digits").status == JOB_PAUSED


# --- re-attribution of checkpoints reproduced byte for byte ---


def test_a_revoked_workers_checkpoint_reproduced_is_reattributed(cat: Catalogue) -> None:
    add_job(cat, units=[[9]])
    bad, good = enrol(cat, "bad"), enrol(cat, "good")
    lease = lease_of(cat, bad)
    final = checkpoint(bad, 0, 500, final=True)
    assert complete(cat, bad, lease, final, T0 + 1) == "digits:final"
    cat.revoke_worker(bad.worker_id, T0 + 2)
    # Untrusted, and out of use: nothing resumes from it or from anything after it.
    assert cat.get_checkpoint(final.sha256) == replace(final, trusted=False, discarded=True)

    again = lease_of(cat, good, T0 + 3)
    assert again.attempt == 1
    rec = reproduced(final, good, T0 + 4)
    record, created = cat.add_checkpoint(rec)
    assert created
    # The signer's fields are the new worker's; everything else is what was recorded.
    assert record == replace(rec, metrics=final.metrics)
    assert record.trusted and not record.discarded
    assert cat.get_checkpoint(final.sha256) == record
    event = cat.events(limit=1)[0]
    assert (event.kind, event.job, event.unit, event.worker_id) == (
        "checkpoint_reattributed",
        "digits",
        0,
        good.worker_id,
    )
    assert f"signer {bad.worker_id} revoked" in event.message and final.sha256[:12] in event.message
    assert [c.sha256 for c in cat.list_checkpoints(worker_id=bad.worker_id)] == []
    # Known and trusted now: the same upload again changes nothing.
    assert cat.add_checkpoint(rec) == (record, False)
    assert cat.complete_unit(again.lease_id, good.worker_id, final.sha256, T0 + 5) == (
        "digits:final-2"
    )
    assert cat.get_ensemble("digits:final-2").members[0].checkpoint == record
    assert cat.newest_checkpoint("digits", 0) == record


def test_a_discarded_checkpoint_reproduced_by_another_worker_is_reattributed(
    cat: Catalogue,
) -> None:
    add_job(cat, units=[[9]])
    a, b = enrol(cat, "ka"), enrol(cat, "kb")
    lease = lease_of(cat, a)
    early, later = checkpoint(a, 0, 100), checkpoint(a, 0, 300)
    cat.add_checkpoint(early)
    cat.add_checkpoint(later)
    cat.reset_unit("digits", 0, early.sha256, T0 + 1)
    assert cat.get_lease(lease.lease_id).status == LEASE_CANCELLED
    assert cat.get_checkpoint(later.sha256).discarded
    lease_of(cat, b, T0 + 2)
    rec = reproduced(later, b, T0 + 3, attempt=1)
    record, created = cat.add_checkpoint(rec)
    assert created and record == replace(rec, metrics=later.metrics)
    assert not cat.get_checkpoint(later.sha256).discarded
    assert cat.newest_checkpoint("digits", 0) == record
    assert "(discarded)" in cat.events(limit=1)[0].message


def test_reattribution_refusals_change_nothing(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    bad, good = enrol(cat, "bad"), enrol(cat, "good")
    untrusted = checkpoint(bad, 0, 300)
    cat.add_checkpoint(untrusted)
    cat.revoke_worker(bad.worker_id, T0 + 1)
    before = (cat.list_checkpoints(), cat.events())
    rec = reproduced(untrusted, good, T0 + 2)
    for other, words in [
        (replace(rec, unit=1), "not as digits unit 1 step 300"),
        (replace(rec, step=400), "not as digits unit 0 step 400"),
        (replace(rec, final=True), "final=True"),
    ]:
        error = refused("conflict", cat.add_checkpoint, other)
        assert words in str(error) and "digits unit 0 step 300" in str(error), str(error)
    # Only an active worker can vouch for it, with its own key.
    refused("unauthenticated", cat.add_checkpoint, replace(untrusted, created_at=T0 + 3))
    refused("invalid_argument", cat.add_checkpoint, replace(rec, key_id="bad"), match="key")
    assert (cat.list_checkpoints(), cat.events()) == before
    assert cat.get_checkpoint(untrusted.sha256) == replace(untrusted, trusted=False, discarded=True)


def test_a_trusted_checkpoint_keeps_its_signer(cat: Catalogue) -> None:
    add_job(cat, units=[[9]])
    a, b = enrol(cat, "ka"), enrol(cat, "kb")
    mine = checkpoint(a, 0, 300)
    assert cat.add_checkpoint(mine) == (mine, True)
    events = cat.events()
    assert cat.add_checkpoint(reproduced(mine, b, T0 + 5)) == (mine, False)
    assert cat.get_checkpoint(mine.sha256) == mine
    assert cat.events() == events


def test_a_requeued_unit_without_trusted_checkpoints_starts_over(cat: Catalogue) -> None:
    add_job(cat, units=[[9]])
    bad = enrol(cat, "bad")
    lease = lease_of(cat, bad)
    assert complete(cat, bad, lease, checkpoint(bad, 0, 500, final=True), T0 + 1)
    cat.revoke_worker(bad.worker_id, T0 + 2)
    assert cat.units("digits") == [
        UnitRecord(
            job="digits", unit=0, timesteps=(9,), status=UNIT_PENDING, attempts=0, total_steps=500
        )
    ]
    assert cat.newest_checkpoint("digits", 0) is None


def test_a_unit_finished_by_another_worker_from_its_checkpoint_is_trained_again(
    cat: Catalogue,
) -> None:
    add_job(cat, units=[[9]])
    bad, good = enrol(cat, "bad"), enrol(cat, "good")
    trusted_early = checkpoint(good, 0, 100)
    cat.add_checkpoint(trusted_early)
    lease = lease_of(cat, bad)
    tainted = checkpoint(bad, 0, 300)
    cat.add_checkpoint(tainted)
    cat.fail_lease(lease.lease_id, bad.worker_id, "preempted", T0 + 1, 3)
    # The good worker resumes from the revoked worker's step 300 and finishes the unit.
    resumed = lease_of(cat, good, T0 + 2)
    assert cat.newest_checkpoint("digits", 0) == tainted
    final_good = checkpoint(good, 0, 500, final=True)
    assert complete(cat, good, resumed, final_good, T0 + 3) == "digits:final"

    revocation = cat.revoke_worker(bad.worker_id, T0 + 10)
    # Its final weights descend from the revoked worker's: trained again from before them.
    assert revocation.requeued == (("digits", 0),)
    assert states(cat) == [(UNIT_PENDING, 0, "")]
    assert cat.get_job("digits").status == JOB_ACTIVE
    assert cat.get_checkpoint(final_good.sha256).discarded
    assert cat.get_checkpoint(tainted.sha256).discarded
    assert cat.newest_checkpoint("digits", 0) == trusted_early
