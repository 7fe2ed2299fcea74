"""Running the coordinator: the gRPC server, the health service and the lease reaper."""

from __future__ import annotations

import ipaddress
import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.admin_service import AdminService
from coordinator.config import CoordinatorConfig
from coordinator.metrics import (
    CoordinatorMetrics,
    LatencyInterceptor,
    MetricsServer,
    split_listen,
)
from coordinator.state import CoordinatorState
from coordinator.worker_service import WorkerService
from tspace_core.errors import TspaceError
from tspace_core.fsio import atomic_write_bytes
from tspace_core.proto.tspace.v1 import admin_pb2_grpc, worker_pb2_grpc
from tspace_core.rpc import server_options

log = logging.getLogger("tspace.coordinator")


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_plaintext(listen: str, insecure: bool, what: str) -> None:
    if not is_loopback(listen) and not insecure:
        raise TspaceError(
            f"refusing to serve {what} on {listen} without TLS; TLS is not configured, so pass "
            "--insecure to accept plaintext on a non-loopback address"
        )


class Coordinator:
    """A started server plus its reaper thread and, with `metrics_listen`, a Prometheus
    /metrics server (its bound address in `metrics_address`); `stop()` ends them all."""

    def __init__(
        self,
        state: CoordinatorState,
        listen: str,
        insecure: bool = False,
        metrics_listen: str | None = None,
    ) -> None:
        _check_plaintext(listen, insecure, "gRPC")
        if metrics_listen is not None:
            split_listen(metrics_listen)  # a malformed address is refused as such first
            _check_plaintext(metrics_listen, insecure, "metrics")
        self.state = state
        self.metrics = CoordinatorMetrics(state.catalogue)
        # Bound before the gRPC port, since this socket is the easy one to give back on failure.
        self._metrics_server = (
            None if metrics_listen is None else MetricsServer(self.metrics.registry, metrics_listen)
        )
        self.metrics_address: str | None = (
            None if self._metrics_server is None else self._metrics_server.address
        )
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32),
            options=server_options(),
            interceptors=[LatencyInterceptor(self.metrics.rpc_duration)],
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerService(state, self.metrics), self.server
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(state), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            if self._metrics_server is not None:
                self._metrics_server.stop()
            raise TspaceError(f"cannot listen on {listen}: the address is in use or invalid")
        self.address = f"{listen.rsplit(':', 1)[0]}:{self.port}"
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="lease-reaper", daemon=True)

    def start(self) -> Coordinator:
        self.server.start()
        if self._metrics_server is not None:
            self._metrics_server.start()
        self._reaper.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self

    def _reap(self) -> None:
        cfg = self.state.config
        while not self._stop.wait(cfg.lease_check_interval_s):
            try:
                expired = self.state.catalogue.expire_leases(self.state.clock(), cfg.max_attempts)
                for lease in expired:
                    log.info("lease %s of unit %s expired", lease.lease_id, lease.unit)
            except Exception:  # the reaper must outlive a passing database error
                log.exception("lease check failed; retrying")

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self._metrics_server is not None:
            self._metrics_server.stop()  # before the catalogue it reads closes
        self.state.catalogue.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(
    folder: Path,
    config: CoordinatorConfig,
    listen: str | None,
    insecure: bool,
    port_file: Path | None,
    metrics_listen: str | None = None,
) -> Coordinator:
    """Open the folder's state and start serving (metrics too, on `metrics_listen`); writes
    the bound gRPC address to `port_file`."""
    coordinator = Coordinator(
        CoordinatorState.open(folder, config), listen or config.listen, insecure, metrics_listen
    )
    coordinator.start()
    if port_file is not None:
        atomic_write_bytes(port_file, f"{coordinator.address}\n".encode())
    return coordinator
