"""Running the coordinator: the gRPC server, the health service and the lease reaper."""

from __future__ import annotations

import functools
import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.admin_service import AdminService
from coordinator.auth import AuthInterceptor
from coordinator.config import (
    ADDRESS_FILE,
    TLS_DIR,
    CoordinatorConfig,
    Endpoint,
    ServerTls,
    server_tls,
    write_endpoint,
)
from coordinator.metrics import (
    CoordinatorMetrics,
    LatencyInterceptor,
    MetricsServer,
    split_listen,
)
from coordinator.state import CoordinatorState, found
from coordinator.worker_service import WorkerService
from tspace_core.catalogue import CatalogueError
from tspace_core.catalogue.records import LEASE_ACTIVE
from tspace_core.errors import TspaceError
from tspace_core.fsio import atomic_write_bytes
from tspace_core.proto.tspace.v1 import admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from tspace_core.rpc import is_loopback, server_options

log = logging.getLogger("tspace.coordinator")


def _check_plaintext(listen: str, insecure: bool, what: str) -> None:
    if not is_loopback(listen) and not insecure:
        raise TspaceError(
            f"refusing to serve {what} on {listen} without TLS: anyone on the path could read "
            "and alter it; serve with TLS, or pass --insecure to accept plaintext anyway"
        )


def _bind(server: grpc.Server, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    if credentials is None:
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, credentials)


