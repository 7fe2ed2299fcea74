"""Work beside training: heartbeats that keep the lease, uploads that never stall a step."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from tspace_core.proto.tspace.v1 import worker_pb2
from tspace_core.rpc import RetryPolicy
from worker.client import Session

log = logging.getLogger("tspace.worker")
# A beat retries briefly: a long backoff would hold the next beat back past the lease's expiry
# (a coordinator that just restarted gives each lease one TTL), and a lost beat is made good by
# the next one, a third of a TTL later.
BEAT_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.2, max_backoff_s=1.0)


@dataclass
class Progress:
    """The training loop writes it; the heartbeat thread reads it."""

    step: int = 0
    loss: float = 0.0
    images_per_s: float = 0.0


class Heartbeat(threading.Thread):
    """Reports progress every `interval` seconds; sets `cancelled` when the lease is gone."""

    def __init__(self, session: Session, lease_id: str, interval: float, progress: Progress):
        super().__init__(name="heartbeat", daemon=True)
        self.session, self.lease_id, self.interval = session, lease_id, interval
        self.progress = progress
        self.cancelled = threading.Event()
        self._halt = threading.Event()  # not _stop: Thread uses that name

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            p = self.progress
            request = worker_pb2.HeartbeatRequest(
                lease_id=self.lease_id, step=p.step, loss=p.loss, images_per_s=p.images_per_s
            )
            try:
                if self.session.call("Heartbeat", request, BEAT_RETRY).cancel:
                    log.warning("the coordinator ended lease %s; stopping this unit", self.lease_id)
                    self.cancelled.set()
                    return
            except grpc.RpcError as err:  # keep training; the next beat may get through
                log.warning("heartbeat failed (%s)", err.code().name)

    def stop(self) -> None:
        self._halt.set()


@dataclass(frozen=True)
class Upload:
    path: Path
    sha256: str
    statement: bytes
    signature: bytes
    final: bool


class Uploader(threading.Thread):
    """Uploads queued checkpoints in order, in the background; remembers the last result."""

    def __init__(self, session: Session, lease_id: str) -> None:
        super().__init__(name="uploader", daemon=True)
        self.session, self.lease_id = session, lease_id
        self.queue: queue.Queue[Upload | None] = queue.Queue()
        self.lease_lost = threading.Event()
        self.error: Exception | None = None
        self.uploaded: list[str] = []
        self.seconds = 0.0

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.lease_lost.is_set() or self.error is not None:
                continue
            started = time.perf_counter()
            try:
                response = self.session.upload(
                    self.lease_id, item.path, item.sha256, item.statement, item.signature
                )
            except Exception as exc:  # reported to the training loop, which fails the unit
                self.error = exc
                continue
            self.seconds += time.perf_counter() - started
            if response is None:
                self.lease_lost.set()
                continue
            self.uploaded.append(item.sha256)
            if not item.final:
                item.path.unlink(missing_ok=True)

    def put(self, upload: Upload) -> None:
        self.queue.put(upload)

    def finish(self) -> None:
        """Wait until everything queued is uploaded (or has failed)."""
        self.queue.put(None)
        self.join()
