"""Receiving a checkpoint upload: check the lease, statement and signature, stream to disk,
verify the digest, register it in one transaction. Anything wrong changes nothing."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from coordinator import limits
from coordinator.metrics import RejectReason
from coordinator.state import (
    MAX_TEXT,
    CoordinatorState,
    abort,
    found,
    owned_lease,
    upload_key,
)
from tspace_core import serde
from tspace_core.catalogue.records import CheckpointRecord, LeaseRecord, WorkerRecord
from tspace_core.checkpoint import read_meta
from tspace_core.errors import CheckpointError
from tspace_core.proto.tspace.v1 import worker_pb2
from tspace_core.rpc import CHUNK_BYTES
from tspace_core.signing import MAX_STATEMENT_BYTES, SIGNATURE_BYTES, Statement, verify

MAX_CHUNK = CHUNK_BYTES + 64 * 1024
MAX_METRICS = 64
# Chunks received ahead of the one being written (at most this many MiB held per upload).
READ_AHEAD = 4

T = TypeVar("T")
_END = object()


def read_ahead(items: Iterator[T], depth: int = READ_AHEAD) -> Iterator[T]:
    """`items`, pulled by a thread of its own up to `depth` ahead, so the next chunk crosses the
    network while this one is written and hashed (gRPC asks for a stream's next message only
    when the handler takes it). An error from `items` is raised here, in order."""
    buffer: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pull() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as e:  # handed to the reader
            put((_END, e))
            return
        put((_END, None))

    threading.Thread(target=pull, name="upload-read-ahead", daemon=True).start()
    try:
        while True:
            item, error = buffer.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()  # the reader stopped early (a refused chunk): the puller ends too


@dataclass
class UploadCheck:
    """The check an upload has reached, so that a refused upload is counted under why
    (the rejections metric). An explicit refusal names its reason with `reject`; an error
    raised deeper down (a signature that does not verify, a digest that does not match, a lease
    that is gone) counts under the check that `at` marks as under way. Interceptors see only
    the status code, which several checks share, so they cannot tell these apart."""

    reason: RejectReason = "other"

    @contextmanager
    def at(self, reason: RejectReason) -> Iterator[None]:
        outer = self.reason
        self.reason = reason
        yield
        self.reason = outer  # skipped when the check fails: the failure keeps its reason

    def reject(
        self,
        context: grpc.ServicerContext,
        reason: RejectReason,
        code: grpc.StatusCode,
        message: str,
    ) -> NoReturn:
        self.reason = reason
        abort(context, code, message)


def _check_statement(
    context: grpc.ServicerContext,
    header: worker_pb2.UploadHeader,
    lease: LeaseRecord,
    worker: WorkerRecord,
    job_hash: str,
    check: UploadCheck,
) -> Statement:
    with check.at("statement"):
        statement = Statement.from_bytes(bytes(header.statement))
        expected = {
            "job": lease.job,
            "job_hash": job_hash,
            "unit": lease.unit,
            "attempt": lease.attempt,
            "sha256": header.sha256,
            "size": header.size,
            "key_id": worker.key_id,
        }
        for name, value in expected.items():
            if getattr(statement, name) != value:
                abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"statement {name} is {getattr(statement, name)!r}, the upload needs {value!r}",
                )
    with check.at("signature"):
        verify(worker.public_key, bytes(header.statement), bytes(header.signature))
    return statement


def _header(
    state: CoordinatorState,
    context: grpc.ServicerContext,
    chunks: Iterator[worker_pb2.UploadChunk],
    check: UploadCheck,
) -> worker_pb2.UploadHeader:
    first = next(chunks, None)
    if first is None or first.WhichOneof("part") != "header":
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, "an upload must start with its header")
    header = first.header
    limits.sha256_field(context, header.sha256)
    limit = state.config.max_checkpoint_bytes
    if not 0 < header.size <= limit:
        message = f"size {header.size} not in 1..{limit}"
        check.reject(context, "size", grpc.StatusCode.INVALID_ARGUMENT, message)
    if not 0 <= header.offset <= header.size:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"offset {header.offset} out of range")
    if len(header.statement) > MAX_STATEMENT_BYTES or len(header.signature) != SIGNATURE_BYTES:
        message = f"a statement of at most {MAX_STATEMENT_BYTES} bytes and a 64-byte signature"
        check.reject(context, "statement", grpc.StatusCode.INVALID_ARGUMENT, message)
    return header


def receive_checkpoint(
    state: CoordinatorState,
    context: grpc.ServicerContext,
    worker: WorkerRecord,
    chunks: Iterator[worker_pb2.UploadChunk],
    check: UploadCheck | None = None,
) -> worker_pb2.UploadResponse:
    """Receive, verify and register one upload; `check` ends at the check that refused it."""
    check = UploadCheck() if check is None else check
    with check.at("format"):
        header = _header(state, context, chunks, check)
    with check.at("lease"):
        lease = owned_lease(state, context, header.lease_id, worker)
    job = state.catalogue.get_job(lease.job)
    model_limit = limits.checkpoint_limit(job.spec_json)
    if header.size > model_limit:
        check.reject(
            context,
            "size",
            grpc.StatusCode.INVALID_ARGUMENT,
            f"size {header.size} is more than a checkpoint of job {job.name}'s model can be "
            f"({model_limit} bytes)",
        )
    statement = _check_statement(context, header, lease, worker, job.job_hash, check)
    if statement.step > job.total_steps or statement.final != (statement.step == job.total_steps):
        check.reject(
            context,
            "statement",
            grpc.StatusCode.INVALID_ARGUMENT,
            f"step {statement.step} (final={statement.final}) does not fit a unit of "
            f"{job.total_steps} steps: only the checkpoint at the last step is final",
        )
    existing = found(lambda: state.catalogue.get_checkpoint(header.sha256))
    if existing is not None and (existing.job, existing.unit, existing.step, existing.size) != (
        statement.job,
        statement.unit,
        statement.step,
        statement.size,
    ):
        # Equal digests mean equal bytes, and the bytes name their job, unit and step.
        check.reject(
            context,
            "statement",
            grpc.StatusCode.INVALID_ARGUMENT,
            f"these bytes are checkpoint {header.sha256[:12]} of {existing.job} unit "
            f"{existing.unit} step {existing.step}, not what the statement says",
        )
    if existing is not None and existing.in_use:
        return worker_pb2.UploadResponse(
            checkpoint=serde.checkpoint_to_proto(existing), already_registered=True
        )
    if existing is not None and not existing.corrupt:  # corrupt bytes must come again
        return _vouch(state, context, lease, worker, statement, header, chunks, check)
    key = upload_key(lease, header.sha256)
    received = _receive_data(state, context, key, header, chunks, check)
    if received < header.size:
        check.reject(
            context,
            "incomplete",
            grpc.StatusCode.FAILED_PRECONDITION,
            f"upload incomplete: {received} of {header.size} bytes; resume from offset {received}",
        )
    # The same bytes may be in the store already as something else (a job's data shard).
    existed = state.blobs.has(header.sha256)
    with check.at("digest"):
        path = state.blobs.finish(key, header.sha256, header.size)
    try:
        with check.at("format"):
            candidate = _record(state, context, path, statement, header, worker)
        record, created = state.catalogue.add_checkpoint(candidate)
    except BaseException:
        # Nothing half-registered: an unverifiable file does not stay in the store, but a blob
        # this upload did not bring is not this upload's to delete.
        if not existed and found(lambda: state.catalogue.get_checkpoint(header.sha256)) is None:
            path.unlink(missing_ok=True)
        raise
    state.catalogue.add_event(
        "checkpoint_registered",
        f"unit {lease.unit} step {statement.step}{' (final)' if statement.final else ''}",
        state.clock(),
        job=lease.job,
        unit=lease.unit,
        worker_id=worker.worker_id,
    )
    return worker_pb2.UploadResponse(
        checkpoint=serde.checkpoint_to_proto(record), already_registered=not created
    )


def _vouch(
    state: CoordinatorState,
    context: grpc.ServicerContext,
    lease: LeaseRecord,
    worker: WorkerRecord,
    statement: Statement,
    header: worker_pb2.UploadHeader,
    chunks: Iterator[worker_pb2.UploadChunk],
    check: UploadCheck,
) -> worker_pb2.UploadResponse:
    """The bytes are in the store already, recorded under a signer no longer trusted (revoked)
    or discarded by a reset: this worker's signed statement vouches for them anew. Training is
    deterministic, so a retrained unit can reproduce a checkpoint byte for byte."""
    if next(chunks, None) is not None:
        message = "the coordinator holds these bytes already; send the header alone"
        check.reject(context, "format", grpc.StatusCode.INVALID_ARGUMENT, message)
    with check.at("format"):
        path = state.blobs.path(header.sha256)
        candidate = _record(state, context, path, statement, header, worker)
    record, _ = state.catalogue.add_checkpoint(candidate)
    state.catalogue.add_event(
        "checkpoint_registered",
        f"unit {lease.unit} step {statement.step} vouched for again by {worker.worker_id}",
        state.clock(),
        job=lease.job,
        unit=lease.unit,
        worker_id=worker.worker_id,
    )
    return worker_pb2.UploadResponse(
        checkpoint=serde.checkpoint_to_proto(record), already_registered=False
    )


def _receive_data(
    state: CoordinatorState,
    context: grpc.ServicerContext,
    key: str,
    header: worker_pb2.UploadHeader,
    chunks: Iterator[worker_pb2.UploadChunk],
    check: UploadCheck,
) -> int:
    offset = state.blobs.upload_offset(key)
    if header.offset != offset:
        check.reject(
            context,
            "incomplete",
            grpc.StatusCode.FAILED_PRECONDITION,
            f"upload offset {header.offset} does not match the {offset} bytes held; resume there",
        )
    for chunk in read_ahead(chunks):
        if chunk.WhichOneof("part") != "data" or len(chunk.data) > MAX_CHUNK:
            message = "expected data chunks of <= 1 MiB"
            check.reject(context, "format", grpc.StatusCode.INVALID_ARGUMENT, message)
        with check.at("size"):  # the only way a valid append fails: beyond the signed size
            offset = state.blobs.append(key, offset, bytes(chunk.data), max_size=header.size)
    return offset


def _record(
    state: CoordinatorState,
    context: grpc.ServicerContext,
    path: object,
    statement: Statement,
    header: worker_pb2.UploadHeader,
    worker: WorkerRecord,
) -> CheckpointRecord:
    """The catalogue record; the file's own metadata must agree with what was signed."""
    try:
        meta = read_meta(path)  # type: ignore[arg-type]
    except CheckpointError as exc:
        # The coordinator's own paths are none of the uploader's business.
        reason = str(exc).replace(str(path), "the upload")
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"not a tspace checkpoint: {reason}")
    if (meta.get("job"), meta.get("unit"), meta.get("step")) != (
        statement.job,
        statement.unit,
        statement.step,
    ):
        abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            "the checkpoint's metadata (job, unit, step) differs from the signed statement",
        )
    return CheckpointRecord(
        sha256=header.sha256,
        size=header.size,
        job=statement.job,
        unit=statement.unit,
        step=statement.step,
        final=statement.final,
        statement=bytes(header.statement),
        signature=bytes(header.signature),
        worker_id=worker.worker_id,
        key_id=worker.key_id,
        public_key=worker.public_key,
        created_at=state.clock(),
        attempt=statement.attempt,
        metrics=_metrics(context, meta.get("metrics", {})),
        shards_seen=_shards_seen(context, meta.get("shards_seen", [])),
    )


def _metrics(context: grpc.ServicerContext, metrics: Any) -> dict[str, float | None]:
    """Numbers only, and a non-finite one (a diverged or not yet measured loss) as null:
    PostgreSQL's JSON has no NaN, so storing it as is would fail the whole upload."""
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, "checkpoint metrics: a table of numbers")
    out: dict[str, float | None] = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"checkpoint metric {name!r}: a number"
            )
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float
            number = math.inf
        out[str(name)[:MAX_TEXT]] = number if math.isfinite(number) else None
    return out


def _shards_seen(context: grpc.ServicerContext, shards: Any) -> tuple[str, ...]:
    if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, "checkpoint shards_seen: a list of names")
    return tuple(s[:MAX_TEXT] for s in shards)
