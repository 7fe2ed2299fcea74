"""A checkpoint blob corrupted on the coordinator's disk: reading it (a fetch for sampling, a
worker's resume fetch, `checkpoints verify`) detects it by digest, answers DATA_LOSS without
ever handing out the whole corrupt file, logs it and marks the checkpoint corrupt; a unit whose
completion rested on it trains again (from an older good checkpoint, or from scratch when that
one is corrupt too, without using up an attempt) and the job completes with a new final
ensemble whose every member verifies. One real coordinator, real worker processes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.config import ADMIN_CREDENTIAL_FILE, init_dir, load_config
from coordinator.server import Coordinator
from coordinator.state import CoordinatorState
from tspace_core.catalogue import Catalogue, sqlite_url
from tspace_core.catalogue.records import CheckpointRecord
from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from tspace_core.rpc import ADMIN_HEADER, insecure_channel

TIMEOUT_S = 120.0
WORKER_TIMEOUT_S = 300.0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Coordinator]]:
    folder = tmp_path / "coord"
    init_dir(folder, sqlite_url(tmp_path / "catalogue.db"))
    coordinator = Coordinator(
        CoordinatorState.open(folder, load_config(folder)), "127.0.0.1:0"
    ).start()
    try:
        yield folder, coordinator
    finally:
        coordinator.stop(grace=0.5)


class Admin:
    """The operator's side: admin calls and fetches with the admin credential."""

    def __init__(self, folder: Path, coordinator: Coordinator) -> None:
        credential = (folder / ADMIN_CREDENTIAL_FILE).read_text().strip()
        self.metadata: Any = ((ADMIN_HEADER, credential),)
        self.channel = insecure_channel(coordinator.address)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.worker = worker_pb2_grpc.WorkerServiceStub(self.channel)

    def call(self, method: str, request: Any) -> Any:
        return getattr(self.admin, method)(request, metadata=self.metadata, timeout=TIMEOUT_S)

    def fetch(self, sha256: str, received: list[bytes]) -> bytes:
        """The checkpoint's bytes; what arrived is kept in `received` should the fetch fail."""
        stream = self.worker.FetchCheckpoint(
            worker_pb2.FetchRequest(sha256=sha256), metadata=self.metadata, timeout=TIMEOUT_S
        )
        for chunk in stream:
            received.append(chunk.data)
        return b"".join(received)

    def verify(self, *digests: str) -> list[Any]:
        request = admin_pb2.VerifyCheckpointsRequest(job="corrupt", checkpoints=list(digests))
        return list(
            self.admin.VerifyCheckpoints(request, metadata=self.metadata, timeout=TIMEOUT_S)
        )


