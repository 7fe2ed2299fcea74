"""Contract tests for checkpoints whose blob is found corrupt on the coordinator's disk: marked
corrupt and out of use, the unit requeued when its completion rests on one, the resuming
worker's lease given back; run against a SQLite file and a real PostgreSQL."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect
from test_catalogue import T0, add_job, checkpoint, enrol, finish, refused
from test_catalogue_revocation import complete, lease_of, reproduced, states

from tspace_core.catalogue import (
    JOB_ACTIVE,
    JOB_CANCELLED,
    JOB_DONE,
    LEASE_ACTIVE,
    LEASE_CANCELLED,
    UNIT_DONE,
    UNIT_PENDING,
    Catalogue,
)
from tspace_core.catalogue.engine import alembic_config, make_engine


def test_a_done_units_corrupt_final_requeues_it_and_the_next_completion_is_final_2(
    cat: Catalogue,
) -> None:
    add_job(cat, units=[[9], [5]])
    a, b = enrol(cat, "ka"), enrol(cat, "kb")
    lease = lease_of(cat, a)
    early, final0 = checkpoint(a, 0, 100), checkpoint(a, 0, 500, final=True)
    cat.add_checkpoint(early)
    assert complete(cat, a, lease, final0, T0 + 1) is None
    name, final1 = finish(cat, a, T0 + 2)
    assert name == "digits:final"

    marked = cat.mark_corrupt(final0.sha256, "its content hashes to 0123", T0 + 10)
    assert (marked.marked, marked.requeued, marked.cancelled) == (True, True, None)
    assert marked.checkpoint.corrupt and marked.checkpoint.discarded
    assert not marked.checkpoint.in_use
    assert states(cat) == [(UNIT_PENDING, 0, ""), (UNIT_DONE, 1, "")]
    assert cat.get_job("digits").status == JOB_ACTIVE
    event = next(e for e in cat.events() if e.kind == "checkpoint_corrupt")
    assert (event.job, event.unit) == ("digits", 0)
    assert final0.sha256[:12] in event.message and "requeued" in event.message
    assert "0123" in event.message
    assert "job_reopened" in [e.kind for e in cat.events()]
    # Never a resume point, a member, nor a completion again ...
    assert cat.newest_checkpoint("digits", 0) == early
    assert cat.units("digits")[0].newest_step == early.step
    refused("failed_precondition", cat.register_selected, "x", "digits", "final", {}, T0 + 11)
    refused(
        "failed_precondition",
        cat.register_ensemble,
        "x",
        "digits",
        {0: final0.sha256, 1: final1},
        T0 + 11,
        match="corrupt on the coordinator's disk",
    )
    refused(
        "failed_precondition",
        cat.register_selected,
        "x",
        "digits",
        "newest",
        {0: final0.sha256[:10]},
        T0 + 11,
        match="corrupt",
    )
    again = lease_of(cat, b, T0 + 12)
    assert again.unit == 0
    refused(
        "failed_precondition",
        cat.complete_unit,
        again.lease_id,
        b.worker_id,
        final0.sha256,
        T0 + 13,
        match="corrupt",
    )
    # ... until its bytes are received again (training is deterministic): then it is whole.
    record, created = cat.add_checkpoint(reproduced(final0, b, T0 + 14, attempt=again.attempt))
    assert created and not record.corrupt and record.in_use
    assert cat.complete_unit(again.lease_id, b.worker_id, final0.sha256, T0 + 15) == (
        "digits:final-2"
    )
    assert cat.get_job("digits").status == JOB_DONE
    members = {m.unit: m.checkpoint.sha256 for m in cat.get_ensemble("digits:final-2").members}
    assert members == {0: final0.sha256, 1: final1}


def test_marking_again_changes_nothing(cat: Catalogue) -> None:
    add_job(cat, units=[[9]])
    a = enrol(cat)
    name, final = finish(cat, a, T0)
    assert name == "digits:final"
    assert cat.mark_corrupt(final, "first", T0 + 1).requeued
    before = (cat.units(), cat.list_checkpoints(), cat.events())
    again = cat.mark_corrupt(final, "second", T0 + 2)
    assert (again.marked, again.requeued, again.cancelled) == (False, False, None)
    assert (cat.units(), cat.list_checkpoints(), cat.events()) == before
    refused("not_found", cat.mark_corrupt, "f" * 64, "x", T0 + 3)


def test_a_checkpoint_no_completion_rests_on_is_only_taken_out_of_use(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    a = enrol(cat)
    lease = lease_of(cat, a)
    early, final0 = checkpoint(a, 0, 100), checkpoint(a, 0, 500, final=True)
    cat.add_checkpoint(early)
    complete(cat, a, lease, final0, T0 + 1)
    pending_ckpt = checkpoint(a, 1, 100)
    cat.add_checkpoint(pending_ckpt)
    for sha in (early.sha256, pending_ckpt.sha256):
        marked = cat.mark_corrupt(sha, "x", T0 + 2)
        assert marked.marked and not marked.requeued
    assert [u.status for u in cat.units()] == [UNIT_DONE, UNIT_PENDING]
    assert cat.newest_checkpoint("digits", 1) is None  # trains from scratch
    assert cat.get_job("digits").status == JOB_ACTIVE


def test_the_resuming_workers_lease_is_cancelled_without_using_an_attempt(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    a, b = enrol(cat, "ka"), enrol(cat, "kb")
    older, newer = checkpoint(a, 0, 100), checkpoint(a, 0, 200)
    cat.add_checkpoint(older)
    cat.add_checkpoint(newer)
    lease_a = lease_of(cat, a)  # unit 0, to resume from `newer`
    lease_b = lease_of(cat, b)  # unit 1
    assert (lease_a.unit, lease_b.unit) == (0, 1)
    # A worker that holds no lease on the checkpoint's unit gives nothing back.
    assert cat.mark_corrupt(newer.sha256, "x", T0 + 1, fetcher=b.worker_id).cancelled is None
    assert cat.get_lease(lease_b.lease_id).status == LEASE_ACTIVE
    # The worker that was to resume from it: its lease ends, the attempt does not count.
    marked = cat.mark_corrupt(newer.sha256, "x", T0 + 2, fetcher=a.worker_id)
    assert (marked.marked, marked.cancelled) == (False, lease_a.lease_id)
    assert cat.get_lease(lease_a.lease_id).status == LEASE_CANCELLED
    assert cat.units()[0].status == UNIT_PENDING and cat.units()[0].attempts == 0
    retry = lease_of(cat, a, T0 + 3)
    assert (retry.unit, retry.attempt) == (0, 1)
    assert cat.newest_checkpoint("digits", 0) == older


def test_a_reset_keeps_corrupt_checkpoints_out_of_use(cat: Catalogue) -> None:
    add_job(cat, units=[[9]])
    a = enrol(cat)
    c50, c100, c200 = (checkpoint(a, 0, s) for s in (50, 100, 200))
    for c in (c50, c100, c200):
        cat.add_checkpoint(c)
    cat.mark_corrupt(c50.sha256, "x", T0)
    cat.mark_corrupt(c200.sha256, "x", T0)
    refused("failed_precondition", cat.reset_unit, "digits", 0, c200.sha256, T0 + 1)
    cat.reset_unit("digits", 0, c100.sha256, T0 + 1)
    by_step = {c.step: (c.discarded, c.corrupt) for c in cat.list_checkpoints()}
    assert by_step == {50: (True, True), 100: (False, False), 200: (True, True)}
    assert cat.newest_checkpoint("digits", 0) == c100


def test_a_cancelled_jobs_done_unit_stays_done(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    a = enrol(cat)
    _, final0 = finish(cat, a, T0)
    cat.change_job("digits", "cancel", T0 + 1)
    marked = cat.mark_corrupt(final0, "x", T0 + 2)
    assert marked.marked and not marked.requeued
    assert cat.units()[0].status == UNIT_DONE
    assert cat.get_job("digits").status == JOB_CANCELLED


def test_migration_0003_adds_the_corrupt_flag_to_existing_checkpoints(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0002")
        with Catalogue(url) as cat:  # upgrades to head, as a coordinator does
            add_job(cat, units=[[9]])
            cat.add_checkpoint(checkpoint(enrol(cat), 0, 100))
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0002")
            assert "corrupt" not in {c["name"] for c in inspect(conn).get_columns("checkpoints")}
            command.upgrade(alembic_config(conn), "head")
        with Catalogue(url) as cat:
            [ckpt] = cat.list_checkpoints()
            assert (ckpt.step, ckpt.corrupt, ckpt.discarded) == (100, False, False)
    finally:
        engine.dispose()
