"""The coordinator's Prometheus metrics, scraped over real HTTP from a coordinator serving real
gRPC on loopback over a SQLite catalogue: counters move with exactly the calls that should move
them, gauges follow the catalogue, and coordinators in one process keep separate registries."""

from __future__ import annotations

import dataclasses
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import grpc
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Histogram

from coordinator.config import init_dir, load_config
from coordinator.metrics import REJECT_REASONS, LatencyInterceptor, MetricsServer
from coordinator.server import Coordinator
from tspace_core import serde
from tspace_core.catalogue import sqlite_url
from tspace_core.errors import TspaceError
from tspace_core.proto.tspace.v1 import worker_pb2
from tspace_core.signing import generate_key

if TYPE_CHECKING:
    from conftest import CheckpointMaker, Harness, WorkerClient

TIMEOUT_S = 30.0
STEPS = 4  # the tiny job's training.steps
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# The text exposition format, parsed here rather than by prometheus_client's own parser.
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Samples:
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not an exposition line: {line!r}"
        labels = frozenset(LABEL.findall(match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def scrape(harness: Harness) -> Samples:
    assert harness.coordinator is not None
    url = f"http://{harness.coordinator.metrics_address}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def leased(h: Harness) -> tuple[WorkerClient, serde.Assignment]:
    """The tiny job, a registered worker, and that worker's lease on unit 0."""
    h.create_job()
    worker = h.register()
    return worker, h.assignment(worker)


def heartbeat(h: Harness, worker: WorkerClient, lease_id: str, images_per_s: float) -> bool:
    request = worker_pb2.HeartbeatRequest(lease_id=lease_id, step=1, images_per_s=images_per_s)
    response = h.worker.Heartbeat(request, metadata=worker.metadata, timeout=TIMEOUT_S)
    return bool(response.cancel)


def units(samples: Samples) -> dict[str, float | None]:
    statuses = ("pending", "leased", "done", "failed")
    return {s: value(samples, "tspace_units", status=s) for s in statuses}


def test_heartbeats_are_counted_and_training_speed_follows_the_lease(metered: Harness) -> None:
    worker, a = leased(metered)
    before = scrape(metered)
    assert value(before, "tspace_heartbeats_total") == 0
    # A fresh lease has reported no speed yet.
    assert value(before, "tspace_worker_images_per_second", worker_id=worker.worker_id) == 0.0

    assert not heartbeat(metered, worker, a.lease_id, 12.5)
    assert not heartbeat(metered, worker, a.lease_id, 20.0)
    stranger = dataclasses.replace(worker, credential="not-a-credential")
    with pytest.raises(grpc.RpcError):
        heartbeat(metered, stranger, a.lease_id, 99.0)
    after = scrape(metered)
    assert value(after, "tspace_heartbeats_total") == 2  # the stranger's is not a heartbeat
    assert value(after, "tspace_worker_images_per_second", worker_id=worker.worker_id) == 20.0

    request = worker_pb2.FailUnitRequest(lease_id=a.lease_id, error="out of memory")
    metered.worker.FailUnit(request, metadata=worker.metadata, timeout=TIMEOUT_S)
    ended = scrape(metered)
    assert series(ended, "tspace_worker_images_per_second") == {}  # gone with the lease
    assert value(ended, "tspace_active_leases") == 0


def test_units_by_status_and_active_leases_follow_the_catalogue(
    metered: Harness, checkpoints: CheckpointMaker
) -> None:
    empty = scrape(metered)
    assert units(empty) == {"pending": 0, "leased": 0, "done": 0, "failed": 0}
    assert value(empty, "tspace_active_leases") == 0

    worker, a = leased(metered)
    one = scrape(metered)
    assert units(one) == {"pending": 2, "leased": 1, "done": 0, "failed": 0}
    assert value(one, "tspace_active_leases") == 1

    final = checkpoints.path(a, STEPS)
    response = metered.upload_file(worker, a, final, STEPS, final=True)
    metered.complete(worker, a, response.checkpoint.sha256)
    metered.assignment(metered.register("site-b"))
    two = scrape(metered)
    assert units(two) == {"pending": 1, "leased": 1, "done": 1, "failed": 0}
    assert units(two) == {
        s: sum(1 for u in metered.catalogue.units() if u.status == s) for s in units(two)
    }


class Uploads:
    """Sends uploads for one lease and keeps what the metrics should then say."""

    def __init__(self, h: Harness, worker: WorkerClient, a: serde.Assignment) -> None:
        self.h, self.worker, self.a = h, worker, a
        self.bytes_read = 0
        self.calls = 0
        self.reasons: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)

    def send(
        self, header: worker_pb2.UploadHeader | None, data: list[bytes], read: int, **kw: Any
    ) -> worker_pb2.UploadResponse:
        """One upload, of which the coordinator should read `read` data bytes."""
        self.calls += 1
        self.bytes_read += read
        return self.h.upload(kw.get("as_worker", self.worker), header, data)

    def refused(
        self, reason: str, header: worker_pb2.UploadHeader | None, data: list[bytes], **kw: Any
    ) -> None:
        read = kw.pop("read", sum(map(len, data)))
        with pytest.raises(grpc.RpcError):
            self.send(header, data, read, **kw)
        self.reasons[reason] += 1

    def header(self, data: bytes, step: int = 2, **changes: Any) -> worker_pb2.UploadHeader:
        return self.h.signed_header(self.a, self.worker, data, step, **changes)


def test_uploads_count_outcomes_bytes_and_the_reason_of_each_refusal(
    metered: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(metered)
    up = Uploads(metered, worker, a)
    data = checkpoints.path(a, 2).read_bytes()
    pieces = list(metered.chunks(data))
    assert not up.send(up.header(data), pieces, len(data)).already_registered
    # Known by digest once its statement checks out: the data is never read.
    assert up.send(up.header(data), pieces, 0).already_registered

    up.refused("signature", up.header(data, signer=generate_key()), pieces, read=0)
    up.refused("statement", up.header(data, unit=a.unit + 1), pieces, read=0)
    up.refused("statement", up.header(data, step=STEPS), pieces, read=0)  # not final
    gone = up.header(data)
    gone.lease_id = "no-such-lease"
    up.refused("lease", gone, pieces, read=0)
    up.refused("format", None, [])  # no header
    up.refused("size", up.header(b""), [])
    blob = os.urandom(1000)
    up.refused("size", up.header(blob[:100]), [blob])  # more than was signed
    up.refused("digest", up.header(blob), [os.urandom(1000)])
    half = os.urandom(1000)
    up.refused("incomplete", up.header(half), [half[:400]])
    up.refused("incomplete", up.header(half), [half[400:]], read=0)  # resumes at the wrong offset
    up.refused("format", up.header(blob), [blob])  # digest fine, but not a checkpoint
    # A caller without a valid credential is turned away by the auth interceptor before the
    # upload handler runs: a refused RPC (in tspace_rpc_duration_seconds), not an upload.
    stranger = dataclasses.replace(worker, credential="not-a-credential")
    with pytest.raises(grpc.RpcError) as info:
        metered.upload(stranger, up.header(data), pieces)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]

    samples = scrape(metered)
    rejected = sum(up.reasons.values())
    assert value(samples, "tspace_uploads_total", outcome="registered") == 1
    assert value(samples, "tspace_uploads_total", outcome="already_registered") == 1
    assert value(samples, "tspace_uploads_total", outcome="rejected") == rejected
    for reason, count in up.reasons.items():
        assert value(samples, "tspace_upload_rejections_total", reason=reason) == count, reason
    assert value(samples, "tspace_upload_bytes_total") == up.bytes_read
    # Aborted streams are timed too, and so is the call the interceptor refused.
    timed = value(samples, "tspace_rpc_duration_seconds_count", method="UploadCheckpoint")
    assert timed == up.calls + 1


def test_rpc_latency_is_recorded_per_method_for_unary_and_streaming_calls(
    metered: Harness,
) -> None:
    worker, a = leased(metered)
    for _ in range(2):
        metered.acquire(worker)
    request = worker_pb2.FetchRequest(sha256=a.shards[0].sha256)
    assert list(metered.worker.FetchShard(request, metadata=worker.metadata, timeout=TIMEOUT_S))
    assert metered.channel is not None
    unknown = metered.channel.unary_unary("/tspace.v1.WorkerService/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as info:
        unknown(b"", timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    samples = scrape(metered)
    name = "tspace_rpc_duration_seconds"
    assert value(samples, f"{name}_count", method="AcquireUnit") == 3
    assert value(samples, f"{name}_count", method="FetchShard") == 1
    assert value(samples, f"{name}_count", method="Register") == 1
    assert (value(samples, f"{name}_sum", method="AcquireUnit") or 0.0) > 0.0
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for labels, v in series(samples, f"{name}_bucket").items()
        if dict(labels)["method"] == "AcquireUnit"
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == 3 and buckets[-1][0] == float("inf")
    methods = {dict(labels)["method"] for labels in series(samples, f"{name}_count")}
    assert "NoSuchMethod" not in methods  # no series for names a client makes up


def test_a_stream_is_timed_until_its_last_message() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("t_seconds", "t", ["method"], registry=registry)

    def slow(request: Any, context: Any) -> Iterator[int]:
        for i in range(3):
            time.sleep(0.05)
            yield i

    handler = grpc.unary_stream_rpc_method_handler(slow)
    details = SimpleNamespace(method="/tspace.v1.WorkerService/Slow")
    timed = LatencyInterceptor(histogram).intercept_service(lambda _: handler, details)
    stream = timed.unary_stream(None, None)
    assert next(stream) == 0
    assert registry.get_sample_value("t_seconds_count", {"method": "Slow"}) == 0  # streaming
    assert list(stream) == [1, 2]
    assert registry.get_sample_value("t_seconds_count", {"method": "Slow"}) == 1
    assert (registry.get_sample_value("t_seconds_sum", {"method": "Slow"}) or 0.0) >= 0.15


def test_two_coordinators_in_one_process_keep_their_own_metrics(
    metered: Harness, tmp_path: Path
) -> None:
    folder = tmp_path / "second"
    init_dir(folder, sqlite_url(tmp_path / "second.db"))
    second = type(metered)(folder, load_config(folder), metrics_listen="127.0.0.1:0")
    second.start()
    try:
        worker, a = leased(metered)
        heartbeat(metered, worker, a.lease_id, 5.0)
        first_samples, second_samples = scrape(metered), scrape(second)
        assert metered.coordinator is not None and second.coordinator is not None
        assert metered.coordinator.metrics_address != second.coordinator.metrics_address
    finally:
        second.close()
    assert value(first_samples, "tspace_heartbeats_total") == 1
    assert value(second_samples, "tspace_heartbeats_total") == 0
    assert units(first_samples)["pending"] == 2
    assert units(second_samples)["pending"] == 0
    assert value(second_samples, "tspace_rpc_duration_seconds_count", method="AcquireUnit") is None
    # Nothing went to the process-wide default registry.
    default = [m.name for m in prometheus_client.REGISTRY.collect()]
    assert default and not [name for name in default if name.startswith("tspace_")]


def test_the_metrics_server_stops_with_the_coordinator(metered: Harness) -> None:
    assert metered.coordinator is not None
    address = metered.coordinator.metrics_address
    assert address is not None and address.startswith("127.0.0.1:")
    assert int(address.rsplit(":", 1)[1]) > 0  # port 0 was resolved to the bound port
    scrape(metered)
    metered.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{address}/metrics", timeout=5)
    # The port is free again.
    MetricsServer(CollectorRegistry(), address).stop()


def test_bad_metrics_addresses_are_refused_with_a_clear_message(metered: Harness) -> None:
    assert metered.coordinator is not None
    state = metered.coordinator.state
    with pytest.raises(TspaceError, match="--insecure"):
        Coordinator(state, "127.0.0.1:0", metrics_listen="0.0.0.0:0")
    with pytest.raises(TspaceError, match="not host:port"):
        Coordinator(state, "127.0.0.1:0", metrics_listen="9100")
    taken = metered.coordinator.metrics_address
    with pytest.raises(TspaceError, match="cannot serve metrics"):
        Coordinator(state, "127.0.0.1:0", metrics_listen=taken)
    scrape(metered)  # the running one is unharmed
