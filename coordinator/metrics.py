"""Prometheus metrics of one coordinator: its own registry, an RPC timer and a /metrics server."""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, get_args
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from tspace_core.catalogue import Catalogue
from tspace_core.catalogue.records import UNIT_DONE, UNIT_FAILED, UNIT_LEASED, UNIT_PENDING
from tspace_core.errors import TspaceError
from tspace_core.proto.tspace.v1 import worker_pb2

log = logging.getLogger("tspace.coordinator.metrics")

RejectReason = Literal[
    "lease", "statement", "signature", "digest", "size", "format", "incomplete", "other"
]
REJECT_REASONS: tuple[RejectReason, ...] = get_args(RejectReason)
UPLOAD_OUTCOMES = ("registered", "already_registered", "rejected")
UNIT_STATUSES = (UNIT_PENDING, UNIT_LEASED, UNIT_DONE, UNIT_FAILED)
# From a millisecond lease to a many-minute upload or status stream.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class CoordinatorMetrics:
    """One coordinator's metrics, in a registry of its own rather than the process-wide default,
    so that several coordinators in one process (as in tests) never share or clash."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.registry = CollectorRegistry()
        self.heartbeats = Counter(
            "tspace_heartbeats", "Heartbeats received from workers.", registry=self.registry
        )
        self.uploads = Counter(
            "tspace_uploads", "Checkpoint uploads by outcome.", ["outcome"], registry=self.registry
        )
        self.upload_bytes = Counter(
            "tspace_upload_bytes",
            "Checkpoint bytes read from upload streams, rejected uploads included.",
            registry=self.registry,
        )
        self.upload_rejections = Counter(
            "tspace_upload_rejections",
            "Rejected checkpoint uploads by the check that refused them.",
            ["reason"],
            registry=self.registry,
        )
        self.rpc_duration = Histogram(
            "tspace_rpc_duration_seconds",
            "RPC handling time by method; a stream until its last message.",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        # Every label value from the start: a rate over a series that appears late loses its
        # first increment, and a missing series reads as "unknown" rather than zero.
        for outcome in UPLOAD_OUTCOMES:
            self.uploads.labels(outcome=outcome)
        for reason in REJECT_REASONS:
            self.upload_rejections.labels(reason=reason)
        self.registry.register(CatalogueCollector(catalogue))

    def counted(self, chunks: Iterable[worker_pb2.UploadChunk]) -> Iterator[worker_pb2.UploadChunk]:
        """`chunks`, counting the data bytes of each as the handler reads it."""
        for chunk in chunks:
            self.upload_bytes.inc(len(chunk.data))  # b"" for the header
            yield chunk

    def upload_accepted(self, already_registered: bool) -> None:
        self.uploads.labels(
            outcome="already_registered" if already_registered else "registered"
        ).inc()

    def upload_rejected(self, reason: RejectReason) -> None:
        self.uploads.labels(outcome="rejected").inc()
        self.upload_rejections.labels(reason=reason).inc()


class CatalogueCollector(Collector):
    """Unit, lease and training-speed gauges read from the catalogue at scrape time (one
    `units()` query), so they cannot drift from it and survive a coordinator restart."""

    def __init__(self, catalogue: Catalogue) -> None:
        self._catalogue = catalogue

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        try:
            units = self._catalogue.units()
        except Exception as exc:  # a scrape must not fail the other metrics on a passing DB error
            log.warning("metrics: cannot read units from the catalogue: %s", exc)
            return []
        by_status, leases, images = self._families()
        for status in UNIT_STATUSES:
            by_status.add_metric([status], sum(1 for u in units if u.status == status))
        active = [u for u in units if u.lease_id is not None and u.worker_id is not None]
        leases.add_metric([], len(active))
        rates: dict[str, float] = {}
        for u in active:
            # A worker holding several leases trains at the sum of their rates.
            rates[str(u.worker_id)] = rates.get(str(u.worker_id), 0.0) + u.images_per_s
        for worker_id, rate in sorted(rates.items()):
            images.add_metric([worker_id], rate)
        return [by_status, leases, images]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("tspace_units", "Units by status.", labels=["status"]),
            GaugeMetricFamily("tspace_active_leases", "Leases now active."),
            GaugeMetricFamily(
                "tspace_worker_images_per_second",
                "Training speed each worker last reported in a heartbeat, while it holds a lease.",
                labels=["worker_id"],
            ),
        ]


class LatencyInterceptor(grpc.ServerInterceptor):
    """Times every RPC of a registered method into the histogram by method name; a stream is
    timed until its handler's last message (a stream the client cancels ends when the server
    drops its generator)."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: no series for a name a client made up
        method = str(handler_call_details.method).rsplit("/", 1)[-1]
        return timed_handler(handler, self._histogram.labels(method=method).observe)


def timed_handler(handler: Any, observe: Callable[[float], None]) -> Any:
    """`handler` (a grpc.RpcMethodHandler) with its behaviour timed into `observe`."""
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_timed(handler.unary_unary, observe), **codecs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_timed(handler.stream_unary, observe), **codecs)
    if handler.unary_stream is not None:
        behaviour = _timed_stream(handler.unary_stream, observe)
        return grpc.unary_stream_rpc_method_handler(behaviour, **codecs)
    behaviour = _timed_stream(handler.stream_stream, observe)
    return grpc.stream_stream_rpc_method_handler(behaviour, **codecs)


def _timed(behaviour: Callable[..., Any], observe: Callable[[float], None]) -> Callable[..., Any]:
    @functools.wraps(behaviour)
    def call(request: Any, context: Any) -> Any:
        start = time.perf_counter()
        try:
            return behaviour(request, context)
        finally:
            observe(time.perf_counter() - start)

    return call


def _timed_stream(
    behaviour: Callable[..., Iterator[Any]], observe: Callable[[float], None]
) -> Callable[..., Iterator[Any]]:
    @functools.wraps(behaviour)
    def stream(request: Any, context: Any) -> Iterator[Any]:
        start = time.perf_counter()
        try:
            yield from behaviour(request, context)
        finally:
            observe(time.perf_counter() - start)

    return stream


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the coordinator's own log."""


def split_listen(listen: str) -> tuple[str, int]:
    """(host, port) of a `host:port` address; `[::1]:9100` for IPv6."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise TspaceError(
            f"metrics address {listen!r} is not host:port; use e.g. 127.0.0.1:9100 "
            "(port 0 picks a free port)"
        )
    return host.strip("[]"), int(port)


class MetricsServer:
    """A registry served over HTTP (Prometheus text format on any path, /metrics by custom):
    the socket is bound on creation, so `address` holds the bound port, and served from
    `start()` until `stop()`."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        host, port = split_listen(listen)
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

            class Server(ThreadingWSGIServer):
                address_family = family

            self._httpd = make_server(
                host, port, make_wsgi_app(registry), Server, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise TspaceError(
                f"cannot serve metrics on {listen}: {exc}; choose a free port, or 0 for any"
            ) from None
        self.port = int(self._httpd.server_address[1])
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and free the port; safe to call more than once, or before `start()`."""
        if self._thread.is_alive():
            self._httpd.shutdown()  # would wait forever for a loop that never ran
            self._thread.join(timeout=5.0)
        self._httpd.server_close()
