"""`tspace-coord`: create, serve and administer a coordinator."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console

from coordinator.config import ADMIN_CREDENTIAL_FILE, init_dir, load_config, read_admin_credential
from tspace_core.console import run_cli
from tspace_core.errors import TspaceError

app = typer.Typer(
    help="tspace-coord: run the coordinator that hands units to workers at any site.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
job_app = typer.Typer(help="Jobs.", no_args_is_help=True)
app.add_typer(job_app, name="job")
console = Console()
err_console = Console(stderr=True)
ADDRESS_FILE = "address"

DirOption = Annotated[Path, typer.Option("--dir", help="The coordinator folder.")]
TIMEOUT_S = 60.0


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


def admin_target(folder: Path) -> tuple[str, str]:
    """(address, admin credential) of the running coordinator in `folder`."""
    try:
        address = (folder / ADDRESS_FILE).read_text().strip()
    except OSError:
        raise TspaceError(
            f"no running coordinator found in {folder} (no {ADDRESS_FILE} file); "
            f"start it with `tspace-coord serve {folder}`"
        ) from None
    return address, read_admin_credential(folder / ADMIN_CREDENTIAL_FILE)


def _admin_call(folder: Path, method: str, request: object) -> object:
    from tspace_core.proto.tspace.v1 import admin_pb2_grpc
    from tspace_core.rpc import ADMIN_HEADER, insecure_channel

    address, credential = admin_target(folder)
    with insecure_channel(address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        try:
            return getattr(stub, method)(
                request, timeout=TIMEOUT_S, metadata=((ADMIN_HEADER, credential),)
            )
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise TspaceError(f"the coordinator at {address} is unreachable") from None
            raise TspaceError(f"{exc.details()} ({code.name})") from None


@job_app.command("create")
def job_create(
    file: Annotated[Path, typer.Argument(help="Job spec (TOML).")],
    folder: DirOption = Path("."),
) -> None:
    """Create a job on the running coordinator; its data is stored as shards there."""
    from tspace_core.proto.tspace.v1 import admin_pb2

    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise TspaceError(f"cannot read the job file {file}: {exc}") from None
    request = admin_pb2.CreateJobRequest(spec_toml=text, base_dir=str(file.resolve().parent))
    job = _admin_call(folder, "CreateJob", request)
    console.print(f"job {job.name} ({job.units} units, hash {job.job_hash[:12]}) created")  # type: ignore[attr-defined]


@app.command()
def enroll(
    site: Annotated[str, typer.Option(help="Name of the site the token is for.")],
    ttl: Annotated[float, typer.Option(help="Token lifetime in seconds (0: default).")] = 0.0,
    folder: DirOption = Path("."),
) -> None:
    """Print a one-time join token for a site's worker."""
    from tspace_core.proto.tspace.v1 import admin_pb2

    response = _admin_call(folder, "Enroll", admin_pb2.EnrollRequest(site=site, ttl_s=ttl))
    print(response.token)  # type: ignore[attr-defined]


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


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    run_cli(app)
