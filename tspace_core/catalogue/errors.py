"""The one error type the catalogue raises for anything a caller can cause."""

from __future__ import annotations

from tspace_core.errors import TspaceError

# Named after the gRPC status codes the coordinator maps them to.
CODES = frozenset(
    {
        "not_found",
        "already_exists",
        "conflict",
        "unauthenticated",
        "failed_precondition",
        "invalid_argument",
    }
)


class CatalogueError(TspaceError):
    """A refused catalogue operation; `code` says which kind of refusal (see CODES)."""

    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(
                f"unknown catalogue error code {code!r}; expected one of {sorted(CODES)}"
            )
        super().__init__(message)
        self.code = code
