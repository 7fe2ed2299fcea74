"""Contract tests for the catalogue's operator commands (jobs, units, tokens, workers, aliases,
selected ensembles), run against a SQLite file and a real PostgreSQL."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from sqlalchemy import update
from sqlalchemy.orm import Session
from test_catalogue import (
    T0,
    TTL,
    add_job,
    checkpoint,
    enrol,
    finish,
    first,
    join,
    refused,
)

from tspace_core.catalogue import (
    JOB_ACTIVE,
    JOB_CANCELLED,
    JOB_DONE,
    JOB_FAILED,
    JOB_PAUSED,
    LEASE_ACTIVE,
    LEASE_CANCELLED,
    UNIT_DONE,
    UNIT_FAILED,
    UNIT_LEASED,
    UNIT_PENDING,
    WORKER_REVOKED,
    AliasRecord,
    Catalogue,
    CheckpointRecord,
    LeaseRecord,
    UnitRecord,
    WorkerRecord,
)
from tspace_core.catalogue.models import Token
from tspace_core.catalogue.records import (
    TOKEN_EXPIRED,
    TOKEN_REVOKED,
    TOKEN_UNUSED,
    TOKEN_USED,
    TokenRecord,
)


def lease_of(cat: Catalogue, worker: WorkerRecord, now: float = T0) -> LeaseRecord:
    """Lease the first pending unit, which the test expects there to be."""
    lease = cat.acquire(worker.worker_id, now, TTL, first)
    assert lease is not None
    return lease


def beat(cat: Catalogue, lease: LeaseRecord, now: float, step: int = 1) -> LeaseRecord:
    return cat.heartbeat(lease.lease_id, lease.worker_id, now, TTL, step, 0.5, 10.0)


def unit_of(cat: Catalogue, unit: int, job: str = "digits") -> UnitRecord:
    return cat.units(job)[unit]


def with_digest(rec: CheckpointRecord, sha256: str) -> CheckpointRecord:
    return replace(rec, sha256=sha256)


def hexhash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- pause, resume, cancel ---


def test_pause_cancels_running_leases_and_hands_out_nothing(cat: Catalogue) -> None:
    add_job(cat)
    add_job(cat, "other", [[1]])
    worker = enrol(cat)
    l0, l1 = lease_of(cat, worker), lease_of(cat, worker)
    beat(cat, l0, T0 + 1, step=7)
    cat.add_checkpoint(checkpoint(worker, 0, 7))
    paused = cat.change_job("digits", "pause", T0 + 2)
    assert (paused.name, paused.status, paused.units) == ("digits", JOB_PAUSED, 3)
    assert cat.get_job("digits").status == JOB_PAUSED
    for lease in (l0, l1):
        assert cat.get_lease(lease.lease_id).status == LEASE_CANCELLED
    # The units did nothing wrong: back to pending, with their attempt given back.
    assert [(u.status, u.attempts, u.lease_id) for u in cat.units("digits")] == [
        (UNIT_PENDING, 0, None)
    ] * 3
    refused("failed_precondition", beat, cat, l0, T0 + 3, match="ended \\(cancelled\\)")
    refused("failed_precondition", cat.fail_lease, l1.lease_id, worker.worker_id, "x", T0 + 3, 3)
    # A paused job offers no unit; another job's units are still handed out.
    offered: list[list[tuple[str, int]]] = []

    def record(units: list[UnitRecord]) -> UnitRecord | None:
        offered.append([(u.job, u.unit) for u in units])
        return units[0] if units else None

    other = cat.acquire(worker.worker_id, T0 + 4, TTL, record)
    assert other is not None and other.job == "other"
    assert offered == [[("other", 0)]]
    assert cat.acquire(worker.worker_id, T0 + 5, TTL, record) is None
    assert len(offered) == 1  # nothing pending anywhere: the policy is not even asked
    # Checkpoints survive the pause: a resumed unit picks up where it was.
    newest = cat.newest_checkpoint("digits", 0)
    assert newest is not None and newest.step == 7
    kinds = [(e.kind, e.job, e.unit) for e in cat.events(limit=4)]
    assert kinds == [
        ("unit_leased", "other", 0),
        ("job_paused", "digits", None),
        ("lease_cancelled", "digits", 1),
        ("lease_cancelled", "digits", 0),
    ]
    assert "job paused" in cat.events(limit=3)[2].message


def test_resume_hands_out_units_again(cat: Catalogue) -> None:
    add_job(cat, units=[[9]])
    worker = enrol(cat)
    lease_of(cat, worker)
    cat.change_job("digits", "pause", T0 + 1)
    refused(
        "failed_precondition", cat.change_job, "digits", "pause", T0 + 2, match="already paused"
    )
    resumed = cat.change_job("digits", "resume", T0 + 3)
    assert resumed.status == JOB_ACTIVE == cat.get_job("digits").status
    again = lease_of(cat, worker, T0 + 4)
    assert (again.unit, again.attempt, again.status) == (0, 1, LEASE_ACTIVE)
    error = refused("failed_precondition", cat.change_job, "digits", "resume", T0 + 5)
    assert "active, not paused" in str(error)
    kinds = [e.kind for e in cat.events(limit=2)]
    assert kinds == ["unit_leased", "job_resumed"]


def test_cancel_is_final(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    worker = enrol(cat)
    lease = lease_of(cat, worker)
    cancelled = cat.change_job("digits", "cancel", T0 + 1)
    assert cancelled.status == JOB_CANCELLED
    assert cat.get_lease(lease.lease_id).status == LEASE_CANCELLED
    assert cat.acquire(worker.worker_id, T0 + 2, TTL, first) is None
    for action in ("resume", "pause"):
        refused("failed_precondition", cat.change_job, "digits", action, T0 + 3, match="final")
    refused("failed_precondition", cat.change_job, "digits", "cancel", T0, match="already cancel")
    refused("failed_precondition", cat.retry_unit, "digits", 0, T0 + 4, match="final")
    ckpt = checkpoint(worker, 0, 10)
    cat.add_checkpoint(ckpt)
    refused("failed_precondition", cat.reset_unit, "digits", 0, ckpt.sha256, T0, match="final")
    assert cat.get_job("digits").status == JOB_CANCELLED


def test_paused_and_failed_jobs_can_be_cancelled(cat: Catalogue) -> None:
    add_job(cat, "p", [[9]])
    add_job(cat, "f", [[9]])
    worker = enrol(cat)
    cat.change_job("p", "pause", T0)
    assert cat.change_job("p", "cancel", T0 + 1).status == JOB_CANCELLED
    lease = lease_of(cat, worker)
    assert lease.job == "f"
    cat.fail_lease(lease.lease_id, worker.worker_id, "boom", T0 + 2, max_attempts=1)
    assert cat.get_job("f").status == JOB_FAILED
    assert cat.change_job("f", "cancel", T0 + 3).status == JOB_CANCELLED


def test_a_done_job_cannot_be_changed(cat: Catalogue) -> None:
    add_job(cat, units=[[9]])
    name, _ = finish(cat, enrol(cat), T0)
    assert name == "digits:final" and cat.get_job("digits").status == JOB_DONE
    error = refused("failed_precondition", cat.change_job, "digits", "cancel", T0 + 5)
    assert "done" in str(error) and "nothing to cancel" in str(error)
    refused("failed_precondition", cat.change_job, "digits", "pause", T0 + 5, match="done")
    refused("failed_precondition", cat.change_job, "digits", "resume", T0 + 5, match="done")
    assert cat.get_job("digits").status == JOB_DONE


def test_change_job_refuses_unknown_jobs_and_actions(cat: Catalogue) -> None:
    add_job(cat)
    error = refused("invalid_argument", cat.change_job, "digits", "stop", T0)
    assert "pause, resume, cancel" in str(error)
    refused("not_found", cat.change_job, "nope", "pause", T0)
    assert cat.get_job("digits").status == JOB_ACTIVE


# --- failing jobs, retry ---


def test_a_job_fails_only_once_no_unit_is_pending_or_leased(cat: Catalogue) -> None:
    add_job(cat)
    worker = enrol(cat)
    l0, l1 = lease_of(cat, worker), lease_of(cat, worker)
    cat.fail_lease(l0.lease_id, worker.worker_id, "OOM", T0 + 1, max_attempts=1)
    assert cat.get_job("digits").status == JOB_ACTIVE  # unit 1 leased, unit 2 pending
    cat.fail_lease(l1.lease_id, worker.worker_id, "OOM", T0 + 2, max_attempts=1)
    assert cat.get_job("digits").status == JOB_ACTIVE  # unit 2 still pending
    l2 = lease_of(cat, worker, T0 + 3)
    cat.fail_lease(l2.lease_id, worker.worker_id, "NaN loss", T0 + 4, max_attempts=5)
    assert cat.get_job("digits").status == JOB_ACTIVE  # requeued, not failed
    l2 = lease_of(cat, worker, T0 + 5)
    cat.fail_lease(l2.lease_id, worker.worker_id, "NaN loss", T0 + 6, max_attempts=2)
    job = cat.get_job("digits")
    assert (job.status, job.units_failed) == (JOB_FAILED, 3)
    event = cat.events(limit=1)[0]
    assert (event.kind, event.job) == ("job_failed", "digits")
    assert "units retry digits" in event.message


def test_a_job_fails_when_its_last_running_unit_completes_beside_a_failed_one(
    cat: Catalogue,
) -> None:
    add_job(cat, units=[[9], [5]])
    worker = enrol(cat)
    l0, l1 = lease_of(cat, worker), lease_of(cat, worker)
    cat.fail_lease(l0.lease_id, worker.worker_id, "OOM", T0 + 1, max_attempts=1)
    final = checkpoint(worker, 1, 500, final=True)
    cat.add_checkpoint(final)
    assert cat.complete_unit(l1.lease_id, worker.worker_id, final.sha256, T0 + 2) is None
    assert [u.status for u in cat.units()] == [UNIT_FAILED, UNIT_DONE]
    assert cat.get_job("digits").status == JOB_FAILED


def test_retry_gives_a_failed_unit_new_attempts(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    worker = enrol(cat)
    l0 = lease_of(cat, worker)
    finish(cat, worker, T0)  # unit 1 done
    cat.fail_lease(l0.lease_id, worker.worker_id, "CUDA out of memory", T0 + 5, max_attempts=1)
    assert cat.get_job("digits").status == JOB_FAILED
    retried = cat.retry_unit("digits", 0, T0 + 6)
    assert (retried.unit, retried.status, retried.attempts, retried.last_error) == (
        0,
        UNIT_PENDING,
        0,
        "",
    )
    assert cat.get_job("digits").status == JOB_ACTIVE
    assert [e.kind for e in cat.events(limit=2)] == ["unit_retried", "job_reopened"]
    assert "CUDA out of memory" in cat.events(limit=1)[0].message
    again = lease_of(cat, worker, T0 + 7)
    assert (again.unit, again.attempt) == (0, 1)
    error = refused("failed_precondition", cat.retry_unit, "digits", 0, T0 + 8)
    assert "leased, not failed" in str(error) and "reset" not in str(error)
    error = refused("failed_precondition", cat.retry_unit, "digits", 1, T0 + 8)
    assert "done, not failed" in str(error) and "reset it" in str(error)
    refused("not_found", cat.retry_unit, "digits", 2, T0 + 8, match="units are 0..1")
    refused("not_found", cat.retry_unit, "nope", 0, T0 + 8)
    assert unit_of(cat, 0).status == UNIT_LEASED


# --- reset ---


def test_reset_discards_later_checkpoints_and_cancels_the_running_lease(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    worker = enrol(cat)
    lease = lease_of(cat, worker)
    c100, c200, c300 = (checkpoint(worker, 0, s) for s in (100, 200, 300))
    sibling = with_digest(checkpoint(worker, 0, 200), "5" * 64)  # same step, other digest
    for rec in (c100, c200, sibling, c300):
        cat.add_checkpoint(rec)
    assert cat.newest_checkpoint("digits", 0) == c300
    unit = cat.reset_unit("digits", 0, c200.sha256[:10].upper(), T0 + 1)
    assert (unit.status, unit.attempts, unit.lease_id) == (UNIT_PENDING, 0, None)
    assert cat.get_lease(lease.lease_id).status == LEASE_CANCELLED
    refused("failed_precondition", beat, cat, lease, T0 + 2, match="ended")
    discarded = {c.sha256 for c in cat.list_checkpoints("digits", 0) if c.discarded}
    assert discarded == {sibling.sha256, c300.sha256}
    assert cat.newest_checkpoint("digits", 0) == c200
    assert unit_of(cat, 0).newest_step == 200
    assert [e.kind for e in cat.events(limit=2)] == ["unit_reset", "lease_cancelled"]
    assert "2 later checkpoint(s) discarded" in cat.events(limit=1)[0].message
    # The next lease resumes from the checkpoint the unit was reset to.
    again = lease_of(cat, worker, T0 + 3)
    assert (again.unit, again.attempt) == (0, 1)
    # Resetting further back discards the checkpoint the unit was reset to before.
    cat.reset_unit("digits", 0, c100.sha256, T0 + 4)
    assert cat.newest_checkpoint("digits", 0) == c100
    assert [c.discarded for c in cat.list_checkpoints("digits", 0)] == [False, True, True, True]


def test_reset_refusals_change_nothing(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    good, bad = enrol(cat, "good"), enrol(cat, "bad")
    mine, final = checkpoint(good, 0, 100), checkpoint(good, 0, 500, final=True)
    other_unit, theirs = checkpoint(good, 1, 100), checkpoint(bad, 0, 200)
    for rec in (mine, final, other_unit, theirs):
        cat.add_checkpoint(rec)
    cat.revoke_worker(bad.worker_id, T0)
    before = (cat.units(), cat.list_checkpoints(), cat.events())
    cases = [
        (0, final.sha256, "failed_precondition", "final one"),
        (0, other_unit.sha256, "invalid_argument", "not to digits unit 0"),
        (0, theirs.sha256, "failed_precondition", "revoked worker"),
        (0, "0" * 64, "not_found", "no checkpoint"),
        (0, "abc", "invalid_argument", "at least 8"),
        (2, mine.sha256, "not_found", "units are 0..1"),
    ]
    for unit, ref, code, words in cases:
        error = refused(code, cat.reset_unit, "digits", unit, ref, T0 + 1)
        assert words in str(error), (ref, str(error))
    refused("not_found", cat.reset_unit, "nope", 0, mine.sha256, T0 + 1)
    assert (cat.units(), cat.list_checkpoints(), cat.events()) == before


def test_reset_reopens_a_done_job_and_its_next_completion_is_final_2(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    a, b = enrol(cat, "ka"), enrol(cat, "kb")
    lease = lease_of(cat, a)
    early = checkpoint(a, 0, 100)
    old_final = checkpoint(a, 0, 500, final=True)
    cat.add_checkpoint(early)
    cat.add_checkpoint(old_final)
    assert cat.complete_unit(lease.lease_id, a.worker_id, old_final.sha256, T0 + 1) is None
    name, final1 = finish(cat, a, T0 + 2)
    assert name == "digits:final" and cat.get_job("digits").status == JOB_DONE
    first_ensemble = cat.get_ensemble("digits:final")

    unit = cat.reset_unit("digits", 0, early.sha256[:8], T0 + 10)
    assert unit.status == UNIT_PENDING
    assert (unit.newest_step, unit.newest_checkpoint_at) == (early.step, early.created_at)
    assert cat.get_job("digits").status == JOB_ACTIVE
    assert cat.get_checkpoint(old_final.sha256).discarded
    assert cat.events(limit=2)[1].kind == "job_reopened"
    assert cat.newest_checkpoint("digits", 0) == early

    again = lease_of(cat, b, T0 + 11)
    assert again.unit == 0
    new_final = checkpoint(b, 0, 500, final=True)
    cat.add_checkpoint(new_final)
    assert cat.complete_unit(again.lease_id, b.worker_id, new_final.sha256, T0 + 12) == (
        "digits:final-2"
    )
    assert cat.get_job("digits").status == JOB_DONE
    second = cat.get_ensemble("digits:final-2")
    members = {m.unit: m.checkpoint.sha256 for m in second.members}
    assert members == {0: new_final.sha256, 1: final1}
    # The first ensemble is frozen: it still names what the first completion delivered.
    still = cat.get_ensemble("digits:final")
    assert [(m.unit, m.checkpoint.sha256) for m in still.members] == [
        (0, old_final.sha256),
        (1, final1),
    ]
    assert still.members[0].checkpoint.discarded
    assert replace(still, members=first_ensemble.members) == first_ensemble
    assert [e.name for e in cat.list_ensembles()] == ["digits:final", "digits:final-2"]


def test_the_final_name_skips_an_alias_of_that_name(cat: Catalogue) -> None:
    add_job(cat, "a", [[9]])
    add_job(cat, "digits", [[9]])
    worker = enrol(cat)
    lease = lease_of(cat, worker)
    final_a = checkpoint(worker, 0, 500, final=True, job="a")
    cat.add_checkpoint(final_a)
    assert cat.complete_unit(lease.lease_id, worker.worker_id, final_a.sha256, T0) == "a:final"
    cat.set_alias("digits:final", "a:final", T0 + 1)
    name, _ = finish(cat, worker, T0 + 2)
    assert name == "digits:final-2"
    assert cat.get_ensemble("digits:final").name == "a:final"  # the alias still resolves


# --- finding checkpoints by digest prefix ---


def test_resolve_checkpoint_by_prefix(cat: Catalogue) -> None:
    add_job(cat)
    worker = enrol(cat)
    twin_a = with_digest(checkpoint(worker, 0, 1), "abcdef01" + "0" * 56)
    twin_b = with_digest(checkpoint(worker, 0, 2), "abcdef01" + "1" * 56)
    plain = with_digest(checkpoint(worker, 1, 3), "12345678" + "9" * 56)
    for rec in (twin_a, twin_b, plain):
        cat.add_checkpoint(rec)
    assert cat.resolve_checkpoint(plain.sha256) == plain
    assert cat.resolve_checkpoint("12345678") == plain
    assert cat.resolve_checkpoint("  ABCDEF010 ") == twin_a
    assert cat.resolve_checkpoint("abcdef011") == twin_b
    refused("conflict", cat.resolve_checkpoint, "abcdef01", match="give more digits")
    refused("not_found", cat.resolve_checkpoint, "ffffffff", match="checkpoints list")
    for bad in ("1234567", "xyz12345", "abcdef01-", "1" * 65, ""):
        error = refused("invalid_argument", cat.resolve_checkpoint, bad)
        assert "not a checkpoint digest" in str(error) and "\n" not in str(error)


# --- join tokens ---


def test_tokens_are_listed_with_their_status(cat: Catalogue) -> None:
    unused, expired, used, revoked = (hexhash(n) for n in ("unused", "expired", "used", "rev"))
    cat.add_token(unused, "site-a", T0 + 100, T0)
    cat.add_token(expired, "site-b", T0 + 10, T0 + 1)
    cat.add_token(used, "site-c", T0 + 100, T0 + 2)
    cat.add_token(revoked, "site-d", T0 + 100, T0 + 3)
    worker = join(cat, used, "k-used", T0 + 5)
    cat.revoke_token(revoked[:6], T0 + 6)
    assert cat.list_tokens(T0 + 50) == [
        TokenRecord(unused[:12], "site-a", TOKEN_UNUSED, T0, T0 + 100),
        TokenRecord(expired[:12], "site-b", TOKEN_EXPIRED, T0 + 1, T0 + 10),
        TokenRecord(used[:12], "site-c", TOKEN_USED, T0 + 2, T0 + 100, T0 + 5, worker.worker_id),
        TokenRecord(revoked[:12], "site-d", TOKEN_REVOKED, T0 + 3, T0 + 100),
    ]
    # Expiry is judged at the time asked: at T0 + 100 the unused one has expired too, while
    # used and revoked tokens keep saying so.
    statuses = [t.status for t in cat.list_tokens(T0 + 100)]
    assert statuses == [TOKEN_EXPIRED, TOKEN_EXPIRED, TOKEN_USED, TOKEN_REVOKED]


def test_tokens_without_a_creation_time_are_listed_last(cat: Catalogue) -> None:
    old, new = hexhash("old"), hexhash("new")
    cat.add_token(old, "site-a", T0 + 100, T0)
    cat.add_token(new, "site-b", T0 + 100, T0 + 1)
    # Tokens enrolled before creation times were recorded have none.
    with Session(cat._engine) as session, session.begin():
        session.execute(update(Token).where(Token.token_hash == old).values(created_at=None))
    listed = cat.list_tokens(T0)
    assert [(t.token_id, t.created_at) for t in listed] == [(new[:12], T0 + 1), (old[:12], None)]


def test_revoke_token_and_its_refusals(cat: Catalogue) -> None:
    token, used = hexhash("t"), hexhash("u")
    twin_a, twin_b = "aaaaaa01" + "0" * 56, "aaaaaa02" + "0" * 56
    for h in (token, used, twin_a, twin_b):
        cat.add_token(h, "site-a", T0 + 100, T0)
    worker = join(cat, used, "k-used")
    revoked = cat.revoke_token(f" {token[:8].upper()} ", T0 + 1)
    assert revoked == TokenRecord(token[:12], "site-a", TOKEN_REVOKED, T0, T0 + 100)
    assert cat.events(limit=1)[0].kind == "token_revoked"
    refused("unauthenticated", join, cat, token, "k-new", match="revoked")
    before = (cat.list_tokens(T0 + 2), cat.events())
    error = refused("failed_precondition", cat.revoke_token, used, T0 + 2)
    assert worker.worker_id in str(error) and "workers revoke" in str(error)
    refused("failed_precondition", cat.revoke_token, token, T0 + 2, match="already revoked")
    refused("not_found", cat.revoke_token, "ffffff", T0 + 2, match="tokens list")
    refused("conflict", cat.revoke_token, "aaaaaa", T0 + 2, match="several tokens")
    for bad in ("aaaaa", "not-hex", "g" * 12, ""):
        refused("invalid_argument", cat.revoke_token, bad, T0 + 2, match="not a token id")
    assert (cat.list_tokens(T0 + 2), cat.events()) == before
    assert cat.revoke_token("aaaaaa02", T0 + 3).status == TOKEN_REVOKED
    assert join(cat, twin_a, "k-twin").site == "site-a"  # its twin is untouched


# --- workers ---


def test_revoke_worker_requeues_the_units_it_was_training(cat: Catalogue) -> None:
    add_job(cat)
    a, b = enrol(cat, "ka"), enrol(cat, "kb")
    la0, la1, lb2 = lease_of(cat, a), lease_of(cat, a), lease_of(cat, b)
    revoked = cat.revoke_worker(a.worker_id, T0 + 1).worker
    assert revoked == replace(a, status=WORKER_REVOKED)
    assert [cat.get_lease(x.lease_id).status for x in (la0, la1, lb2)] == [
        LEASE_CANCELLED,
        LEASE_CANCELLED,
        LEASE_ACTIVE,
    ]
    assert [(u.status, u.attempts, u.worker_id) for u in cat.units()] == [
        (UNIT_PENDING, 0, None),
        (UNIT_PENDING, 0, None),
        (UNIT_LEASED, 1, b.worker_id),
    ]
    event = cat.events(limit=1)[0]
    assert (event.kind, event.worker_id) == ("worker_revoked", a.worker_id)
    assert "2 unit(s)" in event.message
    refused("unauthenticated", cat.acquire, a.worker_id, T0 + 2, TTL, first)
    refused("failed_precondition", beat, cat, la0, T0 + 2, match="ended")
    refused("failed_precondition", cat.revoke_worker, a.worker_id, T0 + 3, match="already")
    refused("not_found", cat.revoke_worker, "w-0", T0 + 3)
    taken = lease_of(cat, b, T0 + 4)
    assert (taken.unit, taken.attempt) == (0, 1)


# --- aliases ---


def test_aliases_point_at_ensembles_and_move(cat: Catalogue) -> None:
    add_job(cat, units=[[9]])
    worker = enrol(cat)
    c1, c2 = checkpoint(worker, 0, 100), checkpoint(worker, 0, 200)
    cat.add_checkpoint(c1)
    cat.add_checkpoint(c2)
    cat.register_ensemble("e1", "digits", {0: c1.sha256}, T0)
    cat.register_ensemble("e2", "digits", {0: c2.sha256}, T0)
    assert cat.set_alias("prod", "e1", T0 + 1) == AliasRecord("prod", "e1", T0 + 1)
    by_alias = cat.get_ensemble("prod")
    assert by_alias.name == "e1" and by_alias.aliases == ("prod",)
    assert by_alias == cat.get_ensemble("e1")
    assert cat.set_alias("prod", "e2", T0 + 2) == AliasRecord("prod", "e2", T0 + 2)
    assert "(was e1)" in cat.events(limit=1)[0].message
    assert cat.get_ensemble("e1").aliases == ()
    # An alias of an alias points at the ensemble itself, so moving one leaves the other.
    assert cat.set_alias("live", "prod", T0 + 3) == AliasRecord("live", "e2", T0 + 3)
    assert cat.get_ensemble("live").name == "e2"
    assert cat.get_ensemble("e2").aliases == ("live", "prod")
    cat.set_alias("prod", "e1", T0 + 4)
    assert cat.list_aliases() == [
        AliasRecord("live", "e2", T0 + 3),
        AliasRecord("prod", "e1", T0 + 4),
    ]
    assert [(e.name, e.aliases) for e in cat.list_ensembles()] == [
        ("e1", ("prod",)),
        ("e2", ("live",)),
    ]
    before = (cat.list_aliases(), cat.list_ensembles())
    refused("already_exists", cat.set_alias, "e1", "e2", T0 + 5, match="own name")
    refused("not_found", cat.set_alias, "x", "nope", T0 + 5)
    refused("invalid_argument", cat.set_alias, "", "e1", T0 + 5)
    error = refused("already_exists", cat.register_ensemble, "prod", "digits", {0: c1.sha256}, T0)
    assert "alias" in str(error)
    refused("already_exists", cat.register_selected, "live", "digits", "newest", {}, T0)
    assert (cat.list_aliases(), cat.list_ensembles()) == before


# --- ensembles chosen by a rule ---


def test_register_selected_by_rule_and_picks(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    a, bad = enrol(cat, "ka"), enrol(cat, "bad")

    def add(unit: int, step: int, final: bool = False, **metrics: float) -> CheckpointRecord:
        rec = replace(checkpoint(a, unit, step, final), metrics=metrics)
        cat.add_checkpoint(rec)
        return rec

    p0_100 = add(0, 100, loss=0.3, val_loss=0.2)
    p0_200 = add(0, 200, loss=0.1)
    f0 = add(0, 300, True, loss=0.5)
    p1_100 = add(1, 100, loss=0.2)
    f1 = add(1, 300, True, loss=0.4)
    p1_400 = add(1, 400, loss=0.6)  # trained on past its final checkpoint
    untrusted = replace(checkpoint(bad, 1, 900), metrics={"loss": 0.01})
    cat.add_checkpoint(untrusted)
    cat.revoke_worker(bad.worker_id, T0)

    def members(name: str, rule: str, picks: dict[int, str] | None = None) -> dict[int, str]:
        record = cat.register_selected(name, "digits", rule, picks or {}, T0 + 1)
        assert record == cat.get_ensemble(name)
        return {m.unit: m.checkpoint.sha256 for m in record.members}

    assert members("final", "final") == {0: f0.sha256, 1: f1.sha256}
    assert members("newest", "newest") == {0: f0.sha256, 1: p1_400.sha256}
    assert members("best", "best:loss") == {0: p0_200.sha256, 1: p1_100.sha256}
    event = cat.events(limit=1)[0]
    assert (event.kind, event.job) == ("ensemble_registered", "digits")
    assert "best:loss" in event.message
    # Unit 1 never recorded val_loss: refused, naming it, until the operator picks for it.
    args = ("v", "digits", "best:val_loss", {}, T0)
    error = refused("failed_precondition", cat.register_selected, *args)
    assert "units [1]" in str(error) and "val_loss" in str(error)
    picked = members("val", "best:val_loss", {1: f1.sha256[:8]})
    assert picked == {0: p0_100.sha256, 1: f1.sha256}
    assert members("mixed", "final", {0: p0_100.sha256}) == {0: p0_100.sha256, 1: f1.sha256}

    before = cat.list_ensembles()
    cases = [
        ("final", "final", {}, "already_exists"),
        ("x", "best", {}, "invalid_argument"),
        ("x", "newest", {0: f1.sha256}, "invalid_argument"),  # unit 1's checkpoint for unit 0
        ("x", "newest", {5: f1.sha256}, "invalid_argument"),  # the job has no unit 5
        ("x", "newest", {1: untrusted.sha256}, "failed_precondition"),
        ("x", "newest", {1: "0" * 8}, "not_found"),
        ("x", "newest", {1: "zz"}, "invalid_argument"),
    ]
    for name, rule, picks, code in cases:
        refused(code, cat.register_selected, name, "digits", rule, picks, T0 + 2)
    refused("not_found", cat.register_selected, "x", "nope", "final", {}, T0 + 2)
    assert cat.list_ensembles() == before


# --- unit progress: where a new lease would resume ---


def test_units_report_the_newest_usable_checkpoint(cat: Catalogue) -> None:
    add_job(cat)
    good, bad = enrol(cat, "good"), enrol(cat, "bad")
    assert [(u.newest_step, u.newest_checkpoint_at) for u in cat.units()] == [(None, None)] * 3
    for rec in (checkpoint(good, 0, 100), checkpoint(good, 0, 300), checkpoint(good, 1, 0)):
        cat.add_checkpoint(rec)
    cat.add_checkpoint(checkpoint(bad, 2, 700))
    progress = [(u.newest_step, u.newest_checkpoint_at) for u in cat.units()]
    assert progress == [(300, T0 + 300), (0, T0), (700, T0 + 700)]
    assert [u.newest_step for u in cat.units("digits")] == [300, 0, 700]
    # An untrusted checkpoint is no place to resume from, nor a discarded one.
    cat.add_checkpoint(checkpoint(bad, 0, 900))
    assert unit_of(cat, 0).newest_step == 900
    cat.revoke_worker(bad.worker_id, T0 + 1)
    cat.reset_unit("digits", 0, checkpoint(good, 0, 100).sha256, T0 + 2)
    progress = [(u.newest_step, u.newest_checkpoint_at) for u in cat.units()]
    assert progress == [(100, T0 + 100), (0, T0), (None, None)]


def test_units_report_the_time_of_the_checkpoint_they_would_resume_from(cat: Catalogue) -> None:
    add_job(cat, units=[[9]])
    worker = enrol(cat)
    high = replace(checkpoint(worker, 0, 300), created_at=T0 + 300)
    low_but_later = replace(checkpoint(worker, 0, 100), created_at=T0 + 400)
    cat.add_checkpoint(high)
    cat.add_checkpoint(low_but_later)
    assert cat.newest_checkpoint("digits", 0) == high
    unit = unit_of(cat, 0)
    assert (unit.newest_step, unit.newest_checkpoint_at) == (300, T0 + 300)


def test_retraining_bit_for_bit_to_a_discarded_final_makes_it_current_again(
    cat: Catalogue,
) -> None:
    # Training is deterministic: after a reset, the unit may reach its old final checkpoint
    # byte for byte. The worker then completes with that digest, which must count again.
    add_job(cat, units=[[9]])
    a = enrol(cat, "ka")
    lease = lease_of(cat, a)
    early, final = checkpoint(a, 0, 100), checkpoint(a, 0, 500, final=True)
    cat.add_checkpoint(early)
    cat.add_checkpoint(final)
    assert cat.complete_unit(lease.lease_id, a.worker_id, final.sha256, T0 + 1) == "digits:final"
    cat.reset_unit("digits", 0, early.sha256, T0 + 2)
    assert cat.get_checkpoint(final.sha256).discarded
    again = lease_of(cat, a, T0 + 3)
    assert cat.add_checkpoint(final)[1] is False  # already known by digest
    assert cat.complete_unit(again.lease_id, a.worker_id, final.sha256, T0 + 4) == (
        "digits:final-2"
    )
    assert not cat.get_checkpoint(final.sha256).discarded
    assert cat.newest_checkpoint("digits", 0) == cat.get_checkpoint(final.sha256)
    assert unit_of(cat, 0).newest_step == 500


def test_checkpoints_can_be_listed_by_signer(cat: Catalogue) -> None:
    add_job(cat, units=[[9], [5]])
    a, b = enrol(cat, "ka"), enrol(cat, "kb")
    mine = [checkpoint(a, 0, 100), checkpoint(a, 1, 200)]
    theirs = checkpoint(b, 0, 300)
    for rec in [*mine, theirs]:
        cat.add_checkpoint(rec)
    assert [c.sha256 for c in cat.list_checkpoints(worker_id=a.worker_id)] == [
        c.sha256 for c in mine
    ]
    assert [c.sha256 for c in cat.list_checkpoints("digits", 0, b.worker_id)] == [theirs.sha256]
    assert cat.list_checkpoints(worker_id="w-nobody") == []
