"""Running a CLI: user errors and refusals from a coordinator print one line, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

import grpc
from rich.console import Console

from tspace_core.errors import TspaceError

err_console = Console(stderr=True)


def run_cli(app: Callable[[], object]) -> None:
    """Run a typer app; exit 2 with a message on a TspaceError or an RPC refusal, 130 on ^C."""
    try:
        app()
    except TspaceError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        err_console.print(
            f"[bold red]error:[/] the coordinator answered: {details} ({code})",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
