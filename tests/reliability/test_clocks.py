"""Leases run on the coordinator's steady clock: a wall-clock step on the coordinator's host does
not expire them, and a worker whose clock is years off trains like any other."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import ADMIN_CREDENTIAL_FILE, init_dir, load_config
from coordinator.server import Coordinator
from coordinator.state import CoordinatorState, SteadyClock
from tspace_core.catalogue import Catalogue, sqlite_url
from tspace_core.catalogue.records import LEASE_ACTIVE
from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from tspace_core.rpc import ADMIN_HEADER, CREDENTIAL_HEADER, insecure_channel
from tspace_core.signing import Statement, generate_key, public_key_bytes

TIMEOUT_S = 30.0
YEARS = 10 * 365 * 24 * 3600.0


def test_the_steady_clock_ignores_wall_clock_steps() -> None:
    wall, mono = [1_000_000.0], [50.0]
    clock = SteadyClock(wall=lambda: wall[0], monotonic=lambda: mono[0])
    assert clock() == 1_000_000.0
    mono[0] += 2.5
    wall[0] -= 3600.0  # the host's clock is set back an hour
    assert clock() == 1_000_002.5
    wall[0] += 86_400.0  # then a day forward
    mono[0] += 1.0
    assert clock() == 1_000_003.5


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Coordinator]]:
    folder = tmp_path / "coord"
    init_dir(folder, sqlite_url(tmp_path / "catalogue.db"))
    config = load_config(folder)
    coordinator = Coordinator(CoordinatorState.open(folder, config), "127.0.0.1:0").start()
    try:
        yield folder, coordinator
    finally:
        coordinator.stop(grace=0.5)


def _admin(folder: Path, coordinator: Coordinator, method: str, request: object) -> object:
    metadata = ((ADMIN_HEADER, (folder / ADMIN_CREDENTIAL_FILE).read_text().strip()),)
    with insecure_channel(coordinator.address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        return getattr(stub, method)(request, metadata=metadata, timeout=120)


def test_a_wall_clock_step_on_the_coordinator_expires_no_lease(
    served: tuple[Path, Coordinator], monkeypatch: pytest.MonkeyPatch, tiny_job: Any
) -> None:
    folder, coordinator = served
    job = admin_pb2.CreateJobRequest(spec_toml=tiny_job("clocks", 2))
    _admin(folder, coordinator, "CreateJob", job)
    token = _admin(folder, coordinator, "Enroll", admin_pb2.EnrollRequest(site="s")).token
    with insecure_channel(coordinator.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        request = worker_pb2.RegisterRequest(
            token=token, public_key=public_key_bytes(generate_key()), device="cpu"
        )
        worker = stub.Register(request, timeout=TIMEOUT_S)
        metadata = ((CREDENTIAL_HEADER, worker.credential),)
        lease = stub.AcquireUnit(
            worker_pb2.AcquireUnitRequest(), metadata=metadata, timeout=TIMEOUT_S
        ).assignment
    ttl = coordinator.state.config.lease_ttl_s
    # The host's clock jumps a day ahead: by wall time every lease is long dead.
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 86_400.0)
    time.sleep(coordinator.state.config.lease_check_interval_s + 1.0)  # a reaper round or more
    catalogue = Catalogue(coordinator.state.config.catalogue_url)
    try:
        record = catalogue.get_lease(lease.lease_id)
    finally:
        catalogue.close()
    assert record.status == LEASE_ACTIVE
    assert record.expires_at - coordinator.state.clock() < ttl  # on the steady clock, not wall


def test_a_worker_whose_clock_is_years_off_trains_normally(
    served: tuple[Path, Coordinator], tmp_path: Path, tiny_job: Any
) -> None:
    folder, coordinator = served
    job = admin_pb2.CreateJobRequest(spec_toml=tiny_job("clocks", 2))
    _admin(folder, coordinator, "CreateJob", job)
    shifted = tmp_path / "shifted-clock"
    shifted.mkdir()
    # Python's clock is shifted; gRPC's core keeps reading the real one, so gRPC's Python layer
    # (which turns timeouts into deadlines on time.time) is given the real clock as well, as
    # on a host whose whole clock is off.
    (shifted / "sitecustomize.py").write_text(
        "import os, time, types\n"
        "_real = time.time\n"
        "_offset = float(os.environ['TSPACE_TEST_CLOCK_OFFSET'])\n"
        "time.time = lambda: _real() + _offset\n"
        "time.time_ns = lambda: int((_real() + _offset) * 1e9)\n"
        "import grpc._channel, grpc._common, grpc._utilities\n"
        "_grpc_time = types.SimpleNamespace(**vars(time))\n"
        "_grpc_time.time = _real\n"
        "for _m in (grpc._channel, grpc._common, grpc._utilities):\n"
        "    _m.time = _grpc_time\n"
    )
    workers = []
    for i, offset in enumerate((YEARS, -YEARS)):
        token = _admin(folder, coordinator, "Enroll", admin_pb2.EnrollRequest(site=f"s{i}")).token
        env = {
            **os.environ,
            "PYTHONPATH": str(shifted),
            "TSPACE_TEST_CLOCK_OFFSET": str(offset),
        }
        log = (tmp_path / f"worker-{i}.log").open("w")
        workers.append(
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "worker", "join"),
                    *("--coordinator", coordinator.address, "--token", token),
                    *("--state-dir", str(tmp_path / f"w{i}"), "--threads", "1"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        for i, w in enumerate(workers):
            assert w.wait(timeout=300) == 0, (tmp_path / f"worker-{i}.log").read_text()
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    catalogue = Catalogue(coordinator.state.config.catalogue_url)
    try:
        assert {u.status for u in catalogue.units("clocks")} == {"done"}
        times = [Statement.from_bytes(c.statement).time for c in catalogue.list_checkpoints()]
        leases_expired = [e for e in catalogue.events(200) if e.kind == "lease_expired"]
    finally:
        catalogue.close()
    # The workers really ran on their own far-off clocks (they sign their time) ...
    now = time.time()
    assert any(t > now + YEARS / 2 for t in times) or any(t < now - YEARS / 2 for t in times)
    # ... and no lease ran out meanwhile.
    assert leases_expired == []
