"""Heartbeats by group commit (coordinator.beats) against a real SQLite file and PostgreSQL:
beats that arrive together share transactions, and each still gets its own outcome."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator

import pytest

from coordinator.beats import BeatWriter
from coordinator.policy import choose_unit
from tspace_core.catalogue import LEASE_ACTIVE, Beat, Catalogue, CatalogueError

T0, TTL = 1_700_000_000.0, 30.0
THREADS, BEATS = 16, 25


@pytest.fixture
def cat(catalogue_url: str) -> Iterator[Catalogue]:
    with Catalogue(catalogue_url) as catalogue:
        yield catalogue


def enrolled(cat: Catalogue, n: int) -> list[str]:
    workers = []
    for i in range(n):
        token = hashlib.sha256(f"k{i}".encode()).hexdigest()
        cat.add_token(token, "site", T0 + 3600, T0)
        record = cat.register_worker(token, f"pk{i}".encode(), f"k{i}", f"c{i}", "cpu", "h", T0)
        workers.append(record.worker_id)
    return workers


def test_concurrent_beats_share_transactions_and_keep_their_own_outcomes(cat: Catalogue) -> None:
    cat.create_job("j", "h", json.dumps({}), [[i] for i in range(THREADS + 1)], 10, [], T0)
    workers = enrolled(cat, THREADS + 1)
    leases = [cat.acquire(w, T0, TTL, choose_unit) for w in workers]
    assert all(lease is not None for lease in leases)
    ended = leases[-1]
    assert ended is not None
    cat.fail_lease(ended.lease_id, workers[-1], "boom", T0, max_attempts=3)
    writer = BeatWriter(cat)
    errors: dict[int, list[str]] = {i: [] for i in range(THREADS + 1)}
    start = threading.Barrier(THREADS + 1)

    def beat(i: int) -> None:
        lease = leases[i]
        assert lease is not None
        start.wait()
        for step in range(1, BEATS + 1):
            try:
                writer.beat(Beat(lease.lease_id, workers[i], T0 + step, TTL, step, 0.5, 9.0))
            except CatalogueError as e:
                errors[i].append(e.code)

    threads = [threading.Thread(target=beat, args=(i,)) for i in range(THREADS + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    # The ended lease was refused every time, and only it.
    assert errors.pop(THREADS) == ["failed_precondition"] * BEATS
    assert all(codes == [] for codes in errors.values())
    for lease in leases[:THREADS]:
        assert lease is not None
        now = cat.get_lease(lease.lease_id)
        assert (now.status, now.step, now.expires_at) == (LEASE_ACTIVE, BEATS, T0 + BEATS + TTL)
    assert writer.beats == (THREADS + 1) * BEATS
    assert writer.batches < writer.beats  # beats arriving together were committed together


def test_a_closed_writer_refuses_beats_clearly(cat: Catalogue) -> None:
    writer = BeatWriter(cat)
    writer.close()
    with pytest.raises(CatalogueError, match="shutting down") as excinfo:
        writer.beat(Beat("l-0000000000000000", "w-0", T0, TTL, 1, 0.0, 0.0))
    assert excinfo.value.code == "unavailable"
