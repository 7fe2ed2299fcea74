"""The worker-facing gRPC service: register, lease, heartbeat, upload, complete, fetch."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc

from coordinator.config import hash_secret, new_secret
from coordinator.metrics import CoordinatorMetrics
from coordinator.policy import choose_unit, retry_after
from coordinator.state import (
    MAX_TEXT,
    CoordinatorState,
    abort,
    found,
    handles_errors,
    owned_lease,
    upload_key,
)
from coordinator.uploads import UploadCheck, receive_checkpoint
from tspace_core import serde
from tspace_core.catalogue import CatalogueError
from tspace_core.catalogue.records import (
    JOB_ACTIVE,
    JOB_PAUSED,
    UNIT_LEASED,
    UNIT_PENDING,
    LeaseRecord,
)
from tspace_core.errors import BlobError
from tspace_core.proto.tspace.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tspace_core.rpc import CHUNK_BYTES
from tspace_core.signing import key_id

LIVE_JOBS = (JOB_ACTIVE, JOB_PAUSED)


class WorkerService(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, state: CoordinatorState, metrics: CoordinatorMetrics | None = None) -> None:
        self.state = state
        self.metrics = CoordinatorMetrics(state.catalogue) if metrics is None else metrics

    @handles_errors
    def Register(self, request, context):
        if len(request.public_key) != 32:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "public_key must be 32 raw bytes")
        if len(request.token) > MAX_TEXT or len(request.device) > MAX_TEXT:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "token or device too long")
        credential = new_secret()
        now = self.state.clock()
        worker = self.state.catalogue.register_worker(
            hash_secret(request.token),
            bytes(request.public_key),
            key_id(bytes(request.public_key)),
            hash_secret(credential),
            request.device[:MAX_TEXT],
            request.hostname[:MAX_TEXT],
            now,
        )
        self.state.catalogue.add_event(
            "worker_registered",
            f"{worker.worker_id} at site {worker.site}",
            now,
            worker_id=worker.worker_id,
        )
        return worker_pb2.RegisterResponse(
            worker_id=worker.worker_id,
            credential=credential,
            site=worker.site,
            key_id=worker.key_id,
        )

    @handles_errors
    def AcquireUnit(self, request, context):
        worker = self.state.worker(context)
        now, cfg = self.state.clock(), self.state.config
        lease = self.state.catalogue.acquire(worker.worker_id, now, cfg.lease_ttl_s, choose_unit)
        if lease is None:
            jobs = {j.name: j.status for j in self.state.catalogue.list_jobs()}
            units = [u for u in self.state.catalogue.units() if jobs[u.job] in LIVE_JOBS]
            # Finished when nothing can be trained any more (failed units wait for an operator);
            # a paused job may be resumed, so its workers wait.
            trainable = [
                u
                for u in units
                if u.status in (UNIT_PENDING, UNIT_LEASED) or jobs[u.job] == JOB_PAUSED
            ]
            leased = sum(1 for u in units if u.status == UNIT_LEASED)
            return worker_pb2.AcquireUnitResponse(
                no_work=worker_pb2.NoWork(finished=not trainable, retry_after_s=retry_after(leased))
            )
        return worker_pb2.AcquireUnitResponse(assignment=self._assignment(lease))

    def _assignment(self, lease: LeaseRecord) -> worker_pb2.Assignment:
        catalogue = self.state.catalogue
        job = catalogue.get_job(lease.job)
        resolved = json.loads(job.spec_json)
        timesteps = tuple(resolved["units"][lease.unit])
        alphas = dict(zip(resolved["latent_states"], resolved["alphas_cumprod"], strict=True))
        catalogue.add_event(
            "unit_leased",
            f"unit {lease.unit} of {lease.job} to {lease.worker_id} (attempt {lease.attempt})",
            self.state.clock(),
            job=lease.job,
            unit=lease.unit,
            worker_id=lease.worker_id,
        )
        return serde.assignment_to_proto(
            serde.Assignment(
                lease_id=lease.lease_id,
                job=job.name,
                job_hash=job.job_hash,
                spec_json=job.spec_json,
                unit=lease.unit,
                timesteps=timesteps,
                alphas_cumprod=tuple(alphas[t] for t in timesteps),
                attempt=lease.attempt,
                lease_ttl_s=self.state.config.lease_ttl_s,
                shards=job.shards,
                resume_from=catalogue.newest_checkpoint(lease.job, lease.unit),
            )
        )

    @handles_errors
    def Heartbeat(self, request, context):
        worker = self.state.worker(context)
        self.metrics.heartbeats.inc()
        ttl = self.state.config.lease_ttl_s
        try:
            self.state.catalogue.heartbeat(
                request.lease_id[:MAX_TEXT],
                worker.worker_id,
                self.state.clock(),
                ttl,
                max(request.step, 0),
                request.loss,
                request.images_per_s,
            )
        except CatalogueError as exc:
            if exc.code not in ("failed_precondition", "not_found"):
                raise
            return worker_pb2.HeartbeatResponse(lease_ttl_s=ttl, cancel=True)
        return worker_pb2.HeartbeatResponse(lease_ttl_s=ttl, cancel=False)

    @handles_errors
    def UploadStatus(self, request, context):
        worker = self.state.worker(context)
        lease = owned_lease(self.state, context, request.lease_id, worker)
        if found(lambda: self.state.catalogue.get_checkpoint(request.sha256[:64])):
            return worker_pb2.UploadStatusResponse(offset=0, complete=True)
        offset = self.state.blobs.upload_offset(upload_key(lease, request.sha256))
        return worker_pb2.UploadStatusResponse(offset=offset, complete=False)

    @handles_errors
    def UploadCheckpoint(self, request_iterator, context):
        check = UploadCheck()  # a refused credential counts as reason "other"
        try:
            worker = self.state.worker(context)
            chunks = self.metrics.counted(request_iterator)
            response = receive_checkpoint(self.state, context, worker, chunks, check)
        except Exception:  # context.abort raises a plain Exception
            self.metrics.upload_rejected(check.reason)
            raise
        self.metrics.upload_accepted(response.already_registered)
        return response

    @handles_errors
    def CompleteUnit(self, request, context):
        worker = self.state.worker(context)
        now = self.state.clock()
        lease = owned_lease(self.state, context, request.lease_id, worker)
        ensemble = self.state.catalogue.complete_unit(
            lease.lease_id, worker.worker_id, request.sha256[:64], now
        )
        self.state.catalogue.add_event(
            "unit_done",
            f"unit {lease.unit} of {lease.job} done by {worker.worker_id}",
            now,
            job=lease.job,
            unit=lease.unit,
            worker_id=worker.worker_id,
        )
        return worker_pb2.CompleteUnitResponse(ensemble=ensemble or "")

    @handles_errors
    def FailUnit(self, request, context):
        worker = self.state.worker(context)
        lease = owned_lease(self.state, context, request.lease_id, worker)
        self.state.catalogue.fail_lease(
            lease.lease_id,
            worker.worker_id,
            request.error[:1000],
            self.state.clock(),
            self.state.config.max_attempts,
        )
        return worker_pb2.FailUnitResponse()

    @handles_errors
    def FetchCheckpoint(self, request, context):
        self._fetcher(context)
        if found(lambda: self.state.catalogue.get_checkpoint(request.sha256[:64])) is None:
            abort(context, grpc.StatusCode.NOT_FOUND, f"no checkpoint {request.sha256[:64]}")
        yield from self._stream(request.sha256, request.offset)

    @handles_errors
    def FetchShard(self, request, context):
        self._fetcher(context)
        shards = {s.sha256 for j in self.state.catalogue.list_jobs() for s in j.shards}
        if request.sha256 not in shards:
            abort(context, grpc.StatusCode.NOT_FOUND, f"no shard {request.sha256[:64]}")
        yield from self._stream(request.sha256, request.offset)

    def _fetcher(self, context: grpc.ServicerContext) -> None:
        """Workers and the admin (sampling from a coordinator) may fetch."""
        if not self.state.is_admin(context):
            self.state.worker(context)

    def _stream(self, sha256: str, offset: int) -> Iterator[common_pb2.DataChunk]:
        if offset < 0:
            raise BlobError(f"offset {offset} is negative; fetch from 0 or a later byte")
        position = offset
        for chunk in self.state.blobs.read_chunks(sha256, position, CHUNK_BYTES):
            yield common_pb2.DataChunk(offset=position, data=chunk)
            position += len(chunk)
