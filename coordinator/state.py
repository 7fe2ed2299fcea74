"""What every RPC handler shares: config, catalogue, blob store, clock, and error mapping."""

from __future__ import annotations

import contextlib
import errno
import functools
import hmac
import inspect
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import grpc

from coordinator.config import (
    ADMIN_CREDENTIAL_FILE,
    CoordinatorConfig,
    hash_secret,
    read_admin_credential,
)
from tspace_core.blobs import BlobStore
from tspace_core.catalogue import Catalogue, CatalogueError
from tspace_core.catalogue.records import LEASE_ACTIVE, WORKER_REVOKED, LeaseRecord, WorkerRecord
from tspace_core.errors import BlobError, SignatureError, TspaceError
from tspace_core.rpc import ADMIN_HEADER, CREDENTIAL_HEADER
from tspace_core.tls import Issued

MAX_TEXT = 256
# A worker looked up by its credential is trusted from memory this long. Revocation through
# this coordinator forgets it at once (forget_worker); the bound covers changes made to a
# shared catalogue by anything else.
CREDENTIAL_CACHE_S = 5.0
CREDENTIAL_CACHE_SIZE = 100_000
# A worker's last_seen is written at most this often (every call would be a write each).
LAST_SEEN_EVERY_S = 5.0
LEASE_ID = re.compile(r"l-[0-9a-f]{16}")  # as the catalogue makes them

CATALOGUE_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "conflict": grpc.StatusCode.ABORTED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    # The database stayed unreachable through the catalogue's retries; clients retry this.
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


class SteadyClock:
    """The coordinator's clock: Unix seconds when it starts, then advancing with the monotonic
    clock. Leases expire by it, so stepping the host's wall clock (NTP, a VM resumed, an
    operator's `date -s`) neither expires every lease at once nor keeps dead ones alive. It is
    read from the wall clock again only when the coordinator restarts. Workers' clocks play no
    part: the coordinator sets every deadline."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic
        self._origin = wall() - monotonic()

    def __call__(self) -> float:
        return self._origin + self._monotonic()


@dataclass
class CoordinatorState:
    """The coordinator's resources; `clock` is the only source of time for leases."""

    folder: Path
    config: CoordinatorConfig
    catalogue: Catalogue
    blobs: BlobStore
    admin_credential_hash: str
    clock: Callable[[], float] = field(default_factory=SteadyClock)
    # The CA that signs workers' client certificates at registration; None without TLS.
    tls_ca: Issued | None = None
    client_certs: bool = False  # mutual TLS: registration must bring a CSR

    @classmethod
    def open(cls, folder: Path, config: CoordinatorConfig) -> CoordinatorState:
        admin = read_admin_credential(folder / ADMIN_CREDENTIAL_FILE)
        return cls(
            folder=folder,
            config=config,
            catalogue=Catalogue(config.catalogue_url),
            blobs=BlobStore(folder / "blobs"),
            admin_credential_hash=hash_secret(admin),
        )

    def __post_init__(self) -> None:
        # Credential digest -> (worker, monotonic time read): most calls skip the database.
        self._credentials: dict[str, tuple[WorkerRecord, float]] = {}
        # Worker id -> monotonic time its last_seen was last written.
        self._seen: dict[str, float] = {}
        self._credentials_lock = threading.Lock()

    def forget_worker(self, worker_id: str) -> None:
        """Drop what is cached of a worker (call after revoking it): its next call is checked
        against the catalogue again."""
        with self._credentials_lock:
            for digest, (record, _) in list(self._credentials.items()):
                if record.worker_id == worker_id:
                    del self._credentials[digest]
            self._seen.pop(worker_id, None)

    def worker(self, context: grpc.ServicerContext) -> WorkerRecord:
        """The worker a call comes from: the one the auth interceptor found, else looked up by
        its credential (the call is aborted when there is none)."""
        caller = getattr(context, "caller", None)
        if caller is not None and caller.worker is not None:
            return cast(WorkerRecord, caller.worker)
        return self.authenticate_worker(context)

    def authenticate_worker(self, context: grpc.ServicerContext) -> WorkerRecord:
        """The active worker whose credential the call carries; aborts the call otherwise."""
        credential = metadata(context).get(CREDENTIAL_HEADER)
        if not credential:
            abort(context, grpc.StatusCode.UNAUTHENTICATED, "no worker credential; register first")
        digest, now = hash_secret(credential), time.monotonic()
        with self._credentials_lock:
            cached = self._credentials.get(digest)
        if cached is not None and now - cached[1] < CREDENTIAL_CACHE_S:
            record: WorkerRecord | None = cached[0]
        else:
            # Called by the auth interceptor, outside any handler's handles_errors.
            with catalogue_errors(context):
                record = self.catalogue.worker_by_credential(digest)
            if record is not None:
                with self._credentials_lock:
                    if len(self._credentials) >= CREDENTIAL_CACHE_SIZE:
                        self._credentials.clear()
                    self._credentials[digest] = (record, now)
        if record is None:
            abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "unknown worker credential; register again with a join token",
            )
        if record.status == WORKER_REVOKED:
            abort(
                context, grpc.StatusCode.PERMISSION_DENIED, f"worker {record.worker_id} is revoked"
            )
        with self._credentials_lock:
            due = now - self._seen.get(record.worker_id, -LAST_SEEN_EVERY_S) >= LAST_SEEN_EVERY_S
            if due:
                self._seen[record.worker_id] = now
        if due:
            with catalogue_errors(context):
                self.catalogue.touch_worker(record.worker_id, self.clock())
        return record

    def is_admin(self, context: grpc.ServicerContext) -> bool:
        caller = getattr(context, "caller", None)
        if caller is not None:
            return caller.worker is None
        given = metadata(context).get(ADMIN_HEADER, "")
        return bool(given) and hmac.compare_digest(hash_secret(given), self.admin_credential_hash)

    def require_admin(self, context: grpc.ServicerContext) -> None:
        if not self.is_admin(context):
            abort(context, grpc.StatusCode.UNAUTHENTICATED, "admin credential missing or wrong")


