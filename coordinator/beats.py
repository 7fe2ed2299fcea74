"""Heartbeats written by group commit: beats that arrive together share one transaction.

Every worker beats every few seconds, so a large fleet makes heartbeats most of the catalogue's
writes, and a transaction of its own per beat (a commit and, on SQLite, an fsync each) caps them
at a few hundred a second. Here a beat is queued and its handler waits; one writer thread takes
whatever is queued, applies it in one transaction (`Catalogue.beat_many`) and wakes each handler
with its own outcome. Nothing changes for the worker: its beat is durable, and a refusal
(ended lease, wrong holder) is its own, before the reply. With one beat in flight the writer
commits it at once, so a quiet coordinator adds no delay; under load the batches grow by
themselves, by as many beats as arrive while the previous commit runs.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from tspace_core.catalogue import Beat, Catalogue, CatalogueError

MAX_BATCH = 256


@dataclass
class _Pending:
    beat: Beat
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class BeatWriter:
    """Writes heartbeats to `catalogue` in shared transactions from one daemon thread, started
    with the first beat."""

    def __init__(self, catalogue: Catalogue, max_batch: int = MAX_BATCH) -> None:
        self.catalogue = catalogue
        self.max_batch = max_batch
        self.batches = 0  # transactions committed, for tests and benchmarks
        self.beats = 0
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def beat(self, beat: Beat) -> None:
        """Apply `beat` and return once it is committed; raises what `Catalogue.heartbeat` would
        (a CatalogueError for a refused beat or an unreachable database)."""
        pending = _Pending(beat)
        with self._lock:
            if self._closed:
                raise CatalogueError("unavailable", "the coordinator is shutting down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="beat-writer", daemon=True)
                self._thread.start()
            self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error

    def close(self) -> None:
        """Finish the beats already queued, then stop the writer thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
            self._queue.put(None)
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._write(batch)
            if stop:
                return

    def _write(self, batch: list[_Pending]) -> None:
        try:
            outcomes: list[BaseException | None] = list(
                self.catalogue.beat_many([p.beat for p in batch])
            )
            self.batches += 1
            self.beats += len(batch)
        except CatalogueError as e:  # the transaction failed, and so did every beat in it
            outcomes = [CatalogueError(e.code, str(e)) for _ in batch]
        except Exception as e:
            outcomes = [RuntimeError(f"writing heartbeats failed: {e!r}") for _ in batch]
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.error = outcome
            pending.done.set()
