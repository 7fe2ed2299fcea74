"""The `tspace` command: check jobs, pack data, train a job on one machine, sample and export."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from tspace_core.console import run_cli
from tspace_core.errors import TspaceError

app = typer.Typer(
    help="tspace: train diffusion models as an ensemble over T-space.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
job_app = typer.Typer(help="Inspect job specs.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
app.add_typer(job_app, name="job")
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)


# Where a registered ensemble comes from: shared by `sample` and `export`.
EnsembleOption = Annotated[
    str | None, typer.Option(help="A registered ensemble, e.g. digits:final.")
]
CoordinatorOption = Annotated[
    str | None, typer.Option(help="Fetch --ensemble from this coordinator (host:port).")
]
CredentialOption = Annotated[
    Path | None, typer.Option(help="The coordinator's admin credential file.")
]
CatalogueOption = Annotated[
    str | None, typer.Option(help="Read --ensemble from this catalogue URL.")
]
StoreOption = Annotated[Path | None, typer.Option(help="The coordinator's blob store folder.")]
CaOption = Annotated[
    Path | None,
    typer.Option(help="The coordinator's CA certificate: reach --coordinator over TLS."),
]
ClientCertOption = Annotated[
    Path | None,
    typer.Option(help="A client certificate (PEM) for a coordinator that requires one."),
]
ClientKeyOption = Annotated[Path | None, typer.Option(help="The key of --client-cert (PEM).")]


def _security(ca: Path | None, cert: Path | None, key: Path | None):
    """TLS settings for --coordinator from --ca, --client-cert and --client-key."""
    from tspace_core.rpc import ChannelSecurity

    def read(path: Path, option: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise TspaceError(f"{option}: cannot read {path} ({exc.strerror})") from None

    if ca is None:
        if cert is not None or key is not None:
            raise TspaceError("--client-cert and --client-key need --ca")
        return None
    if (cert is None) != (key is None):
        raise TspaceError("give --client-cert and --client-key together")
    return ChannelSecurity(
        read(ca, "--ca"),
        None if key is None else read(key, "--client-key"),
        None if cert is None else read(cert, "--client-cert"),
    )


def _progress(*extra: TextColumn) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
    )


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@job_app.command("check")
def job_check(
    file: Annotated[Path, typer.Argument(help="Job spec (TOML).")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the resolved job as JSON.")
    ] = False,
) -> None:
    """Validate a job and print what it resolves to: states, alpha-bars, units."""
    from tspace_core.jobspec import load_job

    job = load_job(file)
    if as_json:
        print(json.dumps(job.to_json(), indent=2))
        return
    spec = job.spec
    console.print(f"[bold]{spec.name}[/]  hash {job.hash[:16]}")
    sched = spec.schedule
    console.print(
        f"schedule {sched.kind}, T={sched.num_train_timesteps}; {len(job.latent_states)} states "
        f"({spec.states.spacing}, mapping {spec.states.mapping}); {len(job.units)} units "
        f"({spec.units.partition}); model {spec.model.preset}, {spec.model.prediction_type}; "
        f"{spec.training.steps} steps x batch {spec.training.batch_size} per unit; data "
        f"{spec.data.source}"
    )
    table = Table("unit", "states (base index)", "alpha-bar")
    for i, unit in enumerate(job.units):
        alphas = ", ".join(f"{a:.4g}" for a in job.unit_alphas_cumprod(i))
        table.add_row(str(i), ", ".join(map(str, unit)), alphas)
    console.print(table)


@data_app.command("pack")
def data_pack(
    src: Annotated[str, typer.Argument(help='"digits", an image folder, or a shard manifest.')],
    out: Annotated[Path, typer.Argument(help="Folder to write shards and manifest.json into.")],
    shards: Annotated[int, typer.Option(help="Number of shards.")] = 4,
    resize: Annotated[int | None, typer.Option(help="Resize images to this square side.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty folder.")] = False,
) -> None:
    """Write a dataset as safetensors shards with a manifest of digests."""
    from tspace_core.data import DataConfig, load_dataset, pack_shards

    dataset = load_dataset(DataConfig(source=src, resize=resize), Path.cwd())
    manifest = pack_shards(dataset, out, shards, overwrite=overwrite)
    c, h, w = dataset.shape
    console.print(
        f"packed {len(dataset)} images ({c}x{h}x{w}, {dataset.num_classes} classes) "
        f"into {shards} shards: {manifest}"
    )


@app.command()
def train(
    job_file: Annotated[Path, typer.Argument(help="Job spec (TOML).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder (resumes if it holds this job).")],
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: best).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
) -> None:
    """Train every unit of a job in this process, one after another."""
    from tspace_core.jobspec import load_job
    from tspace_core.runner import UnitProgress, default_device, train_job

    _set_threads(threads)
    job = load_job(job_file)
    device = device or default_device()
    steps = job.spec.training.steps
    total = steps * len(job.units)
    console.print(
        f"training [bold]{job.spec.name}[/]: {len(job.units)} units x {steps} steps on {device} "
        f"-> {out}"
    )
    started = time.perf_counter()
    with _progress(TextColumn("{task.fields[info]}")) as bar:
        overall = bar.add_task("all units", total=total, info="")
        current = bar.add_task("unit 0", total=steps, info="")
        rate = [0.0]

        def report(p: UnitProgress) -> None:
            rate[0] = p.images_per_s if rate[0] == 0 else 0.9 * rate[0] + 0.1 * p.images_per_s
            info = f"loss {p.loss:.4f}  {rate[0]:.0f} img/s"
            bar.update(current, description=f"unit {p.unit}", completed=p.step, info=info)
            bar.update(overall, completed=p.unit * steps + p.step)

        def unit_done(m: object) -> None:
            if not err_console.is_terminal:
                err_console.print(
                    f"unit {getattr(m, 'unit', '?')} done: {getattr(m, 'checkpoint', '')}"
                )

        manifest = train_job(job, out, device=device, report=report, on_unit_done=unit_done)
    elapsed = time.perf_counter() - started
    console.print(
        f"registered ensemble [bold]{manifest.name}[/] ({len(manifest.members)} units) in "
        f"{out / 'ensemble.json'} after {elapsed:.0f} s\n"
        f"next: tspace sample {out} --n 64 --out {out / 'grid.png'}"
    )


@app.command()
def sample(
    run_dir: Annotated[
        Path | None, typer.Argument(help="Folder written by `tspace train`.")
    ] = None,
    ensemble: EnsembleOption = None,
    coordinator: CoordinatorOption = None,
    credential: CredentialOption = None,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    catalogue: CatalogueOption = None,
    store: StoreOption = None,
    out: Annotated[Path, typer.Option(help="grid.png (a PNG grid) or samples.npz (raw).")] = Path(
        "grid.png"
    ),
    n: Annotated[int, typer.Option(help="Number of samples.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    eta: Annotated[float, typer.Option(help="DDIM eta: 0 deterministic, 1 DDPM-like.")] = 0.0,
    steps: Annotated[int | None, typer.Option(help="Sample on this many of the states.")] = None,
    label: Annotated[int | None, typer.Option(help="Class label for every sample.")] = None,
    clip: Annotated[bool, typer.Option(help="Clip predicted x0 to [-1, 1].")] = True,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: best).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
) -> None:
    """Verify an ensemble's checkpoints, assemble the chain and sample.

    From a run folder of `tspace train`, or a registered ensemble (--ensemble) fetched from a
    coordinator (--coordinator, --credential) or read from a catalogue (--catalogue, --store).
    """
    from tspace_core.ensemble import SampleOptions
    from tspace_core.runner import default_device

    if out.suffix not in (".png", ".npz"):
        raise TspaceError(f"--out: {out} must end in .png (a grid) or .npz (raw samples)")
    if n < 1 or eta < 0:
        raise TspaceError("--n must be >= 1 and --eta >= 0")
    _set_threads(threads)
    opts = SampleOptions(
        n=n, seed=seed, eta=eta, steps=steps, label=label, clip_sample=1.0 if clip else None
    )
    device = device or default_device()
    predictor, chain, _ = _load_chain(
        run_dir,
        ensemble,
        coordinator,
        credential,
        catalogue,
        store,
        device,
        _security(ca, client_cert, client_key),
    )
    write_samples(predictor, chain, opts, out, device)


def _load_chain(run_dir, ensemble, coordinator, credential, catalogue, store, device, security):
    from tspace_core import remote
    from tspace_core.ensemble import Chain, load_ensemble, read_manifest

    if run_dir is not None:
        if ensemble or coordinator or catalogue:
            raise TspaceError("give either a run folder or --ensemble, not both")
        manifest = read_manifest(run_dir / "ensemble.json")
        chain = Chain(
            manifest.latent_states,
            manifest.image_shape,
            manifest.num_classes,
            manifest.prediction_type,
        )
        return load_ensemble(run_dir, manifest, device), chain, None
    if ensemble is None:
        raise TspaceError("give a run folder of `tspace train`, or --ensemble NAME")
    if coordinator is not None:
        secret = _read_credential(credential)
        cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "tspace"
        return remote.from_coordinator(coordinator, secret, ensemble, cache, device, security)
    if catalogue is not None and store is not None:
        return remote.from_catalogue(catalogue, store, ensemble, device)
    raise TspaceError("--ensemble needs --coordinator and --credential, or --catalogue and --store")


def _read_credential(credential: Path | None) -> str:
    if credential is None:
        raise TspaceError("--coordinator needs --credential (the admin credential file)")
    secret = credential.read_text().strip() if credential.is_file() else ""
    if not secret:
        raise TspaceError(f"--credential: {credential} is missing or empty")
    return secret


def _load_job(run_dir: Path | None, spec_json: str | None, where: str):
    """The resolved job of the ensemble `_load_chain` loaded: its spec_json, or job.json."""
    from tspace_core.export import job_from_json

    if run_dir is not None:
        where = str(run_dir / "job.json")
        try:
            spec_json = (run_dir / "job.json").read_text(encoding="utf-8")
        except OSError as exc:
            raise TspaceError(
                f"{where} is unreadable ({exc}); is this a `tspace train` folder?"
            ) from None
    try:
        doc = json.loads(spec_json or "")
    except ValueError as exc:
        raise TspaceError(f"{where} is not JSON: {exc}") from None
    return job_from_json(doc, where)


def _sample(predictor, chain, opts, device: str):
    """sample_chain with a progress bar: (images, labels)."""
    from tspace_core.ensemble import sample_chain

    with _progress() as bar:
        task = bar.add_task("sampling", total=opts.steps or len(chain.states))
        return sample_chain(predictor, chain, opts, device, progress=lambda k: bar.advance(task, k))


def write_samples(predictor, chain, opts, out: Path, device: str) -> None:
    from tspace_core.images import save_grid, save_npz

    images, labels = _sample(predictor, chain, opts, device)
    if out.suffix == ".png":
        save_grid(images, out)
    else:
        save_npz(out, images, labels)
    console.print(f"wrote {opts.n} samples to {out}")


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[
        Path | None, typer.Argument(help="Folder written by `tspace train`.")
    ] = None,
    ensemble: EnsembleOption = None,
    coordinator: CoordinatorOption = None,
    credential: CredentialOption = None,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    catalogue: CatalogueOption = None,
    store: StoreOption = None,
    n: Annotated[int, typer.Option(help="Samples to evaluate (compare figures at equal N).")] = 360,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Sample on this many of the states.")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures here as JSON.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: best).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
) -> None:
    """Measure an ensemble's sample quality on digits (8x8): Fréchet distance in the feature
    space of a digits classifier trained deterministically here, and k-NN precision and recall,
    against the digits the classifier held out.

    Samples N images (DDIM, eta 0) from a run folder or a registered ensemble, as `tspace sample`
    does. FD is biased upwards at small N: compare figures only at equal N.
    """
    from tspace_core.ensemble import SampleOptions
    from tspace_core.evaluation import evaluate
    from tspace_core.fsio import atomic_write_bytes
    from tspace_core.runner import default_device

    if n < 4:
        raise TspaceError("--n must be >= 4 (precision and recall need more samples than k = 3)")
    if json_out is not None and json_out.suffix != ".json":
        raise TspaceError(f"--json: {json_out} must end in .json")
    _set_threads(threads)
    device = device or default_device()
    predictor, chain, _ = _load_chain(
        run_dir,
        ensemble,
        coordinator,
        credential,
        catalogue,
        store,
        device,
        _security(ca, client_cert, client_key),
    )
    if tuple(chain.image_shape) != (1, 8, 8):
        shape = "x".join(map(str, chain.image_shape))
        raise TspaceError(
            f"tspace eval measures 8x8 one-channel digits; this ensemble makes {shape} images"
        )
    opts = SampleOptions(n=n, seed=seed, eta=0.0, steps=steps, label=None, clip_sample=1.0)
    images, _ = _sample(predictor, chain, opts, device)
    report = evaluate(images)
    table = Table("figure", "value", title=f"sample quality, {report.n} samples")
    table.add_row("Fréchet distance (lower is better)", f"{report.fd:.2f}")
    table.add_row("precision", f"{report.precision:.3f}")
    table.add_row("recall", f"{report.recall:.3f}")
    table.add_row("confidently classified", f"{report.confident_fraction:.3f}")
    table.add_row("classes 0-9", " ".join(map(str, report.class_histogram)))
    table.add_row("reference", f"{report.n_reference} held-out digits")
    table.add_row("classifier held-out accuracy", f"{report.classifier_accuracy:.4f}")
    console.print(table)
    if json_out is not None:
        figures = dataclasses.asdict(report)
        atomic_write_bytes(json_out, (json.dumps(figures, indent=2) + "\n").encode())
        console.print(f"wrote {json_out}")


class ExportFormat(StrEnum):
    """What `tspace export` can write."""

    diffusers = "diffusers"


@app.command("export")
def export_cmd(
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Only diffusers for now.")],
    run_dir: Annotated[
        Path | None,
        typer.Argument(help="A `tspace train` folder (none with --ensemble).", show_default=False),
    ] = None,
    out: Annotated[
        Path | None, typer.Argument(help="The folder to write.", show_default=False)
    ] = None,
    ensemble: EnsembleOption = None,
    coordinator: CoordinatorOption = None,
    credential: CredentialOption = None,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    catalogue: CatalogueOption = None,
    store: StoreOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier export in OUT.")] = False,
) -> None:
    """Verify an ensemble's checkpoints and write it as a diffusers folder.

    OUT gets one UNet2DModel per unit (unit-NNN/), a DDIMScheduler of the base schedule
    (scheduler/), tspace_ensemble.json (states, alpha-bars, units) and model_index.json;
    `TSpacePipeline.from_pretrained(OUT)` samples it as `tspace sample` does.
    """
    from tspace_core.export import check_export_target, export_diffusers

    if out is None and ensemble is not None:  # the one folder given is OUT
        run_dir, out = None, run_dir
    if out is None:
        raise TspaceError(
            "give the folder to write: tspace export RUN_DIR OUT, or --ensemble NAME ... OUT"
        )
    check_export_target(out, overwrite)  # before any download
    predictor, chain, spec_json = _load_chain(
        run_dir,
        ensemble,
        coordinator,
        credential,
        catalogue,
        store,
        "cpu",
        _security(ca, client_cert, client_key),
    )
    job = _load_job(run_dir, spec_json, f"the job of {ensemble}")
    manifest = export_diffusers(predictor, chain, job, out, overwrite=overwrite)
    console.print(
        f"exported {len(manifest.units)} units of [bold]{manifest.job}[/] ({fmt.value}) to {out}\n"
        f"load it with tspace_core.pipeline.TSpacePipeline.from_pretrained({str(out)!r})",
        highlight=False,
    )


@app.command()
def quickstart(
    workers: Annotated[int, typer.Option(help="Worker processes to start.")] = 2,
    folder: Annotated[Path, typer.Option("--dir", help="Where everything goes.")] = Path(
        "tspace-quickstart"
    ),
    steps: Annotated[
        int | None, typer.Option(help="Training steps per unit (default: the example's).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads per worker.")] = None,
) -> None:
    """The whole system on this machine: coordinator, workers, the digits job, a sample grid."""
    from tspace_core import quickstart as qs
    from tspace_core import remote
    from tspace_core.ensemble import SampleOptions

    if not 1 <= workers <= 64:
        raise TspaceError("--workers must be in 1..64")
    processes = qs.Processes(folder / "logs")
    try:
        with _progress(TextColumn("{task.fields[info]}")) as bar:
            task = bar.add_task("training", total=None, info="starting")

            def show(s) -> None:
                done = sum(u.step for u in s.units if u.status != "done") + sum(
                    u.total_steps for u in s.units if u.status == "done"
                )
                total = sum(u.total_steps for u in s.units) or None
                busy = sum(1 for u in s.units if u.status == "leased")
                finished = sum(1 for u in s.units if u.status == "done")
                rate = sum(u.images_per_s for u in s.units if u.status == "leased")
                bar.update(
                    task,
                    total=total,
                    completed=done,
                    info=f"{finished}/{len(s.units)} units, {busy} training, "
                    f"{len(s.workers)} workers, {rate:.0f} img/s",
                )

            result, admin = qs.run(folder, processes, workers, steps, show, threads)
        credential = (folder / "coordinator" / "admin.credential").read_text().strip()
        predictor, chain, _ = remote.from_coordinator(
            result.address, credential, result.ensemble, folder / "cache", "cpu", result.security
        )
        grid = folder / "grid.png"
        write_samples(predictor, chain, SampleOptions(n=100), grid, "cpu")
        admin.close()
    finally:
        processes.stop()
    coord = folder / "coordinator"
    console.print(
        f"\n[bold]quickstart done[/] in {result.seconds:.0f} s: ensemble "
        f"[bold]{result.ensemble}[/] registered, samples in [bold]{grid}[/]\n"
        f"  coordinator folder  {coord} (catalogue {coord / 'catalogue.db'}, blobs "
        f"{coord / 'blobs'})\n  logs                {folder / 'logs'}\n"
        f"next:\n  tspace sample --ensemble {result.ensemble} --catalogue "
        f"sqlite:///{(coord / 'catalogue.db').resolve()} --store {coord / 'blobs'} --n 64 "
        f"--seed 1 --out grid2.png\n  tspace-coord serve {coord}   (then tspace-coord tokens "
        f"create --site NAME --dir {coord}, and tspace-worker join on another machine)",
        highlight=False,
    )


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    run_cli(app)
