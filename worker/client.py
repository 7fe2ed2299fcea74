"""The worker's side of the wire: unary calls with deadlines and retries, fetches and uploads."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from tspace_core.errors import TspaceError
from tspace_core.fsio import fsync_dir
from tspace_core.proto.tspace.v1 import worker_pb2, worker_pb2_grpc
from tspace_core.rpc import (
    CHUNK_BYTES,
    CREDENTIAL_HEADER,
    ChannelSecurity,
    RetryPolicy,
    backoff_delays,
    call_with_retry,
    file_chunks,
    iter_stream,
    open_channel,
)

log = logging.getLogger("tspace.worker")

CALL_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 600.0
RETRY = RetryPolicy(attempts=6, initial_backoff_s=0.5, max_backoff_s=10.0)
# An upload outlasts a coordinator restart or a link down for minutes: the file on disk is all
# that bounds the work lost, so it is retried until the lease is known gone or this runs out.
UPLOAD_PATIENCE_S = 15 * 60.0
UPLOAD_RETRY = RetryPolicy(attempts=10**9, initial_backoff_s=0.5, max_backoff_s=10.0)


class LeaseLost(TspaceError):
    """The coordinator no longer holds this worker's lease (expired or ended)."""


class CorruptOnCoordinator(TspaceError):
    """The coordinator's stored copy of a blob failed its digest (DATA_LOSS): no retry helps."""


class Session:
    """A channel to the coordinator and the worker's credential, sent with every call."""

    def __init__(
        self,
        address: str,
        credential: str | None = None,
        security: ChannelSecurity | None = None,
    ) -> None:
        self.address = address
        self.channel = open_channel(address, security)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)
        self.credential = credential

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((CREDENTIAL_HEADER, self.credential),) if self.credential else ()

    def call(self, method: str, request: Any, policy: RetryPolicy = RETRY) -> Any:
        """A unary call with a deadline per attempt, retried on transient failures."""
        fn = getattr(self.stub, method)
        return call_with_retry(
            fn, request, timeout=CALL_TIMEOUT_S, metadata=self.metadata, policy=policy
        )

    def close(self) -> None:
        self.channel.close()

    def fetch(self, method: str, sha256: str, size: int, dest: Path) -> Path:
        """Download a blob into `dest` (resuming a partial file), then check its digest."""
        from tspace_core.fsio import sha256_file

        if dest.exists() and sha256_file(dest) == sha256:
            return dest
        part = dest.with_name(dest.name + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        delays = backoff_delays(RETRY)
        for attempt in range(RETRY.attempts):
            offset = part.stat().st_size if part.exists() else 0
            try:
                self._fetch_into(method, sha256, size, part, offset)
                break
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.DATA_LOSS:
                    # What arrived is part of a corrupt file: never resume from it.
                    part.unlink(missing_ok=True)
                    raise CorruptOnCoordinator(err.details() or "corrupt blob") from None
                if err.code() not in RETRY.retryable or attempt == RETRY.attempts - 1:
                    raise
                time.sleep(next(delays))
        if sha256_file(part) != sha256:
            part.unlink()
            raise TspaceError(f"downloaded {dest.name} does not match its digest {sha256[:12]}")
        part.replace(dest)
        fsync_dir(dest.parent)
        return dest

    def _fetch_into(self, method: str, sha256: str, size: int, part: Path, offset: int) -> None:
        request = worker_pb2.FetchRequest(sha256=sha256, offset=offset)
        responses = getattr(self.stub, method)(
            request, timeout=STREAM_TIMEOUT_S, metadata=self.metadata
        )
        with part.open("ab") as f:
            for data in iter_stream(responses, offset=offset, expected_size=size):
                f.write(data)

    def upload(
        self, lease_id: str, path: Path, sha256: str, statement: bytes, signature: bytes
    ) -> worker_pb2.UploadResponse | None:
        """Upload a signed checkpoint, resuming from what the coordinator already holds.

        Returns None when the lease is gone (the coordinator refuses the upload for good).
        """
        size = path.stat().st_size
        delays = backoff_delays(UPLOAD_RETRY)
        deadline = time.monotonic() + UPLOAD_PATIENCE_S
        while True:
            try:
                status = self.call(
                    "UploadStatus", worker_pb2.UploadStatusRequest(lease_id=lease_id, sha256=sha256)
                )
                if status.complete:
                    return worker_pb2.UploadResponse(already_registered=True)
                if status.offset:
                    log.info(
                        "resuming the upload of %s at byte %d of %d", path.name, status.offset, size
                    )
                header = worker_pb2.UploadHeader(
                    lease_id=lease_id,
                    sha256=sha256,
                    size=size,
                    offset=status.offset,
                    statement=statement,
                    signature=signature,
                )
                return self.stub.UploadCheckpoint(
                    _upload_chunks(header, path), timeout=STREAM_TIMEOUT_S, metadata=self.metadata
                )
            except grpc.RpcError as err:
                code = err.code()
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION) and (
                    "lease" in (err.details() or "")
                ):
                    return None
                if code not in RETRY.retryable or time.monotonic() > deadline:
                    raise
                log.warning("upload of %s interrupted (%s); resuming", path.name, code.name)
                time.sleep(next(delays))


def _upload_chunks(header: worker_pb2.UploadHeader, path: Path) -> Iterator[worker_pb2.UploadChunk]:
    yield worker_pb2.UploadChunk(header=header)
    for chunk in file_chunks(path, header.offset, CHUNK_BYTES):
        yield worker_pb2.UploadChunk(data=chunk)


def wait_for_coordinator(
    call: Callable[[], Any], describe: str, stop: Callable[[], bool] = lambda: False
) -> Any:
    """Keep calling through an unreachable coordinator, with capped backoff, until it answers."""
    delay = 1.0
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() not in RETRY.retryable or stop():
                raise
            # Jittered, so many workers cut off together do not return in lockstep.
            wait = delay * (0.5 + random.random() / 2)
            log.warning(
                "%s: coordinator unreachable (%s); retrying in %.1f s",
                describe,
                err.code().name,
                wait,
            )
            time.sleep(wait)
            delay = min(delay * 2, 30.0)