def run_worker(admin: Admin, coordinator: Coordinator, tmp_path: Path, name: str) -> str:
    """Run a `tspace-worker` until no work is left; its log."""
    token = admin.call("Enroll", admin_pb2.EnrollRequest(site=name)).token
    log_path = tmp_path / f"{name}.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "worker", "join"),
                *("--coordinator", coordinator.address, "--token", token),
                *("--state-dir", str(tmp_path / name), "--threads", "1"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            code = worker.wait(timeout=WORKER_TIMEOUT_S)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    text = log_path.read_text()
    assert code == 0, text
    return text


def flip_a_byte(coordinator: Coordinator, ckpt: CheckpointRecord) -> None:
    path = coordinator.state.blobs.path(ckpt.sha256)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_corrupt_checkpoint_is_refused_marked_and_its_unit_trained_again(
    served: tuple[Path, Coordinator], tmp_path: Path, tiny_job: Any
) -> None:
    folder, coordinator = served
    admin = Admin(folder, coordinator)
    catalogue = Catalogue(coordinator.state.config.catalogue_url)
    try:
        admin.call("CreateJob", admin_pb2.CreateJobRequest(spec_toml=tiny_job("corrupt", 2)))
        run_worker(admin, coordinator, tmp_path, "first")
        assert catalogue.get_job("corrupt").status == "done"
        ckpts = {(c.unit, c.step): c for c in catalogue.list_checkpoints("corrupt")}
        assert set(ckpts) == {(0, 2), (0, 4), (1, 2), (1, 4)}
        final0, final1, early1 = ckpts[0, 4], ckpts[1, 4], ckpts[1, 2]
        for ckpt in (final0, final1, early1):
            flip_a_byte(coordinator, ckpt)

        # (a) Sampling fetches unit 0's member: refused, and never the whole corrupt file.
        received: list[bytes] = []
        with pytest.raises(grpc.RpcError) as info:
            admin.fetch(final0.sha256, received)
        err: Any = info.value
        assert err.code() == grpc.StatusCode.DATA_LOSS, err.details()
        assert "corrupt on the coordinator's disk" in err.details()
        assert "requeued to train again" in err.details()
        assert sum(map(len, received)) < final0.size
        assert catalogue.get_checkpoint(final0.sha256).corrupt
        event = next(e for e in catalogue.events(200) if e.kind == "checkpoint_corrupt")
        assert (event.job, event.unit) == ("corrupt", 0) and final0.sha256[:12] in event.message
        # Asking again is refused at once, the same way.
        with pytest.raises(grpc.RpcError) as info:
            admin.fetch(final0.sha256, [])
        assert info.value.code() == grpc.StatusCode.DATA_LOSS  # type: ignore[attr-defined]
        # `checkpoints verify` finds unit 1's final corrupt and marks it too.
        [verdict] = admin.verify(final1.sha256)
        assert not verdict.ok
        assert any("marked corrupt: unit 1" in p and "requeued" in p for p in verdict.problems)
        assert [u.status for u in catalogue.units("corrupt")] == ["pending", "pending"]
        assert catalogue.get_job("corrupt").status == "active"
        assert not catalogue.get_checkpoint(early1.sha256).corrupt  # not read yet

        # (b) A fresh worker trains both units again: unit 0 from its good step-2 checkpoint,
        # unit 1 finds its step-2 resume point corrupt, gives the lease back and starts over.
        log = run_worker(admin, coordinator, tmp_path, "second")
        assert "unit 0 resumes from step 2" in log, log
        assert "unit 1 resumes" not in log, log
        assert f"checkpoint {early1.sha256[:12]}" in log and "lease is cancelled" in log, log
        units = catalogue.units("corrupt")
        assert [(u.status, u.attempts) for u in units] == [("done", 1), ("done", 1)]
        kinds = [e.kind for e in catalogue.events(500)]
        assert kinds.count("checkpoint_corrupt") == 3 and "lease_failed" not in kinds
        job = catalogue.get_job("corrupt")
        assert job.status == "done"
        ensemble = catalogue.get_ensemble("corrupt:final-2")
        for member in ensemble.members:
            assert not member.checkpoint.corrupt and member.checkpoint.in_use
            data = admin.fetch(member.checkpoint.sha256, [])
            assert hashlib.sha256(data).hexdigest() == member.checkpoint.sha256
        digests = [m.checkpoint.sha256 for m in ensemble.members]
        assert all(v.ok for v in admin.verify(*digests)), admin.verify(*digests)
        # Training is deterministic: the finals came back byte for byte and are whole again.
        assert set(digests) == {final0.sha256, final1.sha256}
        # So did unit 1's step-2 checkpoint: received again, it is in use and whole again.
        events = catalogue.events(500)
        repaired = [e for e in events if "received again" in e.message]
        assert {e.unit for e in repaired} == {0, 1} and len(repaired) == 3, repaired
        for ckpt in (final0, final1, early1):
            assert catalogue.get_checkpoint(ckpt.sha256).in_use
            assert coordinator.state.blobs.verify(ckpt.sha256)
    finally:
        catalogue.close()
        admin.channel.close()
