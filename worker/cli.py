"""`tspace-worker`: join a coordinator and train the units it hands out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from tspace_core.console import run_cli
from tspace_core.errors import TspaceError

app = typer.Typer(
    help="tspace-worker: train T-space units for a coordinator.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """tspace-worker: train T-space units for a coordinator."""


def _display(progress: Progress | None):
    """A display callback: a rich bar in a terminal, a log line every 10% otherwise."""
    from worker.agent import UnitReport

    tasks: dict[tuple[str, int], TaskID] = {}
    log = logging.getLogger("tspace.worker")

    def show(r: UnitReport) -> None:
        key = (r.job, r.unit)
        info = f"loss {r.loss:.4f}  {r.images_per_s:.0f} img/s"
        if progress is not None:
            if key not in tasks:
                tasks[key] = progress.add_task(f"{r.job} unit {r.unit}", total=r.total, info="")
            progress.update(tasks[key], completed=r.step, info=info)
        elif r.step == r.total or r.step % max(r.total // 10, 1) == 0:
            log.info("%s unit %d: step %d/%d, %s", r.job, r.unit, r.step, r.total, info)

    return show


def _pinned_ca(
    coordinator: str,
    enrol: str | None,
    ca: Path | None,
    fingerprint: str | None,
    insecure: bool,
    registering: bool,
) -> bytes | None:
    """The CA certificate to pin for registration (None: plaintext), from --ca or fetched from
    the coordinator and matched against --ca-fingerprint."""
    from tspace_core import tls
    from tspace_core.rpc import is_loopback

    if ca is not None and fingerprint is not None:
        raise TspaceError("give --ca or --ca-fingerprint, not both")
    if ca is not None:
        try:
            pem = ca.read_bytes()
        except OSError as exc:
            raise TspaceError(f"cannot read --ca {ca}: {exc.strerror}") from None
        tls.fingerprint(pem)  # refuses a file that holds no certificate
        return pem
    if fingerprint is not None:
        return tls.fetch_ca(enrol or coordinator, fingerprint)
    if registering and not insecure and not is_loopback(coordinator):
        raise TspaceError(
            f"{coordinator} is not a loopback address: pin the coordinator's CA with --ca FILE "
            "or --ca-fingerprint (printed by `tspace-coord tokens create`), or pass --insecure "
            "to send the join token in plaintext"
        )
    return None


@app.command()
def join(
    coordinator: Annotated[str, typer.Option(help="Coordinator address, host:port.")],
    token: Annotated[str | None, typer.Option(help="One-time join token (first run only).")] = None,
    data: Annotated[Path | None, typer.Option(help="Folder of local shards to use.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    state_dir: Annotated[Path, typer.Option(help="Key, credential and cache.")] = Path(
        "~/.tspace/worker"
    ),
    keep_alive: Annotated[bool, typer.Option(help="Wait for new jobs instead of exiting.")] = False,
    ca: Annotated[
        Path | None,
        typer.Option(help="The coordinator's CA certificate (PEM): connect over TLS pinned to it."),
    ] = None,
    ca_fingerprint: Annotated[
        str | None,
        typer.Option(
            help="The SHA-256 fingerprint of the coordinator's CA, as `tspace-coord tokens "
            "create` prints it: fetch the CA from the coordinator and pin it."
        ),
    ] = None,
    enrol: Annotated[
        str | None,
        typer.Option(help="Where to register when the coordinator requires client certificates."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Allow plaintext to a coordinator that is not on loopback.")
    ] = False,
) -> None:
    """Register with the coordinator (once), then lease and train units until none are left."""
    ca_pem = _pinned_ca(coordinator, enrol, ca, ca_fingerprint, insecure, token is not None)
    import torch

    from worker.agent import WorkerOptions, device_description, work_loop
    from worker.client import Session
    from worker.identity import join as join_coordinator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if threads is not None:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TspaceError(f"--device {device}: no CUDA device is available here; use cpu")
    opts = WorkerOptions(state_dir.expanduser(), device, data, keep_alive)
    identity, key, security = join_coordinator(
        opts.state_dir, coordinator, token, device_description(device), ca_pem, enrol
    )
    logging.getLogger("tspace.worker").info(
        "worker %s (site %s, key %s) joined %s",
        identity.worker_id,
        identity.site,
        identity.key_id,
        coordinator,
    )
    session = Session(coordinator, identity.credential, security)
    try:
        if err_console.is_terminal:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            with Progress(*columns, console=err_console) as progress:
                code = work_loop(session, identity, key, opts, _display(progress))
        else:
            code = work_loop(session, identity, key, opts, _display(None))
    finally:
        session.close()
    raise typer.Exit(code)


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    run_cli(app)
