"""coordinator.uploads.read_ahead: a stream pulled ahead by a thread, in order, errors in place."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from coordinator.uploads import read_ahead


def test_items_come_in_order_and_are_pulled_ahead() -> None:
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for i in range(10):
            pulled.append(i)
            yield i

    stream = read_ahead(source(), depth=3)
    assert next(stream) == 0
    deadline = time.monotonic() + 5
    while len(pulled) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    # One taken, three waiting in the buffer, one more pulled and waiting for room: no further.
    time.sleep(0.1)
    assert len(pulled) == 5
    assert list(stream) == list(range(1, 10))


def test_an_error_is_raised_after_the_items_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ConnectionError("the client went away")

    stream = read_ahead(source())
    assert [next(stream), next(stream)] == [1, 2]
    with pytest.raises(ConnectionError, match="went away"):
        next(stream)


def test_a_reader_that_stops_early_stops_the_puller() -> None:
    finished = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            finished.set()

    stream = read_ahead(source(), depth=2)
    assert next(stream) == 0
    stream.close()  # what a refused chunk does: the handler leaves the loop
    assert finished.wait(5)
