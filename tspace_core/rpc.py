"""Client-side gRPC helpers: channels, metadata names, retries with backoff, and chunked streams."""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from tspace_core.errors import SpecError, TspaceError
from tspace_core.proto.tspace.v1 import common_pb2

MAX_MESSAGE_BYTES = 8 * 2**20
CHUNK_BYTES = 2**20
# What collect_stream holds in memory unless told otherwise; larger files go through iter_stream.
MAX_COLLECT_BYTES = 2**30

CREDENTIAL_HEADER = "x-tspace-credential"
ADMIN_HEADER = "x-tspace-admin"

# Keepalive for channels that live for hours across NATs and proxies, which often drop a TCP
# flow after a few idle minutes: ping every 20 s, even with no call in flight. A connection whose
# link went down is declared dead within 30 s (a ping unanswered for 10 s) and a new one is made,
# rather than waiting on TCP's retransmission backoff after the link returns.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000

Metadata = Sequence[tuple[str, str]]
Response = TypeVar("Response")

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


RECONNECT_BACKOFF_MS = (500, 4000)  # first and largest wait between reconnection attempts


def channel_options(keepalive_time_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, int]]:
    """Options for every client channel: message size limits and keepalive."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # The default (2) stops pinging an idle channel after two pings.
        ("grpc.http2.max_pings_without_data", 0),
        # After a coordinator restart a channel reconnects within seconds; gRPC's default backoff
        # grows to two minutes, longer than a lease lives, and every call fails fast meanwhile.
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]


def server_options(keepalive_time_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, int]]:
    """Options the coordinator's server needs to accept the clients' keepalive pings, sent
    every `keepalive_time_ms`.

    By default a server tolerates a ping without data only every 5 minutes and answers more
    frequent ones with GOAWAY ("too_many_pings"), which would drop our clients' channels, even
    mid-upload (the server sends no data while it receives). The option's name is gRPC core's
    GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; gRPC ignores names it does not
    know, so a test holds a channel idle through several pings.
    """
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_time_ms // 2),
    ]


def is_loopback(address: str) -> bool:
    """Whether host:port names this machine's loopback interface."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_channel(target: str) -> grpc.Channel:
    """A plaintext channel to `target` ("host:port") with channel_options()."""
    return grpc.insecure_channel(target, options=channel_options())


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client reaches the coordinator over TLS.

    ca_pem: the CA certificate(s) the server's certificate must chain to (pinned: the system's
        trust store is never used).
    key_pem, cert_pem: a client certificate and its key, for mutual TLS (both or neither).
    server_name: the name to check the server certificate against, when the address is not
        one of its names (e.g. a wildcard bind address reached through 127.0.0.1).
    """

    ca_pem: bytes
    key_pem: bytes | None = None
    cert_pem: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.key_pem is None) != (self.cert_pem is None):
            raise SpecError("a client certificate needs its key, and a key its certificate")


def open_channel(target: str, security: ChannelSecurity | None = None) -> grpc.Channel:
    """A channel to `target`: TLS with `security`, plaintext without."""
    if security is None:
        return insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=security.ca_pem,
        private_key=security.key_pem,
        certificate_chain=security.cert_pem,
    )
    options: list[tuple[str, int | str]] = [*channel_options()]
    if security.server_name:
        options.append(("grpc.ssl_target_name_override", security.server_name))
    return grpc.secure_channel(target, credentials, options=options)


@dataclass(frozen=True)
class RetryPolicy:
    """How call_with_retry retries a unary call.

    attempts: calls made at most, the first included (>= 1).
    initial_backoff_s: the delay cap before the second attempt (>= 0).
    max_backoff_s: no delay exceeds this (>= initial_backoff_s).
    multiplier: the cap grows by this factor per attempt (>= 1).
    jitter: fraction of each capped delay drawn at random, in [0, 1]; 1 is "full jitter"
        (uniform in [0, cap)), 0 is none (exactly the cap).
    retryable: status codes worth another attempt; any other code is raised at once.
    """

    attempts: int = 5
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 1.0
    retryable: frozenset[grpc.StatusCode] = field(default=RETRYABLE_CODES)

    def __post_init__(self) -> None:
        checks = [
            ("attempts", self.attempts >= 1, "an integer >= 1"),
            ("initial_backoff_s", self.initial_backoff_s >= 0, ">= 0"),
            ("max_backoff_s", self.max_backoff_s >= self.initial_backoff_s, ">= initial_backoff_s"),
            ("multiplier", self.multiplier >= 1, ">= 1"),
            ("jitter", 0 <= self.jitter <= 1, "in [0, 1]"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                value = getattr(self, name)
                raise SpecError(f"RetryPolicy.{name} is {value!r}; it must be {allowed}")


def backoff_delays(
    policy: RetryPolicy, rng: Callable[[], float] = random.random
) -> Iterator[float]:
    """Yield the attempts - 1 delays between attempts, each capped and partly jittered.

    cap_i = min(max_backoff_s, initial_backoff_s * multiplier**i) and
    delay_i = cap_i * (1 - jitter * u_i), where u_i = rng() lies in [0, 1).
    """
    cap = policy.initial_backoff_s
    for _ in range(policy.attempts - 1):
        yield min(cap, policy.max_backoff_s) * (1.0 - policy.jitter * rng())
        # Grow the capped value so a long policy never overflows a float.
        cap = min(cap * policy.multiplier, policy.max_backoff_s)


def _status(err: grpc.RpcError) -> grpc.StatusCode | None:
    return err.code() if isinstance(err, grpc.Call) else None


def call_with_retry(
    fn: Callable[..., Response],
    request: object,
    *,
    timeout: float,
    metadata: Metadata | None = None,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
) -> Response:
    """Call a unary stub method, retrying the policy's retryable status codes.

    Every attempt gets its own deadline of `timeout` seconds and the same metadata; between
    attempts it sleeps backoff_delays(policy, rng). The last grpc.RpcError is re-raised.
    """
    policy = policy or RetryPolicy()
    delays = backoff_delays(policy, rng)
    while True:
        try:
            return fn(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as err:
            delay = next(delays, None) if _status(err) in policy.retryable else None
            if delay is None:
                raise
            sleep(delay)


def file_chunks(
    path: Path | str, offset: int = 0, chunk_size: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """The bytes of `path` from `offset` on, in pieces of at most `chunk_size`."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as err:
        raise TspaceError(f"cannot read {path}: {err.strerror}; check that it exists") from err
    with f:
        size = path.stat().st_size
        if not 0 <= offset <= size:
            raise TspaceError(f"offset {offset} is outside {path} ({size} bytes); use 0..{size}")
        f.seek(offset)
        while chunk := f.read(chunk_size):
            yield chunk


