"""Who may call what: a server interceptor authenticates every RPC before its handler runs.

Each method has one rule. Register and the health service are open (a join token is the
credential of Register); every other worker method needs a worker credential of a worker that is
not revoked; admin methods need the admin credential, and a worker credential is refused there
outright; fetching a blob accepts either. Under mutual TLS the client certificate must also
belong to the caller: its common name is the worker id (or the admin's name). A method with no
rule is refused, so a new RPC cannot be exposed by accident."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from coordinator.config import hash_secret
from coordinator.limits import text_problem
from coordinator.state import CoordinatorState, abort, metadata
from tspace_core.catalogue.records import WorkerRecord
from tspace_core.proto.tspace.v1 import admin_pb2, worker_pb2
from tspace_core.rpc import ADMIN_HEADER, CREDENTIAL_HEADER
from tspace_core.tls import ADMIN_COMMON_NAME

OPEN, WORKER, ADMIN, WORKER_OR_ADMIN = "open", "worker", "admin", "worker or admin"


def _service_rules(descriptor: Any, service: str, rule: str) -> dict[str, str]:
    methods = descriptor.services_by_name[service].methods
    return {f"/{descriptor.package}.{service}/{m.name}": rule for m in methods}


def method_rules() -> dict[str, str]:
    """The rule of every method the coordinator serves, by its full gRPC path."""
    rules = {
        **_service_rules(worker_pb2.DESCRIPTOR, "WorkerService", WORKER),
        **_service_rules(admin_pb2.DESCRIPTOR, "AdminService", ADMIN),
        "/grpc.health.v1.Health/Check": OPEN,
        "/grpc.health.v1.Health/Watch": OPEN,
    }
    worker = "/tspace.v1.WorkerService/"
    rules[worker + "Register"] = OPEN
    rules[worker + "FetchCheckpoint"] = WORKER_OR_ADMIN
    rules[worker + "FetchShard"] = WORKER_OR_ADMIN
    return rules


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: a worker, or the admin (worker is None)."""

    worker: WorkerRecord | None


class CallerContext:
    """The handler's view of a call: the gRPC context plus who the interceptor found calling."""

    def __init__(self, context: grpc.ServicerContext, caller: Caller) -> None:
        self._context = context
        self.caller = caller

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the client certificate the TLS layer verified, if any."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode("utf-8", "replace") if names else None


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates each call by its method's rule; `client_certs` adds the certificate check."""

    def __init__(self, state: CoordinatorState, client_certs: bool = False) -> None:
        self.state = state
        self.client_certs = client_certs
        self.rules = method_rules()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        rule = self.rules.get(method)
        if handler is None or rule == OPEN:
            return handler
        if rule is None:
            return _refused(handler, f"{method} is not served to anyone")
        return _guarded(handler, lambda context: self.authenticate(rule, context))

    def authenticate(self, rule: str, context: grpc.ServicerContext) -> Caller:
        given = metadata(context)
        admin_secret = given.get(ADMIN_HEADER, "")
        if admin_secret and rule in (ADMIN, WORKER_OR_ADMIN):
            if not hmac.compare_digest(hash_secret(admin_secret), self.state.admin_credential_hash):
                abort(context, grpc.StatusCode.UNAUTHENTICATED, "admin credential is wrong")
            self._check_certificate(context, ADMIN_COMMON_NAME)
            return Caller(worker=None)
        if rule == ADMIN:
            if given.get(CREDENTIAL_HEADER):
                abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    "a worker credential cannot call admin methods",
                )
            abort(context, grpc.StatusCode.UNAUTHENTICATED, "admin credential missing")
        worker = self.state.authenticate_worker(context)
        self._check_certificate(context, worker.worker_id)
        return Caller(worker=worker)

    def _check_certificate(self, context: grpc.ServicerContext, expected: str) -> None:
        if not self.client_certs:
            return
        name = peer_common_name(context)
        if name != expected:
            abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the client certificate is issued to {name!r}, not to {expected!r}",
            )


def _guarded(
    handler: grpc.RpcMethodHandler, check: Callable[[grpc.ServicerContext], Caller]
) -> grpc.RpcMethodHandler:
    """`handler` with `check` run first; its behaviour gets a CallerContext."""

    unary_request = handler.unary_unary is not None or handler.unary_stream is not None

    def wrap(behaviour: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            caller = check(context)
            if unary_request and (problem := text_problem(request)):
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
            return behaviour(request, CallerContext(context, caller))

        return guarded

    return _rebuild(handler, wrap)


def _refused(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def wrap(behaviour: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def refused(request: Any, context: grpc.ServicerContext) -> Any:
            abort(context, grpc.StatusCode.PERMISSION_DENIED, message)

        return refused

    return _rebuild(handler, wrap)


def _rebuild(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Callable[[Any, Any], Any]], Callable[[Any, Any], Any]],
) -> grpc.RpcMethodHandler:
    serde = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **serde)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **serde)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **serde)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **serde)