class Coordinator:
    """A started server plus its reaper thread and, with `metrics_listen`, a Prometheus
    /metrics server (its bound address in `metrics_address`); `stop()` ends them all."""

    def __init__(
        self,
        state: CoordinatorState,
        listen: str,
        insecure: bool = False,
        metrics_listen: str | None = None,
        tls: ServerTls | None = None,
        enrol_listen: str | None = None,
    ) -> None:
        if tls is None:
            _check_plaintext(listen, insecure, "gRPC")
        if (enrol_listen is not None) != (tls is not None and tls.client_certs):
            raise TspaceError(
                "a registration port is for mutual TLS only, and mutual TLS needs one"
            )
        if metrics_listen is not None:
            split_listen(metrics_listen)  # a malformed address is refused as such first
            _check_plaintext(metrics_listen, insecure, "metrics")
        self.state = state
        state.tls_ca = None if tls is None else tls.ca
        state.client_certs = tls is not None and tls.client_certs
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
            interceptors=[
                LatencyInterceptor(self.metrics.rpc_duration),
                AuthInterceptor(state, client_certs=state.client_certs),
            ],
        )
        workers = self.workers = WorkerService(state, self.metrics)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(workers, self.server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(state), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.tls = tls
        self.enrol_server: grpc.Server | None = None
        self.enrol_address: str | None = None
        try:
            credentials = None if tls is None else tls.credentials(tls.client_certs)
            self.port = _bind(self.server, listen, credentials)
            if self.port == 0:
                raise TspaceError(f"cannot listen on {listen}: the address is in use or invalid")
            self.address = f"{listen.rsplit(':', 1)[0]}:{self.port}"
            if tls is not None and enrol_listen is not None:
                self.enrol_server, self.enrol_address = _enrol_server(workers, tls, enrol_listen)
        except BaseException:
            if self._metrics_server is not None:
                self._metrics_server.stop()
            raise
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="lease-reaper", daemon=True)

    def start(self) -> Coordinator:
        if removed := self.state.blobs.remove_temporaries():
            log.info("removed %d temporary upload file(s) left by an earlier run", removed)
        # Nothing could heartbeat while no coordinator ran: leases whose expiry passed meanwhile
        # belong to workers that may have trained on, so each gets one TTL to check in.
        cfg = self.state.config
        if extended := self.state.catalogue.grant_grace(self.state.clock() + cfg.lease_ttl_s):
            log.info(
                "gave %d active lease(s) %.0f s to check in after the restart",
                extended,
                cfg.lease_ttl_s,
            )
        self.server.start()
        if self.enrol_server is not None:
            self.enrol_server.start()
        if self._metrics_server is not None:
            self._metrics_server.start()
        self._reaper.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self

    def _reap(self) -> None:
        cfg, catalogue = self.state.config, self.state.catalogue
        cut_off = False  # whether the database was out of reach at the last check
        lost = catalogue.lost_transactions
        while not self._stop.wait(cfg.lease_check_interval_s):
            try:
                if cut_off or catalogue.lost_transactions != lost:
                    # No heartbeat could be recorded while the database was away (however
                    # briefly), so, as after a restart, each lease gets one TTL to check in.
                    lost = catalogue.lost_transactions
                    catalogue.grant_grace(self.state.clock() + cfg.lease_ttl_s)
                    cut_off = False
                expired = catalogue.expire_leases(self.state.clock(), cfg.max_attempts)
                for lease in expired:
                    log.info("lease %s of unit %s expired", lease.lease_id, lease.unit)
                self._sweep_partial_uploads()
            except CatalogueError as exc:  # the database stayed unreachable; no traceback
                cut_off = cut_off or exc.code == "unavailable"
                log.warning("lease check failed: %s", exc)
            except Exception:  # the reaper must outlive a passing database error
                log.exception("lease check failed; retrying")

    def _sweep_partial_uploads(self) -> None:
        """Drop the partial uploads of leases that ended (expired, failed, cancelled, done):
        an upload is keyed by its lease, so no one can resume them any more."""
        blobs, catalogue = self.state.blobs, self.state.catalogue
        for key in blobs.partial_keys():
            lease_id = key.split(".", 1)[0]
            lease = found(functools.partial(catalogue.get_lease, lease_id))
            if lease is None or lease.status != LEASE_ACTIVE:
                blobs.discard(key)
                log.info("dropped the partial upload %s: its lease ended", key)

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        self.health.enter_graceful_shutdown()
        if self.enrol_server is not None:
            self.enrol_server.stop(grace).wait()
        self.server.stop(grace).wait()
        self.workers.beats.close()  # the handlers have returned; nothing is queued any more
        if self._metrics_server is not None:
            self._metrics_server.stop()  # before the catalogue it reads closes
        self.state.catalogue.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def _enrol_server(workers: WorkerService, tls: ServerTls, listen: str) -> tuple[grpc.Server, str]:
    """A TLS server (no client certificates) that only registers workers: under mutual TLS a
    worker has no certificate until it registers, and gets it here."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=server_options())
    register = grpc.unary_unary_rpc_method_handler(
        workers.Register,
        request_deserializer=worker_pb2.RegisterRequest.FromString,
        response_serializer=worker_pb2.RegisterResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("tspace.v1.WorkerService", {"Register": register}),)
    )
    port = _bind(server, listen, tls.credentials(client_certs=False))
    if port == 0:
        raise TspaceError(f"cannot listen on {listen}: the address is in use or invalid")
    return server, f"{listen.rsplit(':', 1)[0]}:{port}"


def default_enrol_listen(listen: str) -> str:
    """The registration port next to the main one (an ephemeral port stays ephemeral)."""
    host, port = listen.rsplit(":", 1)
    return f"{host}:{int(port) + 1 if port.isdigit() and int(port) > 0 else 0}"


def serve(
    folder: Path,
    config: CoordinatorConfig,
    listen: str | None,
    *,
    tls: bool = True,
    insecure: bool = False,
    client_certs: bool = False,
    enrol_listen: str | None = None,
    metrics_listen: str | None = None,
) -> Coordinator:
    """Open the folder's state and start serving: TLS with the folder's certificates unless
    `tls` is off, mutual TLS with `client_certs` (registration then on `enrol_listen`), metrics
    on `metrics_listen`. Records how to reach it in the folder (endpoint.json and address)."""
    listen = listen or config.listen
    identity = None
    if tls:
        identity = server_tls(folder, client_certs)
        if identity is None:
            raise TspaceError(
                f"{folder} has no TLS certificates ({folder / TLS_DIR}); create the folder "
                "again with `tspace-coord init`, or serve plaintext on loopback with --no-tls"
            )
    elif client_certs:
        raise TspaceError("--require-client-cert needs TLS; drop --no-tls and --insecure")
    if client_certs and enrol_listen is None:
        enrol_listen = default_enrol_listen(listen)
    if enrol_listen is not None and not client_certs:
        raise TspaceError("--enrol-listen is for mutual TLS; add --require-client-cert")
    coordinator = Coordinator(
        CoordinatorState.open(folder, config),
        listen,
        insecure,
        metrics_listen,
        tls=identity,
        enrol_listen=enrol_listen,
    )
    coordinator.start()
    endpoint = Endpoint(
        address=coordinator.address,
        tls=identity is not None,
        client_certs=client_certs,
        enrol_address=coordinator.enrol_address,
    )
    write_endpoint(folder, endpoint)
    atomic_write_bytes(folder / ADDRESS_FILE, f"{coordinator.address}\n".encode())
    return coordinator