def data_chunks(
    path: Path | str, offset: int = 0, chunk_size: int = CHUNK_BYTES
) -> Iterator[common_pb2.DataChunk]:
    """file_chunks as DataChunk messages, each carrying its offset in the file."""
    for chunk in file_chunks(path, offset, chunk_size):
        yield common_pb2.DataChunk(offset=offset, data=chunk)
        offset += len(chunk)


def iter_stream(
    responses: Iterable[common_pb2.DataChunk],
    *,
    offset: int = 0,
    expected_size: int | None = None,
    max_size: int = MAX_COLLECT_BYTES,
) -> Iterator[bytes]:
    """The data of a DataChunk stream that starts at `offset`, checked as it arrives.

    expected_size and max_size bound the end position (the whole file's size): a chunk that is
    not where the previous one ended, or that goes past either bound, raises TspaceError, and
    so does a stream that ends short of expected_size.
    """
    limit = max_size if expected_size is None else min(max_size, expected_size)
    position = offset
    for chunk in responses:
        if chunk.offset != position:
            raise TspaceError(
                f"stream chunk starts at byte {chunk.offset}, expected {position}: "
                "the transfer lost or repeated data; fetch again from the last good offset"
            )
        position += len(chunk.data)
        if position > limit:
            bound = "expected size" if limit == expected_size else "size limit"
            raise TspaceError(
                f"stream goes past its {bound} of {limit} bytes (at least {position}); "
                "the file is not the one requested or the limit is too small"
            )
        yield chunk.data
    if expected_size is not None and position != expected_size:
        raise TspaceError(
            f"stream ended at byte {position} of {expected_size}; fetch again from {position}"
        )


def collect_stream(
    responses: Iterable[common_pb2.DataChunk],
    expected_size: int | None = None,
    max_size: int = MAX_COLLECT_BYTES,
    *,
    offset: int = 0,
) -> bytes:
    """All the data of a DataChunk stream, in memory, checked as in iter_stream."""
    return b"".join(
        iter_stream(responses, offset=offset, expected_size=expected_size, max_size=max_size)
    )
