"""Fixtures for the integration tests: an in-process coordinator on loopback over a SQLite file
or a fresh PostgreSQL database, its stubs, enrolled workers and real signed checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2_grpc
from sqlalchemy import Engine, make_url, select

from coordinator.config import ADMIN_CREDENTIAL_FILE, CoordinatorConfig, init_dir, load_config
from coordinator.server import Coordinator
from coordinator.state import CoordinatorState
from tspace_core import serde
from tspace_core.catalogue import Catalogue, sqlite_url
from tspace_core.catalogue.engine import make_engine
from tspace_core.catalogue.models import Base
from tspace_core.data import ImageDataset, load_dataset
from tspace_core.jobspec import Job
from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from tspace_core.rpc import ADMIN_HEADER, CHUNK_BYTES, CREDENTIAL_HEADER, insecure_channel
from tspace_core.runner import make_trainer, model_config_for, save_unit_checkpoint
from tspace_core.signing import Statement, generate_key, key_id, public_key_bytes, sign
from tspace_core.training import UnitTrainer
from worker.agent import resolve_assignment

PG_ADMIN_URL = os.environ.get(
    "TSPACE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
TIMEOUT_S = 30.0  # every test call has a deadline, as every client call must
TINY_STEPS = 4


def tiny_job_toml(name: str = "tiny") -> str:
    """Three single-state units of the tiny model on the bundled digits, 4 steps each."""
    return f"""
