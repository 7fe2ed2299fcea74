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
from coordinator.admin_client import admin_target
from coordinator.config import ADMIN_CREDENTIAL_FILE, CA_CERT, TLS_DIR, init_dir, load_config
from tspace_core import tls
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
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="A name or IP address workers use to reach this coordinator; goes into the "
            "server certificate (repeatable; localhost, 127.0.0.1 and ::1 are always in it)."
        ),
    ] = None,
) -> None:
    """Create a coordinator folder: config, admin credential, catalogue, blob store, and a CA
    with the server certificate TLS needs."""
    init_dir(folder, catalogue, listen, host or ())
    fingerprint = tls.fingerprint((folder / TLS_DIR / CA_CERT).read_bytes())
    console.print(
        f"coordinator folder {folder} ready; admin credential in "
        f"{folder / ADMIN_CREDENTIAL_FILE} (mode 0600)\n"
        f"CA certificate {folder / TLS_DIR / CA_CERT}, fingerprint {fingerprint}\n"
        f"next: tspace-coord serve {folder}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def serve(
    folder: Annotated[Path, typer.Argument(help="The coordinator folder.")],
    listen: Annotated[str | None, typer.Option(help="host:port (default from config).")] = None,
    use_tls: Annotated[
        bool,
        typer.Option(
            "--tls/--no-tls",
            help="Serve TLS with the folder's certificates; --no-tls serves plaintext, on a "
            "loopback address only unless --insecure.",
        ),
    ] = True,
    insecure: Annotated[
        bool,
        typer.Option(help="Serve plaintext, even on a non-loopback address (implies --no-tls)."),
    ] = False,
    require_client_cert: Annotated[
        bool,
        typer.Option(
            help="Mutual TLS: every call needs a client certificate from this coordinator's CA "
            "(workers get one when they register, on --enrol-listen)."
        ),
    ] = False,
    enrol_listen: Annotated[
        str | None,
        typer.Option(
            help="host:port where workers register under mutual TLS (default: the next port)."
        ),
    ] = None,
    metrics: Annotated[
        str | None, typer.Option(help="Serve Prometheus metrics on host:port, e.g. 127.0.0.1:9100.")
    ] = None,
) -> None:
    """Serve workers and admins until interrupted (SIGINT or SIGTERM)."""
    from coordinator.server import serve as start

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    coordinator = start(
        folder,
        load_config(folder),
        listen,
        tls=use_tls and not insecure,
        insecure=insecure,
        client_certs=require_client_cert,
        enrol_listen=enrol_listen,
        metrics_listen=metrics,
    )
    mode = "plaintext"
    if coordinator.tls is not None:
        mode = "mutual TLS" if coordinator.tls.client_certs else "TLS"
    console.print(f"coordinator serving on {coordinator.address} ({mode})", highlight=False)
    if coordinator.enrol_address:
        console.print(f"workers register on {coordinator.enrol_address}", highlight=False)
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
    target = admin_target(folder)
    run_status(
        target.address,
        target.credential,
        once=once,
        as_json=as_json,
        interval=interval,
        security=target.security,
    )


add_admin_commands(app)  # after init, serve and status, so help lists them first


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    run_cli(app)
