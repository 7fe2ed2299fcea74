"""Retries, backoff and chunked streams, against a real gRPC server on the loopback interface."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tspace_core import rpc
from tspace_core.errors import SpecError, TspaceError
from tspace_core.proto.tspace.v1 import common_pb2, worker_pb2

# ---------------------------------------------------------------- a tiny real server


@dataclass
class Flaky:
    """Fails the first `failures` calls with `code`; records what every call arrived with."""

    failures: int = 0
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    stall_s: float = 0.0  # the first call sleeps this long before answering
    calls: list[tuple[float | None, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls.append((context.time_remaining(), dict(context.invocation_metadata())))
            n = len(self.calls)
        if n == 1 and self.stall_s:
            time.sleep(self.stall_s)
        if n <= self.failures:
            context.abort(self.code, f"failure {n}")
        return b"echo:" + request


def _big(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"x" * int(request.decode())


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """Start a server with the given handlers; return its "127.0.0.1:port"."""
    servers: list[grpc.Server] = []

    def start(flaky: Flaky, path: Path | None = None) -> str:
        def fetch(request: worker_pb2.FetchRequest, context: object) -> Iterator[object]:
            assert path is not None
            return rpc.data_chunks(path, request.offset)

        handlers = {
            "Call": grpc.unary_unary_rpc_method_handler(flaky),
            "Big": grpc.unary_unary_rpc_method_handler(_big),
            "Fetch": grpc.unary_stream_rpc_method_handler(
                fetch,
                request_deserializer=worker_pb2.FetchRequest.FromString,
                response_serializer=common_pb2.DataChunk.SerializeToString,
            ),
        }
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), options=rpc.server_options()
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.T", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def _call(target: str) -> Callable[..., bytes]:
    return rpc.insecure_channel(target).unary_unary("/test.T/Call")


FAST = rpc.RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.5)
META = ((rpc.CREDENTIAL_HEADER, "secret-1"),)


# ---------------------------------------------------------------- backoff, pure


def test_backoff_without_jitter_grows_then_caps() -> None:
    policy = rpc.RetryPolicy(attempts=7, initial_backoff_s=0.1, max_backoff_s=1.0, jitter=0)
    delays = list(rpc.backoff_delays(policy, rng=lambda: 0.999))
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0], rel=1e-12)


@pytest.mark.parametrize("jitter", [0.0, 0.25, 1.0])
def test_backoff_jitter_bounds_with_seeded_rng(jitter: float) -> None:
    policy = rpc.RetryPolicy(
        attempts=40, initial_backoff_s=0.05, max_backoff_s=2.0, multiplier=1.5, jitter=jitter
    )
    delays = list(rpc.backoff_delays(policy, rng=random.Random(7).random))
    assert len(delays) == policy.attempts - 1
    draws = random.Random(7)
    cap = policy.initial_backoff_s
    for delay in delays:
        u = draws.random()
        assert delay == pytest.approx(cap * (1 - jitter * u), rel=1e-12)
        assert (1 - jitter) * cap <= delay <= cap <= policy.max_backoff_s
        cap = min(cap * policy.multiplier, policy.max_backoff_s)
    assert cap == policy.max_backoff_s  # the cap was reached, so the bound above was exercised


def test_backoff_caps_never_decrease_and_never_overflow() -> None:
    policy = rpc.RetryPolicy(
        attempts=3000, initial_backoff_s=1.0, max_backoff_s=60.0, multiplier=10.0, jitter=0
    )
    delays = list(rpc.backoff_delays(policy, rng=random.random))
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert delays[-1] == 60.0


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"attempts": 0}, "attempts"),
        ({"initial_backoff_s": -1.0}, "initial_backoff_s"),
        ({"initial_backoff_s": 5.0, "max_backoff_s": 1.0}, "max_backoff_s"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": 1.5}, "jitter"),
    ],
)
def test_retry_policy_rejects_bad_fields(changes: dict[str, float], name: str) -> None:
    with pytest.raises(SpecError, match=name):
        rpc.RetryPolicy(**changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------- retries against a server


def test_retries_unavailable_then_succeeds(serve: Callable[..., str]) -> None:
    flaky = Flaky(failures=2)
    slept: list[float] = []
    got = rpc.call_with_retry(
        _call(serve(flaky)),
        b"hi",
        timeout=5.0,
        metadata=META,
        policy=FAST,
        sleep=slept.append,
        rng=random.Random(1).random,
    )
    assert got == b"echo:hi"
    assert len(flaky.calls) == 3
    assert slept == list(rpc.backoff_delays(FAST, random.Random(1).random))[:2]


def test_every_attempt_gets_the_deadline_and_metadata(serve: Callable[..., str]) -> None:
    # Real 0.3 s sleeps between attempts: a deadline shared by all attempts would leave the
    # fourth with at most 2.0 - 0.9 s, a fresh one per attempt leaves it about 2.0 s.
    flaky = Flaky(failures=3)
    rpc.call_with_retry(
        _call(serve(flaky)),
        b"x",
        timeout=2.0,
        metadata=META,
        policy=FAST,
        sleep=lambda s: time.sleep(0.3),
    )
    assert len(flaky.calls) == 4
    for remaining, metadata in flaky.calls:
        # grpc-timeout travels rounded up to a coarser unit, hence the small slack above 2.0.
        assert remaining is not None and 1.5 < remaining <= 2.05
        assert metadata[rpc.CREDENTIAL_HEADER] == "secret-1"


def test_no_retry_on_invalid_argument(serve: Callable[..., str]) -> None:
    flaky = Flaky(failures=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    slept: list[float] = []
    with pytest.raises(grpc.RpcError) as caught:
        rpc.call_with_retry(_call(serve(flaky)), b"x", timeout=5.0, policy=FAST, sleep=slept.append)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(flaky.calls) == 1 and slept == []


def test_gives_up_after_the_attempts_with_the_last_error(serve: Callable[..., str]) -> None:
    flaky = Flaky(failures=100)
    slept: list[float] = []
    with pytest.raises(grpc.RpcError) as caught:
        rpc.call_with_retry(_call(serve(flaky)), b"x", timeout=5.0, policy=FAST, sleep=slept.append)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == f"failure {FAST.attempts}"
    assert len(flaky.calls) == FAST.attempts and len(slept) == FAST.attempts - 1


def test_a_stalled_attempt_hits_its_deadline_and_is_retried(serve: Callable[..., str]) -> None:
    flaky = Flaky(stall_s=1.0)
    start = time.monotonic()
    got = rpc.call_with_retry(
        _call(serve(flaky)), b"x", timeout=0.3, policy=FAST, sleep=lambda s: None
    )
    assert got == b"echo:x" and len(flaky.calls) == 2
    assert time.monotonic() - start < 0.9  # the client did not wait for the stalled call


def test_channel_allows_messages_up_to_the_limit(serve: Callable[..., str]) -> None:
    target = serve(Flaky())
    big = rpc.insecure_channel(target).unary_unary("/test.T/Big")
    assert len(big(str(6 * 2**20).encode(), timeout=10)) == 6 * 2**20  # over gRPC's 4 MiB default
    with pytest.raises(grpc.RpcError) as caught:
        big(str(rpc.MAX_MESSAGE_BYTES + 1).encode(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------- chunks and streams


def _file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return path, data


def test_file_chunks_cover_the_file_from_the_offset(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 10_000)
    chunks = list(rpc.file_chunks(path, offset=1234, chunk_size=4096))
    assert [len(c) for c in chunks] == [4096, 4096, 10_000 - 1234 - 8192]
    assert b"".join(chunks) == data[1234:]
    assert list(rpc.file_chunks(path, offset=10_000)) == []


def test_file_chunks_reject_bad_offsets_and_missing_files(tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 10)
    with pytest.raises(TspaceError, match="outside"):
        list(rpc.file_chunks(path, offset=11))
    with pytest.raises(TspaceError, match="cannot read"):
        list(rpc.file_chunks(tmp_path / "missing.bin"))


def test_fetch_stream_round_trip_through_a_server(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    size = 3 * rpc.CHUNK_BYTES + 12_345
    path, data = _file(tmp_path, size)
    fetch = rpc.insecure_channel(serve(Flaky(), path)).unary_stream(
        "/test.T/Fetch",
        request_serializer=worker_pb2.FetchRequest.SerializeToString,
        response_deserializer=common_pb2.DataChunk.FromString,
    )
    stream = fetch(worker_pb2.FetchRequest(sha256="x", offset=0), timeout=10)
    assert rpc.collect_stream(stream, expected_size=size) == data
    resumed = fetch(worker_pb2.FetchRequest(sha256="x", offset=2_000_000), timeout=10)
    assert rpc.collect_stream(resumed, expected_size=size, offset=2_000_000) == data[2_000_000:]


def _chunks(*spans: tuple[int, bytes]) -> list[common_pb2.DataChunk]:
    return [common_pb2.DataChunk(offset=o, data=d) for o, d in spans]


def test_collect_stream_joins_contiguous_chunks() -> None:
    assert (
        rpc.collect_stream(_chunks((0, b"ab"), (2, b""), (2, b"cde")), expected_size=5) == b"abcde"
    )
    assert rpc.collect_stream(_chunks((3, b"de")), offset=3) == b"de"


@pytest.mark.parametrize(
    ("spans", "kwargs", "match"),
    [
        (((0, b"ab"), (3, b"d")), {}, "starts at byte 3, expected 2"),  # a gap
        (((0, b"ab"), (1, b"bc")), {}, "starts at byte 1, expected 2"),  # an overlap
        (((1, b"ab"),), {}, "starts at byte 1, expected 0"),  # wrong start
        (((0, b"abc"),), {"offset": 2}, "starts at byte 0, expected 2"),
        (((0, b"ab"), (2, b"cd")), {"max_size": 3}, "size limit of 3"),
        (((0, b"ab"), (2, b"cd")), {"expected_size": 3}, "expected size of 3"),
        (((0, b"ab"),), {"expected_size": 3}, "ended at byte 2 of 3"),
    ],
)
def test_collect_stream_rejects_gaps_and_bad_sizes(
    spans: tuple[tuple[int, bytes], ...], kwargs: dict[str, int], match: str
) -> None:
    with pytest.raises(TspaceError, match=match):
        rpc.collect_stream(_chunks(*spans), **kwargs)


def test_iter_stream_fails_before_reading_past_the_limit() -> None:
    pulled: list[int] = []

    def responses() -> Iterator[common_pb2.DataChunk]:
        for i in range(100):
            pulled.append(i)
            yield common_pb2.DataChunk(offset=i * 4, data=b"abcd")

    with pytest.raises(TspaceError):
        for _ in rpc.iter_stream(responses(), max_size=10):
            pass
    assert len(pulled) == 3


def test_the_server_accepts_the_clients_keepalive_pings() -> None:
    # Pings every 300 ms, scaled down from 20 s: a server that did not know the interval
    # (a misspelt option is silently ignored) answers the third with GOAWAY too_many_pings.
    every_ms = 300
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), options=rpc.server_options(every_ms)
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.T", {"Call": grpc.unary_unary_rpc_method_handler(Flaky())}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    states: list[grpc.ChannelConnectivity] = []
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=rpc.channel_options(keepalive_time_ms=every_ms)
    )
    try:
        channel.subscribe(states.append, try_to_connect=True)
        grpc.channel_ready_future(channel).result(timeout=10)
        time.sleep(every_ms / 1000 * 12)  # idle through a dozen pings
        assert channel.unary_unary("/test.T/Call")(b"x", timeout=5) == b"echo:x"
        ready = grpc.ChannelConnectivity.READY
        # Connected once and never dropped: a GOAWAY would show as IDLE or a failure after READY.
        assert states[states.index(ready) :] == [ready], states
    finally:
        channel.close()
        server.stop(None)
