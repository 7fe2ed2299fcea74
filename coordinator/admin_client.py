"""The operator's side of the admin API: where a folder's coordinator listens, and calls to it
whose refusals come back as one clear TspaceError."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from coordinator.config import (
    ADDRESS_FILE,  # noqa: F401 - where scripts and tests find the bound address
    ADMIN_CREDENTIAL_FILE,
    ENDPOINT_FILE,
    admin_security,
    read_admin_credential,
    read_endpoint,
)
from tspace_core.catalogue.errors import BUSY, UNREACHABLE
from tspace_core.errors import TspaceError
from tspace_core.proto.tspace.v1 import admin_pb2_grpc
from tspace_core.rpc import ADMIN_HEADER, ChannelSecurity, open_channel

CALL_TIMEOUT_S = 60.0
# A stream re-reads every checkpoint it names; large stores take a while, but never forever.
STREAM_TIMEOUT_S = 24 * 3600.0
# The coordinator is up but its database is not: say so rather than "unreachable coordinator".
CATALOGUE_TROUBLE = (UNREACHABLE, BUSY)


@dataclass(frozen=True)
class AdminTarget:
    """Where the folder's coordinator listens, the admin credential, and the TLS settings."""

    address: str
    credential: str
    security: ChannelSecurity | None

    def channel(self) -> grpc.Channel:
        return open_channel(self.address, self.security)


def admin_target(folder: Path) -> AdminTarget:
    """How to reach the running coordinator of `folder` as its admin."""
    endpoint = read_endpoint(folder)
    if endpoint is None:
        raise TspaceError(
            f"no running coordinator found in {folder} (no {ENDPOINT_FILE} file); "
            "start one with `tspace-coord serve DIR` and pass its folder as --dir DIR"
        )
    host, port = endpoint.address.rsplit(":", 1)
    # A wildcard bind address is reached through loopback, where the admin is.
    address = f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "") else endpoint.address
    credential = read_admin_credential(folder / ADMIN_CREDENTIAL_FILE)
    return AdminTarget(address, credential, admin_security(folder, endpoint))


def call_error(exc: grpc.RpcError, address: str, folder: Path) -> TspaceError:
    """The coordinator's own message for a refusal; a clear one for a transport failure."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith(CATALOGUE_TROUBLE):
        return TspaceError(f"the coordinator at {address} answered: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return TspaceError(
            f"the coordinator at {address} is unreachable; check that "
            f"`tspace-coord serve {folder}` is running"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TspaceError(f"the coordinator at {address} did not answer in time; try again")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return TspaceError(
            f"the coordinator at {address} refused the admin credential in "
            f"{folder / ADMIN_CREDENTIAL_FILE} ({details})"
        )
    name = code.name if code is not None else "UNKNOWN"
    return TspaceError(details or f"the coordinator at {address} answered {name}")


class AdminClient:
    """A channel to the coordinator of a folder, open while used as a context manager."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.target = admin_target(folder)
        self.address = self.target.address
        self._metadata = ((ADMIN_HEADER, self.target.credential),)
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    def __enter__(self) -> AdminClient:
        self._channel = self.target.channel()
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def call(self, method: str, request: object) -> Any:
        """The response of the unary AdminService `method`."""
        try:
            return getattr(self._stub, method)(
                request, timeout=CALL_TIMEOUT_S, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise call_error(exc, self.address, self.folder) from None

    def stream(self, method: str, request: object) -> Generator[Any, None, None]:
        """The messages of the server-streaming AdminService `method`; closing hangs up."""
        call = getattr(self._stub, method)(
            request, timeout=STREAM_TIMEOUT_S, metadata=self._metadata
        )
        try:
            yield from call
        except grpc.RpcError as exc:
            raise call_error(exc, self.address, self.folder) from None
        finally:
            call.cancel()


def admin_call(folder: Path, method: str, request: object) -> Any:
    """One unary call to the coordinator of `folder` on a channel of its own."""
    with AdminClient(folder) as client:
        return client.call(method, request)
