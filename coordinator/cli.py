"""`tspace-coord`: create, serve and administer a coordinator."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from coordinator.admin_cli import add_admin_commands
from coordinator.admin_client import ADDRESS_FILE, admin_target
from coordinator.config import ADMIN_CREDENTIAL_FILE, init_dir, load_config
from tspace_core.console import run_cli
from tspace_core.errors import TspaceError

app = typer.Typer(
    help="tspace-coord: run the coordinator that hands units to workers at any site.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

DirOption = Annotated[Path, typer.Option("--dir", help="The coordinator folder.")]


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="Folder to create.")],
    catalogue: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (default: SQLite file in the folder).")
    ] = None,
    listen: Annotated[str | None, typer.Option(help="Default listen address.")] = None,
) -> None:
    """Create a coordinator folder: config, admin credential, catalogue, blob store."""
    init_dir(folder, catalogue, listen)
    console.print(
        f"coordinator folder {folder} ready; admin credential in "
        f"{folder / ADMIN_CREDENTIAL_FILE} (mode 0600)\nnext: tspace-coord serve {folder}"
    )


@app.command()
def serve(
    folder: Annotated[Path, typer.Argument(help="The coordinator folder.")],
    listen: Annotated[str | None, typer.Option(help="host:port (default from config).")] = None,
    insecure: Annotated[
        bool, typer.Option(help="Allow plaintext on a non-loopback address.")
    ] = False,
    metrics: Annotated[
        str | None, typer.Option(help="Serve Prometheus metrics on host:port, e.g. 127.0.0.1:9100.")
    ] = None,
) -> None:
    """Serve workers and admins until interrupted (SIGINT or SIGTERM)."""
    from coordinator.server import serve as start

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    coordinator = start(
        folder, load_config(folder), listen, insecure, folder / ADDRESS_FILE, metrics
    )
    console.print(f"coordinator serving on {coordinator.address}", highlight=False)
    if coordinator.metrics_address:
        console.print(f"metrics on http://{coordinator.metrics_address}/metrics", highlight=False)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    console.print("stopping")
    coordinator.stop()


@app.command()
def status(
    folder: DirOption = Path("."),
    once: Annotated[bool, typer.Option(help="Print one snapshot and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one snapshot as JSON.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
) -> None:
    """A live dashboard of jobs, units, workers and events (^C to leave)."""
    from coordinator.dashboard import run_status

    if not 0.1 <= interval <= 3600:
        raise TspaceError("--interval must be between 0.1 and 3600 seconds")
    address, credential = admin_target(folder)
    run_status(address, credential, once=once, as_json=as_json, interval=interval)


add_admin_commands(app)  # after init, serve and status, so help lists them first


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    run_cli(app)
