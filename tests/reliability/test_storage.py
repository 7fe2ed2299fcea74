"""The blob store's disk fills up during an upload: the upload is refused with a clear
RESOURCE_EXHAUSTED, nothing half-written is registered, and once space returns the same upload
resumes where it stopped and registers. The store sits on a small tmpfs this test mounts."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.config import ADMIN_CREDENTIAL_FILE, init_dir, load_config
from coordinator.server import Coordinator
from coordinator.state import CoordinatorState
from tspace_core import serde
from tspace_core.catalogue import Catalogue, sqlite_url
from tspace_core.data import load_dataset
from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from tspace_core.rpc import ADMIN_HEADER, CHUNK_BYTES, CREDENTIAL_HEADER, insecure_channel
from tspace_core.runner import make_trainer, model_config_for, save_unit_checkpoint
from tspace_core.signing import Statement, generate_key, key_id, public_key_bytes, sign
from worker.agent import resolve_assignment

TIMEOUT_S = 30.0


def _mount(where: Path, size: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a 3 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where = tmp_path / "disk"
    where.mkdir()
    try:
        _mount(where, "3m")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_refuses_the_upload_then_it_resumes(
    small_disk: Path, tmp_path: Path, tiny_job: Any
) -> None:
    folder = tmp_path / "coord"
    init_dir(folder, sqlite_url(tmp_path / "catalogue.db"))
    blobs = folder / "blobs"
    shutil.rmtree(blobs)
    blobs.symlink_to(small_disk)  # the whole blob store on the small disk
    coordinator = Coordinator(
        CoordinatorState.open(folder, load_config(folder)), "127.0.0.1:0"
    ).start()
    channel = insecure_channel(coordinator.address)
    try:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        metadata: Any = ((ADMIN_HEADER, (folder / ADMIN_CREDENTIAL_FILE).read_text().strip()),)
        job = admin_pb2.CreateJobRequest(spec_toml=tiny_job("full", 1))
        admin.CreateJob(job, metadata=metadata, timeout=120)
        token = admin.Enroll(admin_pb2.EnrollRequest(site="s"), metadata=metadata, timeout=30)
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        key = generate_key()
        worker = stub.Register(
            worker_pb2.RegisterRequest(token=token.token, public_key=public_key_bytes(key)),
            timeout=TIMEOUT_S,
        )
        mine: Any = ((CREDENTIAL_HEADER, worker.credential),)
        a = serde.assignment_from_proto(
            stub.AcquireUnit(worker_pb2.AcquireUnitRequest(), metadata=mine, timeout=30).assignment
        )
        job, _ = resolve_assignment(a)
        data = load_dataset(job.spec.data)
        config = model_config_for(job, data)
        trainer = make_trainer(job, 0, data, config, "cpu")
        trainer.step = 2
        path = tmp_path / "step-2.safetensors"
        save_unit_checkpoint(trainer, job, 0, data, config, path)
        content = path.read_bytes()
        free = shutil.disk_usage(small_disk).free
        assert len(content) > free, "the checkpoint must not fit the small disk"
        digest = hashlib.sha256(content).hexdigest()
        statement = Statement(
            job=a.job,
            job_hash=a.job_hash,
            unit=0,
            attempt=a.attempt,
            step=2,
            final=False,
            sha256=digest,
            size=len(content),
            key_id=key_id(public_key_bytes(key)),
            time=0.0,
        ).to_bytes()

        def upload(offset: int) -> worker_pb2.UploadResponse:
            header = worker_pb2.UploadHeader(
                lease_id=a.lease_id,
                sha256=digest,
                size=len(content),
                offset=offset,
                statement=statement,
                signature=sign(key, statement),
            )

            def chunks() -> Iterator[worker_pb2.UploadChunk]:
                yield worker_pb2.UploadChunk(header=header)
                for start in range(offset, len(content), CHUNK_BYTES):
                    yield worker_pb2.UploadChunk(data=content[start : start + CHUNK_BYTES])

            return stub.UploadCheckpoint(chunks(), metadata=mine, timeout=TIMEOUT_S)

        with pytest.raises(grpc.RpcError) as info:
            upload(0)
        err: Any = info.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert "storage is full" in err.details()
        catalogue = Catalogue(load_config(folder).catalogue_url)
        try:
            assert catalogue.list_checkpoints() == []
            held = stub.UploadStatus(
                worker_pb2.UploadStatusRequest(lease_id=a.lease_id, sha256=digest),
                metadata=mine,
                timeout=TIMEOUT_S,
            ).offset
            assert 0 < held < len(content)
            assert not (small_disk / "objects" / digest[:2] / digest).exists()
            # Space returns: the same upload goes on from the bytes held, not from zero.
            subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
            response = upload(held)
            assert response.checkpoint.sha256 == digest and not response.already_registered
            assert [c.sha256 for c in catalogue.list_checkpoints()] == [digest]
        finally:
            catalogue.close()
        stored = small_disk / "objects" / digest[:2] / digest
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
    finally:
        channel.close()
        coordinator.stop(grace=0.5)
