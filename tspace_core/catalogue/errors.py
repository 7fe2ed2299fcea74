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
        "unavailable",
    }
)
# How an "unavailable" error's message starts, so clients can tell a coordinator that cannot
# reach its database from a coordinator they cannot reach.
UNREACHABLE = "the catalogue database is unreachable"
BUSY = "the catalogue database is busy"


class CatalogueError(TspaceError):
    """A refused catalogue operation; `code` says which kind of refusal (see CODES)."""

    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(
                f"unknown catalogue error code {code!r}; expected one of {sorted(CODES)}"
            )
        super().__init__(message)
        self.code = code


def unavailable(detail: str, *, busy: bool = False) -> CatalogueError:
    """The error for a database that could not be reached (or, `busy`, stayed locked) for the
    whole retry budget; the transaction did not take effect, or is checked on the next try."""
    first_line = detail.strip().splitlines()[0] if detail.strip() else "no detail given"
    return CatalogueError(
        "unavailable", f"{BUSY if busy else UNREACHABLE}: {first_line}; retrying is safe"
    )
