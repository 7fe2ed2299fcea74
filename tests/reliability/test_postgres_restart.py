"""PostgreSQL restarted mid-job: the catalogue retries transactions that lost the database for a
bounded time, so a coordinator rides out a restart and carries on; an outage past that budget
reaches callers as a clear UNAVAILABLE. Every test runs on a private server (tests/reliability/
pgserver.py) that it stops like a crash; the machine's shared PostgreSQL is never touched."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from pgserver import PgServer, unavailable_reason
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from coordinator.config import (
    ADMIN_CREDENTIAL_FILE,
    CONFIG_FILE,
    Endpoint,
    hash_secret,
    init_dir,
    load_config,
    write_endpoint,
)
from coordinator.server import Coordinator
from coordinator.state import CoordinatorState
from tspace_core.blobs import BlobStore
from tspace_core.catalogue import Catalogue, CatalogueError
from tspace_core.catalogue.errors import UNREACHABLE
from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from tspace_core.rpc import ADMIN_HEADER, CREDENTIAL_HEADER, insecure_channel
from tspace_core.signing import generate_key, public_key_bytes

DOWN_S = 4.0  # how long each outage lasts; heartbeats and uploads land in it
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with PgServer() as server:
        server.start()
        yield server


@pytest.fixture
def running(pg: PgServer) -> Iterator[PgServer]:
    """The private server, started again after the test whatever the test did to it."""
    yield pg
    if not pg.running:
        pg.start()


def _restart_later(pg: PgServer, after_s: float) -> threading.Thread:
    def later() -> None:
        time.sleep(after_s)
        pg.start()

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return thread


def test_a_transaction_rides_out_a_crash_and_restart(running: PgServer) -> None:
    now = time.time()
    with Catalogue(running.create_database("ride"), reconnect_budget_s=30.0) as catalogue:
        catalogue.add_token("a" * 64, "site", now + 3600, now)  # the pool now holds connections
        running.stop("immediate")
        restart = _restart_later(running, DOWN_S)
        started = time.monotonic()
        catalogue.add_token("b" * 64, "site", now + 3600, now)  # made while the server is down
        took = time.monotonic() - started
        restart.join(TIMEOUT_S)
        tokens = catalogue.list_tokens(now)
        lost = catalogue.lost_transactions
    print(f"\ncatalogue call made during a {DOWN_S:.1f} s outage returned after {took:.1f} s")
    assert took >= DOWN_S * 0.9, "the call cannot have succeeded while the server was down"
    assert sorted(t.token_id[:1] for t in tokens) == ["a", "b"]
    assert lost == 1


def test_past_the_budget_the_error_is_clear_and_prompt(running: PgServer) -> None:
    catalogue = Catalogue(running.create_database("budget"), reconnect_budget_s=2.0)
    try:
        running.stop("immediate")
        started = time.monotonic()
        with pytest.raises(CatalogueError) as raised:
            catalogue.list_jobs()
        took = time.monotonic() - started
        running.start()
        assert catalogue.list_jobs() == []  # the pool reconnects once the server is back
    finally:
        catalogue.close()
    print(f"\ngave up after {took:.1f} s with: {raised.value}")
    assert raised.value.code == "unavailable"
    message = str(raised.value)
    assert message.startswith(UNREACHABLE) and message.endswith("retrying is safe")
    assert "Connection refused" in message or "connection" in message.lower()
    assert 1.0 <= took <= 2.0 + 10.0  # the budget, plus one connect attempt at most


def test_an_acquire_whose_commit_was_cut_off_is_not_leased_twice(running: PgServer) -> None:
    """The connection drops right after COMMIT took effect (injected: a real drop cannot be
    timed that finely). The retry must find the lease that COMMIT made, not lease a second
    unit, which would then sit leased to a lease nobody knows of until it expired."""
    now = time.time()
    with Catalogue(running.create_database("unknown_commit")) as catalogue:
        catalogue.create_job("j", "h" * 64, "{}", [[1], [2]], 4, [], now)
        catalogue.add_token("t" * 64, "site", now + 3600, now)
        worker = catalogue.register_worker("t" * 64, b"k" * 32, "key", "c" * 64, "cpu", "host", now)
        cut_off: list[bool] = []

        def drop_after_commit(session: Session) -> None:
            if not cut_off:
                cut_off.append(True)
                lost = Exception("server closed the connection unexpectedly")
                raise OperationalError("COMMIT", {}, lost, connection_invalidated=True)

        event.listen(Session, "after_commit", drop_after_commit)
        try:
            lease = catalogue.acquire(worker.worker_id, now + 1, 60.0, lambda units: units[0])
        finally:
            event.remove(Session, "after_commit", drop_after_commit)
        units = catalogue.units("j")
        lost = catalogue.lost_transactions
    assert cut_off and lost == 1
    assert lease is not None
    assert [u.lease_id for u in units if u.lease_id is not None] == [lease.lease_id]
    assert sum(u.attempts for u in units) == 1


# --- a coordinator whose database goes away past its budget says so over RPC and in the CLI ---


def _admin_metadata(folder: Path) -> Any:
    return ((ADMIN_HEADER, (folder / ADMIN_CREDENTIAL_FILE).read_text().strip()),)


def test_the_rpc_and_the_cli_say_the_database_is_unreachable(
    running: PgServer, tmp_path: Path
) -> None:
    folder = tmp_path / "coord"
    init_dir(folder, running.create_database("unreachable"))
    admin_secret = (folder / ADMIN_CREDENTIAL_FILE).read_text().strip()
    state = CoordinatorState(
        folder=folder,
        config=load_config(folder),
        catalogue=Catalogue(load_config(folder).catalogue_url, reconnect_budget_s=1.5),
        blobs=BlobStore(folder / "blobs"),
        admin_credential_hash=hash_secret(admin_secret),
    )
    coordinator = Coordinator(state, "127.0.0.1:0").start()
    write_endpoint(folder, Endpoint(coordinator.address, False, False, None))
    channel = insecure_channel(coordinator.address)
    try:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        token = admin.Enroll(
            admin_pb2.EnrollRequest(site="s"), metadata=_admin_metadata(folder), timeout=TIMEOUT_S
        ).token
        key = public_key_bytes(generate_key())
        credential = workers.Register(
            worker_pb2.RegisterRequest(token=token, public_key=key), timeout=TIMEOUT_S
        ).credential
        running.stop("immediate")
        with pytest.raises(grpc.RpcError) as admin_call:
            admin.ListJobs(
                admin_pb2.ListJobsRequest(), metadata=_admin_metadata(folder), timeout=TIMEOUT_S
            )
        # A worker's call fails in the credential check, before its handler runs.
        with pytest.raises(grpc.RpcError) as worker_call:
            workers.AcquireUnit(
                worker_pb2.AcquireUnitRequest(),
                metadata=((CREDENTIAL_HEADER, credential),),
                timeout=TIMEOUT_S,
            )
        cli = subprocess.run(
            [sys.executable, "-m", "coordinator", "jobs", "list", "--dir", str(folder)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if not running.running:
            running.start()
        channel.close()
        coordinator.stop()
    for call in (admin_call.value, worker_call.value):
        assert call.code() == grpc.StatusCode.UNAVAILABLE, call
        assert call.details().startswith(UNREACHABLE), call.details()
        assert call.details().endswith("retrying is safe")
    print(f"\nthe CLI printed: {cli.stderr.strip() or cli.stdout.strip()}")
    assert cli.returncode != 0
    assert UNREACHABLE in cli.stderr + cli.stdout
    assert "Traceback" not in cli.stderr + cli.stdout


def test_leases_outlive_an_outage_longer_than_their_ttl(running: PgServer, tmp_path: Path) -> None:
    """No heartbeat can be recorded while the database is away. Once it is back, the reaper
    gives every active lease one TTL to check in before expiring any."""
    folder = tmp_path / "coord"
    init_dir(folder, running.create_database("outlive"))
    config = dataclasses.replace(load_config(folder), lease_ttl_s=2.0)
    state = CoordinatorState(
        folder=folder,
        config=config,
        catalogue=Catalogue(config.catalogue_url, reconnect_budget_s=0.5),
        blobs=BlobStore(folder / "blobs"),
        admin_credential_hash=hash_secret((folder / ADMIN_CREDENTIAL_FILE).read_text().strip()),
    )
    now = time.time()
    state.catalogue.create_job("j", "h" * 64, "{}", [[1]], 4, [], now)
    state.catalogue.add_token("t" * 64, "site", now + 3600, now)
    worker = state.catalogue.register_worker(
        "t" * 64, b"k" * 32, "key", "c" * 64, "cpu", "host", now
    )
    coordinator = Coordinator(state, "127.0.0.1:0").start()
    try:
        lease = state.catalogue.acquire(worker.worker_id, state.clock(), 2.0, lambda u: u[0])
        assert lease is not None
        running.stop("immediate")
        time.sleep(3 * config.lease_ttl_s)  # every reaper round in it fails
        running.start()
        back = time.monotonic()
        # Within the TTL after the database returns the lease stands, and a beat keeps it.
        _wait_for(lambda: time.monotonic() - back > 1.5, "a few reaper rounds", 10)
        assert state.catalogue.get_lease(lease.lease_id).status == "active"
        beat = state.catalogue.heartbeat(
            lease.lease_id, worker.worker_id, state.clock(), 2.0, 1, 0.5, 1.0
        )
        assert beat.status == "active"
        # Without beats it expires like any other lease.
        _wait_for(
            lambda: state.catalogue.get_lease(lease.lease_id).status == "expired", "expiry", 20
        )
    finally:
        if not running.running:
            running.start()
        coordinator.stop()


# --- the whole system: a coordinator and two workers training while PostgreSQL crashes ---

STEPS, EVERY = 160, 20
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.MULTILINE)


def _wait_for(condition: Any, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _logged_at(log: str, needle: str) -> list[float]:
    """Unix times of the coordinator's log lines that contain `needle`."""
    times = []
    for line in log.splitlines():
        match = LOG_TIME.match(line)
        if match and needle in line:
            times.append(datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


def _serve(folder: Path, url: str, logs: Path) -> tuple[subprocess.Popen[bytes], str]:
    init_dir(folder, url)
    config = json.loads((folder / CONFIG_FILE).read_text())
    # Heartbeats every 5 s, so some land in the outage; an outage of DOWN_S is well inside it.
    config["lease_ttl_s"] = 15.0
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    serve = ["serve", str(folder), "--listen", "127.0.0.1:0", "--no-tls"]
    server = subprocess.Popen(
        [sys.executable, "-m", "coordinator", *serve],
        stdout=(logs / "coordinator.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    address = folder / "address"
    _wait_for(lambda: address.exists() and address.read_text().strip(), "the coordinator", 60)
    return server, address.read_text().strip()


def _join(address: str, token: str, state: Path, log: Path) -> subprocess.Popen[bytes]:
    """A `tspace-worker join` process, as an operator would start one."""
    args = ["join", "--coordinator", address, "--token", token, "--threads", "1"]
    return subprocess.Popen(
        [sys.executable, "-m", "worker", *args, "--state-dir", str(state)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def test_a_job_rides_out_a_postgres_crash_and_restart(
    running: PgServer, tmp_path: Path, tiny_job: Any
) -> None:
    url = running.create_database("midjob")
    folder, logs = tmp_path / "coord", tmp_path
    spec = tiny_job("midjob", 2).replace("steps = 4", f"steps = {STEPS}")
    spec = spec.replace("checkpoint_every = 2", f"checkpoint_every = {EVERY}")
    server, address = _serve(folder, url, logs)
    workers: list[subprocess.Popen[bytes]] = []
    channel = insecure_channel(address)
    watcher = Catalogue(url)
    try:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        meta = _admin_metadata(folder)
        admin.CreateJob(admin_pb2.CreateJobRequest(spec_toml=spec), metadata=meta, timeout=120)
        for i in range(2):
            token = admin.Enroll(admin_pb2.EnrollRequest(site=f"s{i}"), metadata=meta, timeout=30)
            workers.append(
                _join(address, token.token, tmp_path / f"w{i}", logs / f"worker-{i}.log")
            )
        # Training is under way: a unit leased, and a checkpoint already in.
        _wait_for(
            lambda: (
                any(u.lease_id for u in watcher.units("midjob"))
                and watcher.list_checkpoints("midjob")
            ),
            "training to start",
        )
        stopped = time.time()
        running.stop("immediate")
        time.sleep(DOWN_S)
        running.start()
        up = time.time()
        for i, w in enumerate(workers):
            assert w.wait(timeout=300) == 0, (logs / f"worker-{i}.log").read_text()
        verdicts = list(
            admin.VerifyCheckpoints(
                admin_pb2.VerifyCheckpointsRequest(job="midjob"), metadata=meta, timeout=120
            )
        )
        job, units = watcher.get_job("midjob"), watcher.units("midjob")
        ensemble = watcher.get_ensemble("midjob:final")
        checkpoints = watcher.list_checkpoints("midjob")
        events = watcher.events(1000)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        channel.close()
        watcher.close()
        server.terminate()
        server.wait(timeout=60)
    _check_ridden_out(logs, stopped, up)
    assert job.status == "done"
    assert {m.unit for m in ensemble.members} == {0, 1}
    assert verdicts and all(v.ok for v in verdicts), [list(v.problems) for v in verdicts]
    assert len(verdicts) == len(checkpoints)
    for unit in (0, 1):
        steps = sorted(c.step for c in checkpoints if c.unit == unit)
        assert steps == list(range(EVERY, STEPS + 1, EVERY)), (unit, steps)
    # Ridden out: each unit trained under its first lease, none expired, failed or repeated.
    assert [u.attempts for u in units] == [1, 1]
    assert not [e for e in events if e.kind in ("lease_expired", "lease_failed")]


def _check_ridden_out(logs: Path, stopped: float, up: float) -> None:
    """The outage was felt (transactions lost the database) and ridden out (each got through,
    no traceback, no unit failed); prints the figures."""
    coordinator_log = (logs / "coordinator.log").read_text()
    worker_logs = [(logs / f"worker-{i}.log").read_text() for i in range(2)]
    lost = _logged_at(coordinator_log, "lost the catalogue database")
    back = [t for t in _logged_at(coordinator_log, "the catalogue database is back") if t >= up - 1]
    print(
        f"\noutage {up - stopped:.1f} s (down {DOWN_S:.0f} s, then recovery); "
        f"{len(lost)} transaction(s) lost the database and were retried; first to get through "
        f"{back[0] - up:+.1f} s after the server was back"
        if back
        else "\nno transaction recovered"
    )
    assert lost, "no RPC reached the catalogue during the outage: the test proved nothing"
    assert back, coordinator_log[-3000:]
    assert "giving up" not in coordinator_log  # every retried transaction made it
    assert "Traceback" not in coordinator_log + "".join(worker_logs)
    assert not any(" failed: " in log for log in worker_logs), worker_logs