name = "{name}"
[states]
count = 3
[units]
partition = "single"
[model]
preset = "tiny"
[training]
steps = {TINY_STEPS}
batch_size = 8
checkpoint_every = 2
[data]
source = "digits"
"""


# --- catalogues: a SQLite file, or a PostgreSQL database made for the test and dropped after ---


def _pg_conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[psycopg.Connection[Any]]:
    try:
        conn = psycopg.connect(_pg_conninfo(PG_ADMIN_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        reason = f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {e}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with conn:
        yield conn


@pytest.fixture(params=["sqlite", "postgresql"])
def catalogue_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "catalogue.db")
        return
    admin: psycopg.Connection[Any] = request.getfixturevalue("pg_admin")
    name = f"tspace_it_{secrets.token_hex(6)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the coordinator under test ---


@dataclass
class WorkerClient:
    """A registered worker: its id, key and the metadata that carries its credential."""

    worker_id: str
    credential: str
    key: Ed25519PrivateKey
    site: str

    @property
    def key_id(self) -> str:
        return key_id(public_key_bytes(self.key))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((CREDENTIAL_HEADER, self.credential),)


@dataclass
class Harness:
    """A coordinator folder served in-process on 127.0.0.1, with stubs to call it."""

    folder: Path
    config: CoordinatorConfig
    metrics_listen: str | None = None
    coordinator: Coordinator | None = None
    channel: grpc.Channel | None = None
    _engine: Engine | None = None
    _catalogue: Catalogue | None = None
    _stubs: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        state = CoordinatorState.open(self.folder, self.config)
        self.coordinator = Coordinator(
            state, "127.0.0.1:0", metrics_listen=self.metrics_listen
        ).start()
        self.channel = insecure_channel(self.coordinator.address)
        self._stubs = {
            "admin": admin_pb2_grpc.AdminServiceStub(self.channel),
            "worker": worker_pb2_grpc.WorkerServiceStub(self.channel),
            "health": health_pb2_grpc.HealthStub(self.channel),
        }

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.coordinator is not None:
            self.coordinator.stop(grace=0.5)
            self.coordinator = None

    def restart(self, **changes: Any) -> None:
        """Stop the server and serve the same folder and catalogue again, with `changes`."""
        self.stop()
        self.config = dataclasses.replace(self.config, **changes)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._catalogue is not None:
            self._catalogue.close()
        if self._engine is not None:
            self._engine.dispose()

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return self._stubs["admin"]

    @property
    def worker(self) -> worker_pb2_grpc.WorkerServiceStub:
        return self._stubs["worker"]

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return self._stubs["health"]

    @property
    def admin_metadata(self) -> tuple[tuple[str, str], ...]:
        credential = (self.folder / ADMIN_CREDENTIAL_FILE).read_text().strip()
        return ((ADMIN_HEADER, credential),)

    @property
    def catalogue(self) -> Catalogue:
        """A second, read-side view of the coordinator's catalogue."""
        if self._catalogue is None:
            self._catalogue = Catalogue(self.config.catalogue_url)
        return self._catalogue

    @property
    def blobs(self) -> Path:
        return self.folder / "blobs"

    # -- admin and enrolment helpers

    job_toml = staticmethod(tiny_job_toml)

    def create_job(self, name: str = "tiny") -> admin_pb2.JobInfo:
        request = admin_pb2.CreateJobRequest(spec_toml=tiny_job_toml(name))
        return self.admin.CreateJob(request, metadata=self.admin_metadata, timeout=TIMEOUT_S)

    def enroll(self, site: str = "site-a", ttl_s: float = 0.0) -> str:
        request = admin_pb2.EnrollRequest(site=site, ttl_s=ttl_s)
        response = self.admin.Enroll(request, metadata=self.admin_metadata, timeout=TIMEOUT_S)
        return str(response.token)

    def register(self, site: str = "site-a") -> WorkerClient:
        """Enrol `site` and register a fresh Ed25519 key with its join token."""
        key = generate_key()
        request = worker_pb2.RegisterRequest(
            token=self.enroll(site), public_key=public_key_bytes(key), device="cpu", hostname="it"
        )
        response = self.worker.Register(request, timeout=TIMEOUT_S)
        assert response.key_id == key_id(public_key_bytes(key))
        return WorkerClient(response.worker_id, response.credential, key, response.site)

    def acquire(self, worker: WorkerClient) -> worker_pb2.AcquireUnitResponse:
        return self.worker.AcquireUnit(
            worker_pb2.AcquireUnitRequest(), metadata=worker.metadata, timeout=TIMEOUT_S
        )

    def assignment(self, worker: WorkerClient) -> serde.Assignment:
        response = self.acquire(worker)
        assert response.WhichOneof("result") == "assignment", response
        return serde.assignment_from_proto(response.assignment)

    # -- uploads, built and sent the way a worker does

    @staticmethod
    def signed_header(
        a: serde.Assignment,
        worker: WorkerClient,
        data: bytes,
        step: int,
        final: bool = False,
        *,
        signer: Ed25519PrivateKey | None = None,
        offset: int = 0,
        **changes: Any,
    ) -> worker_pb2.UploadHeader:
        """A header for `data` under `a`; its statement has fields `changes`d and is signed by
        `signer` (the worker's own key unless given)."""
        fields: dict[str, Any] = {
            "job": a.job,
            "job_hash": a.job_hash,
            "unit": a.unit,
            "attempt": a.attempt,
            "step": step,
            "final": final,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "key_id": worker.key_id,
            "time": time.time(),
        }
        statement = Statement(**{**fields, **changes})
        signed = statement.to_bytes()
        return worker_pb2.UploadHeader(
            lease_id=a.lease_id,
            sha256=statement.sha256,
            size=statement.size,
            offset=offset,
            statement=signed,
            signature=sign(signer or worker.key, signed),
        )

    @staticmethod
    def chunks(data: bytes, offset: int = 0, size: int = CHUNK_BYTES) -> Iterator[bytes]:
        for start in range(offset, len(data), size):
            yield data[start : start + size]

    def upload(
        self,
        worker: WorkerClient,
        header: worker_pb2.UploadHeader | None,
        data: Iterable[bytes],
    ) -> worker_pb2.UploadResponse:
        """One UploadCheckpoint stream: the header (unless None), then `data` as data chunks."""

        def messages() -> Iterator[worker_pb2.UploadChunk]:
            if header is not None:
                yield worker_pb2.UploadChunk(header=header)
            for piece in data:
                yield worker_pb2.UploadChunk(data=piece)

        return self.worker.UploadCheckpoint(messages(), metadata=worker.metadata, timeout=TIMEOUT_S)

    def upload_file(
        self, worker: WorkerClient, a: serde.Assignment, path: Path, step: int, final: bool = False
    ) -> worker_pb2.UploadResponse:
        """Upload the checkpoint file at `path` whole, signed by `worker`."""
        data = path.read_bytes()
        header = self.signed_header(a, worker, data, step, final)
        return self.upload(worker, header, self.chunks(data))

    def complete(self, worker: WorkerClient, a: serde.Assignment, sha256: str) -> str:
        request = worker_pb2.CompleteUnitRequest(lease_id=a.lease_id, sha256=sha256)
        response = self.worker.CompleteUnit(request, metadata=worker.metadata, timeout=TIMEOUT_S)
        return str(response.ensemble)

    def heartbeat(self, worker: WorkerClient, lease_id: str) -> worker_pb2.HeartbeatResponse:
        request = worker_pb2.HeartbeatRequest(lease_id=lease_id, step=1, loss=0.5)
        return self.worker.Heartbeat(request, metadata=worker.metadata, timeout=TIMEOUT_S)

    # -- what "nothing changed" compares

    def snapshot(self, moving: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
        """Every catalogue row (but a worker's last_seen, which any authenticated call moves,
        and the (table, column) pairs in `moving`) and every file in the blob store."""
        if self._engine is None:
            self._engine = make_engine(self.config.catalogue_url)
        skip = {("workers", "last_seen"), *moving}
        tables: dict[str, Any] = {}
        with self._engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                columns = [c for c in table.columns if (table.name, c.name) not in skip]
                rows = conn.execute(select(*columns)).all()
                tables[table.name] = sorted(repr(tuple(r)) for r in rows)
        files = sorted(str(p.relative_to(self.blobs)) for p in self.blobs.rglob("*") if p.is_file())
        return {"tables": tables, "files": files}

    def objects(self) -> set[str]:
        return {p.name for p in (self.blobs / "objects").rglob("*") if p.is_file()}

    def partials(self) -> list[Path]:
        return sorted((self.blobs / "uploads").iterdir())


@pytest.fixture
def coord(catalogue_url: str, tmp_path: Path) -> Iterator[Harness]:
    folder = tmp_path / "coordinator"
    init_dir(folder, catalogue_url)
    harness = Harness(folder, load_config(folder))
    harness.start()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[Harness]:
    """A coordinator over a SQLite file that also serves Prometheus metrics on 127.0.0.1."""
    folder = tmp_path / "coordinator"
    init_dir(folder, sqlite_url(tmp_path / "catalogue.db"))
    harness = Harness(folder, load_config(folder), metrics_listen="127.0.0.1:0")
    harness.start()
    try:
        yield harness
    finally:
        harness.close()


# --- real checkpoints, made the way a worker makes them ---


class CheckpointMaker:
    """Writes genuine tspace checkpoint files for a unit of an assignment's job.

    The trainer is the worker's (same job, seed and model config); its step counter is set
    rather than trained up to, since the coordinator only reads the file's metadata and digest,
    and a few CPU training steps would cost seconds per test. Files are cached by
    (job hash, unit, step): the same job spec on any coordinator gives the same bytes.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._jobs: dict[str, tuple[Job, ImageDataset, dict[str, Any]]] = {}
        self._trainers: dict[tuple[str, int], UnitTrainer] = {}
        self._files: dict[tuple[str, int, int], Path] = {}

    def path(self, a: serde.Assignment, step: int, unit: int | None = None) -> Path:
        unit = a.unit if unit is None else unit
        key = (a.job_hash, unit, step)
        if key not in self._files:
            job, data, config = self._job(a)
            trainer = self._trainers.get((a.job_hash, unit))
            if trainer is None:
                trainer = make_trainer(job, unit, data, config, "cpu")
                self._trainers[(a.job_hash, unit)] = trainer
            trainer.step = step
            path = self.folder / f"{a.job_hash[:12]}-u{unit}-s{step}.safetensors"
            save_unit_checkpoint(trainer, job, unit, data, config, path)
            self._files[key] = path
        return self._files[key]

    def _job(self, a: serde.Assignment) -> tuple[Job, ImageDataset, dict[str, Any]]:
        if a.job_hash not in self._jobs:
            job, _manifest = resolve_assignment(a)
            data = load_dataset(job.spec.data)
            self._jobs[a.job_hash] = (job, data, model_config_for(job, data))
        return self._jobs[a.job_hash]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> CheckpointMaker:
    return CheckpointMaker(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture
def tiny_toml() -> str:
    """The tiny job's spec, for tests that serve a coordinator of their own."""
    return tiny_job_toml()
