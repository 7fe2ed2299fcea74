"""The worker-facing gRPC service: register, lease, heartbeat, upload, complete, fetch."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import NoReturn

import grpc

from coordinator import limits
from coordinator.beats import BeatWriter
from coordinator.config import hash_secret, new_secret
from coordinator.metrics import CoordinatorMetrics
from coordinator.policy import choose_unit, retry_after
from coordinator.state import (
    CoordinatorState,
    abort,
    check_lease_id,
    found,
    handles_errors,
    owned_lease,
    upload_key,
)
from coordinator.uploads import UploadCheck, receive_checkpoint
from tspace_core import serde, tls
from tspace_core.blobs import CorruptBlob
from tspace_core.catalogue import Beat, CatalogueError
from tspace_core.catalogue.records import (
    JOB_ACTIVE,
    JOB_PAUSED,
    UNIT_LEASED,
    UNIT_PENDING,
    CorruptCheckpoint,
    JobRecord,
    LeaseRecord,
)
from tspace_core.proto.tspace.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tspace_core.rpc import CHUNK_BYTES
from tspace_core.signing import PUBLIC_KEY_BYTES, key_id

LIVE_JOBS = (JOB_ACTIVE, JOB_PAUSED)


class WorkerService(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, state: CoordinatorState, metrics: CoordinatorMetrics | None = None) -> None:
        self.state = state
        self.metrics = CoordinatorMetrics(state.catalogue) if metrics is None else metrics
        self._jobs: dict[str, tuple[JobRecord, dict]] = {}
        self._jobs_lock = threading.Lock()
        self.beats = BeatWriter(state.catalogue)

    @handles_errors
    def Register(self, request, context):
        token = limits.token_field(context, request.token)
        if len(request.public_key) != PUBLIC_KEY_BYTES:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "public_key must be 32 raw bytes")
        device = limits.label_field(context, request.device, "device")
        hostname = limits.label_field(context, request.hostname, "hostname")
        ca = self.state.tls_ca
        if len(request.csr) > tls.MAX_CSR_BYTES:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "csr is too large")
        if ca is not None and self.state.client_certs and not request.csr:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "this coordinator requires client certificates: send a certificate signing "
                "request (csr) with the registration",
            )
        if ca is not None and request.csr:
            # Checked before the token is spent: a bad request must change nothing.
            tls.check_csr(bytes(request.csr))
        credential = new_secret()
        now = self.state.clock()
        worker = self.state.catalogue.register_worker(
            hash_secret(token),
            bytes(request.public_key),
            key_id(bytes(request.public_key)),
            hash_secret(credential),
            device,
            hostname,
            now,
        )
        certificate = b""
        if ca is not None and request.csr:
            certificate = tls.sign_client_csr(ca, bytes(request.csr), worker.worker_id)
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
            client_certificate=certificate,
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

    def _job(self, name: str) -> tuple[JobRecord, dict]:
        """A job's record and parsed spec, read once: what an assignment takes from them (name,
        hash, spec, shards) never changes, as a job's name cannot be given to another spec."""
        with self._jobs_lock:
            known = self._jobs.get(name)
        if known is None:
            job = self.state.catalogue.get_job(name)
            known = (job, json.loads(job.spec_json))
            with self._jobs_lock:
                self._jobs[name] = known
        return known

    def _assignment(self, lease: LeaseRecord) -> worker_pb2.Assignment:
        catalogue = self.state.catalogue
        job, resolved = self._job(lease.job)
        timesteps = tuple(resolved["units"][lease.unit])
        alphas = dict(zip(resolved["latent_states"], resolved["alphas_cumprod"], strict=True))
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
        check_lease_id(context, request.lease_id)
        step = limits.int_field(context, request.step, "step", 0, limits.MAX_STEP)
        rate = limits.rate_field(context, request.images_per_s, "images_per_s")
        try:
            self.beats.beat(
                Beat(
                    request.lease_id,
                    worker.worker_id,
                    self.state.clock(),
                    ttl,
                    step,
                    limits.loss_value(request.loss),
                    rate,
                )
            )
        except CatalogueError as exc:
            if exc.code not in ("failed_precondition", "not_found"):
                raise
            return worker_pb2.HeartbeatResponse(lease_ttl_s=ttl, cancel=True)
        return worker_pb2.HeartbeatResponse(lease_ttl_s=ttl, cancel=False)

    @handles_errors
    def UploadStatus(self, request, context):
        worker = self.state.worker(context)
        sha256 = limits.sha256_field(context, request.sha256)
        lease = owned_lease(self.state, context, request.lease_id, worker)
        existing = found(lambda: self.state.catalogue.get_checkpoint(sha256))
        if existing is not None and existing.in_use:
            return worker_pb2.UploadStatusResponse(offset=0, complete=True)
        if existing is not None and not existing.corrupt:
            # The bytes are here, vouched for by nobody trusted: a signed header is all it takes.
            return worker_pb2.UploadStatusResponse(offset=existing.size, complete=False)
        # A new checkpoint, or one whose stored bytes are corrupt: the bytes must come again.
        offset = self.state.blobs.upload_offset(upload_key(lease, sha256))
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
        sha256 = limits.sha256_field(context, request.sha256)
        lease = owned_lease(self.state, context, request.lease_id, worker)
        ensemble = self.state.catalogue.complete_unit(lease.lease_id, worker.worker_id, sha256, now)
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
        error = limits.message_field(context, request.error, "error")
        self.state.catalogue.fail_lease(
            lease.lease_id,
            worker.worker_id,
            error[:1000],
            self.state.clock(),
            self.state.config.max_attempts,
        )
        return worker_pb2.FailUnitResponse()

    @handles_errors
    def FetchCheckpoint(self, request, context):
        fetcher = self._fetcher(context)
        sha256 = limits.sha256_field(context, request.sha256)
        record = found(lambda: self.state.catalogue.get_checkpoint(sha256))
        if record is None:
            abort(context, grpc.StatusCode.NOT_FOUND, f"no checkpoint {sha256}")
        if record.corrupt:  # found before: not read (nor sent) again
            self._refuse_corrupt(context, sha256, fetcher, None)
        try:
            yield from self._stream(context, sha256, request.offset)
        except CorruptBlob as exc:
            self._refuse_corrupt(context, sha256, fetcher, exc)

    def _refuse_corrupt(
        self,
        context: grpc.ServicerContext,
        sha256: str,
        fetcher: str | None,
        exc: CorruptBlob | None,
    ) -> NoReturn:
        """Mark the checkpoint corrupt (a worker resuming from it gives its lease back) and
        answer DATA_LOSS, saying what happens next."""
        if exc is not None and self.state.blobs.verify(sha256):
            # An upload of the same bytes repaired the file while this read the old one.
            message = "the checkpoint was replaced while it was read; fetch it again"
            abort(context, grpc.StatusCode.UNAVAILABLE, message)
        problem = (
            "found corrupt before" if exc is None else f"its content hashes to {exc.actual[:12]}"
        )
        marked = self.state.catalogue.mark_corrupt(sha256, problem, self.state.clock(), fetcher)
        abort(context, grpc.StatusCode.DATA_LOSS, corrupt_message(marked))

    @handles_errors
    def FetchShard(self, request, context):
        self._fetcher(context)
        sha256 = limits.sha256_field(context, request.sha256)
        shards = {s.sha256 for j in self.state.catalogue.list_jobs() for s in j.shards}
        if sha256 not in shards:
            abort(context, grpc.StatusCode.NOT_FOUND, f"no shard {sha256}")
        try:
            yield from self._stream(context, sha256, request.offset)
        except CorruptBlob as exc:
            abort(context, grpc.StatusCode.DATA_LOSS, f"data shard {exc}; tell the operator")

    def _fetcher(self, context: grpc.ServicerContext) -> str | None:
        """Workers and the admin (sampling from a coordinator) may fetch; the worker's id, or
        None for the admin."""
        if self.state.is_admin(context):
            return None
        return self.state.worker(context).worker_id

    def _stream(
        self, context: grpc.ServicerContext, sha256: str, offset: int
    ) -> Iterator[common_pb2.DataChunk]:
        """The blob from `offset`, checked against its digest as it is read (CorruptBlob on a
        mismatch, before its last chunk is sent)."""
        position = limits.int_field(context, offset, "offset", 0, limits.MAX_OFFSET)
        for chunk in self.state.blobs.read_verified(sha256, position, CHUNK_BYTES):
            yield common_pb2.DataChunk(offset=position, data=chunk)
            position += len(chunk)


def corrupt_message(marked: CorruptCheckpoint) -> str:
    """Why a corrupt checkpoint is refused, and what happens next, for whoever asked for it."""
    ckpt = marked.checkpoint
    what = (
        f"checkpoint {ckpt.sha256[:12]} ({ckpt.job} unit {ckpt.unit} step {ckpt.step}) is "
        "corrupt on the coordinator's disk and no longer handed out"
    )
    unit = f"unit {ckpt.unit} of {ckpt.job}"
    if marked.cancelled:
        then = (
            f"this lease is cancelled without counting an attempt; {unit} resumes from an "
            "older good checkpoint"
        )
    elif marked.requeued:
        then = (
            f"{unit} was requeued to train again; once the job is done again, use its new "
            "final ensemble"
        )
    else:
        then = (
            f"an ensemble holding it cannot be sampled; use one registered after {unit} is "
            "trained again"
        )
    return f"{what}: {then}"
