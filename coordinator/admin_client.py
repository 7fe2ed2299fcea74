"""The operator's side of the admin API: where a folder's coordinator listens, and calls to it
whose refusals come back as one clear TspaceError."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from coordinator.config import ADMIN_CREDENTIAL_FILE, read_admin_credential
from tspace_core.errors import TspaceError
from tspace_core.proto.tspace.v1 import admin_pb2_grpc
from tspace_core.rpc import ADMIN_HEADER, insecure_channel

ADDRESS_FILE = "address"  # `serve` writes the address it bound here
CALL_TIMEOUT_S = 60.0
# A stream re-reads every checkpoint it names; large stores take a while, but never forever.
STREAM_TIMEOUT_S = 24 * 3600.0


def admin_target(folder: Path) -> tuple[str, str]:
    """(address, admin credential) of the running coordinator in `folder`."""
    try:
        address = (folder / ADDRESS_FILE).read_text().strip()
    except OSError:
        address = ""
    if not address:
        raise TspaceError(
            f"no running coordinator found in {folder} (no {ADDRESS_FILE} file); "
            "start one with `tspace-coord serve DIR` and pass its folder as --dir DIR"
        )
    return address, read_admin_credential(folder / ADMIN_CREDENTIAL_FILE)


def call_error(exc: grpc.RpcError, address: str, folder: Path) -> TspaceError:
    """The coordinator's own message for a refusal; a clear one for a transport failure."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
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
        self.address, credential = admin_target(folder)
        self._metadata = ((ADMIN_HEADER, credential),)
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    def __enter__(self) -> AdminClient:
        self._channel = insecure_channel(self.address)
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