def metadata(context: grpc.ServicerContext) -> dict[str, str]:
    """The call's text metadata (binary values are ignored)."""
    return {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def _status_of(exc: TspaceError) -> grpc.StatusCode:
    if isinstance(exc, CatalogueError):
        return CATALOGUE_CODES.get(exc.code, grpc.StatusCode.FAILED_PRECONDITION)
    if isinstance(exc, SignatureError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, BlobError):
        return (
            grpc.StatusCode.DATA_LOSS if "digest" in str(exc) else grpc.StatusCode.INVALID_ARGUMENT
        )
    return grpc.StatusCode.INVALID_ARGUMENT


@contextlib.contextmanager
def catalogue_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """Abort the call with the status and message of a CatalogueError raised inside."""
    try:
        yield
    except CatalogueError as exc:
        abort(context, _status_of(exc), str(exc))


F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(method: F) -> F:
    """Turn a user-caused TspaceError into a gRPC status with its message (no traceback)."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except TspaceError as exc:
                abort(context, _status_of(exc), str(exc))
            except OSError as exc:
                _storage_full(context, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except TspaceError as exc:
            abort(context, _status_of(exc), str(exc))
        except OSError as exc:
            _storage_full(context, exc)

    return unary  # type: ignore[return-value]


def _storage_full(context: grpc.ServicerContext, exc: OSError) -> NoReturn:
    """A full disk is the operator's to fix and the caller's to retry: RESOURCE_EXHAUSTED
    (which clients retry with backoff); any other OSError stays an internal error."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise exc
    abort(
        context,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "the coordinator's storage is full; the call can be retried once space is freed "
        "(an upload resumes where it stopped)",
    )


def check_lease_id(context: grpc.ServicerContext, lease_id: str) -> None:
    """Abort a call whose lease id is not one the catalogue could have made."""
    if not LEASE_ID.fullmatch(lease_id):
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, "lease_id is not a lease id")


def owned_lease(
    state: CoordinatorState, context: grpc.ServicerContext, lease_id: str, worker: WorkerRecord
) -> LeaseRecord:
    """The caller's active lease `lease_id`, or the call is aborted."""
    check_lease_id(context, lease_id)
    lease = found(lambda: state.catalogue.get_lease(lease_id))
    if lease is None or lease.worker_id != worker.worker_id:
        abort(context, grpc.StatusCode.NOT_FOUND, f"no lease {lease_id[:64]!r} held by this worker")
    if lease.status != LEASE_ACTIVE:
        abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"lease {lease_id} is {lease.status}")
    return lease


T = TypeVar("T")


def found(lookup: Callable[[], T]) -> T | None:
    """The looked-up record, or None where the catalogue says it does not exist."""
    try:
        return lookup()
    except CatalogueError as exc:
        if exc.code == "not_found":
            return None
        raise


def upload_key(lease: LeaseRecord, sha256: str) -> str:
    """Partial uploads are keyed by lease and digest: a new lease starts a new upload."""
    return f"{lease.lease_id}.{sha256[:64]}"
