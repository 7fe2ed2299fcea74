"""`tspace-coord` commands for the operator: jobs, units, workers, join tokens, checkpoints and
ensembles, each a call to the coordinator's admin API. The coordinator's refusals (unknown
names, wrong states) are printed as they come; --json prints what the records hold."""

from __future__ import annotations

import json
import re
import sys
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from coordinator.admin_client import AdminClient, admin_call
from tspace_core.errors import TspaceError
from tspace_core.proto.tspace.v1 import admin_pb2

# serde, the records and their views load the catalogue package (SQLAlchemy, Alembic); commands
# import them where they use them, so that `tspace-coord --help` and `serve` start quickly.
if TYPE_CHECKING:
    from coordinator import admin_views as views

jobs_app = typer.Typer(help="Create, inspect, pause, resume and cancel jobs.", no_args_is_help=True)
units_app = typer.Typer(
    help="List units; retry failed ones, reset one to a checkpoint.", no_args_is_help=True
)
workers_app = typer.Typer(help="List, inspect and revoke workers.", no_args_is_help=True)
tokens_app = typer.Typer(help="Create, list and revoke one-time join tokens.", no_args_is_help=True)
checkpoints_app = typer.Typer(
    help="List checkpoints; verify them against the store.", no_args_is_help=True
)
ensembles_app = typer.Typer(
    help="List, inspect, register and alias ensembles.", no_args_is_help=True
)
APPS = {
    "jobs": jobs_app,
    "units": units_app,
    "workers": workers_app,
    "tokens": tokens_app,
    "checkpoints": checkpoints_app,
    "ensembles": ensembles_app,
}

MAX_UNIT = 2**31 - 1  # units travel as int32
DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
DURATION_UNITS_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

DirOption = Annotated[Path, typer.Option("--dir", help="The coordinator folder.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
JobFilter = Annotated[str | None, typer.Option("--job", help="Only this job's.")]
UnitFilter = Annotated[
    int | None, typer.Option("--unit", min=0, max=MAX_UNIT, help="Only this unit's.")
]
UnitArgument = Annotated[int, typer.Argument(min=0, max=MAX_UNIT, help="The unit's number.")]


def add_admin_commands(app: typer.Typer) -> None:
    """Register the admin sub-commands (`jobs`, `units`, ...) on `app`."""
    for name, sub in APPS.items():
        app.add_typer(sub, name=name)


# --- output ---


def stdout() -> Console:
    return Console(highlight=False)


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def say(message: str) -> None:
    """An action's one line, never read as markup nor wrapped."""
    stdout().print(Text(message), soft_wrap=True)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --- input ---


def parse_duration(text: str, option: str) -> float:
    """Seconds in "3600", "90m", "24h" or "7d" (also "30s")."""
    match = DURATION.fullmatch(text.strip().lower())
    seconds = float(match[1]) * DURATION_UNITS_S[match[2]] if match else 0.0
    if seconds <= 0:
        raise TspaceError(
            f"{option} {text[:40]!r} is not a duration: give seconds (3600) or a number "
            "with s, m, h or d (90m, 24h, 7d)"
        )
    return seconds


def parse_picks(values: list[str]) -> dict[int, str]:
    """{unit: digest} from UNIT=DIGEST values."""
    picks: dict[int, str] = {}
    for value in values:
        unit, sep, digest = (part.strip() for part in value.partition("="))
        if not sep or not unit.isdigit() or int(unit) > MAX_UNIT or not digest:
            raise TspaceError(
                f"--checkpoint {value[:80]!r}: use UNIT=DIGEST, e.g. 3=1a2b3c4d (a unit number "
                "and its checkpoint's sha256 or at least 8 of its leading hex digits)"
            )
        if int(unit) in picks:
            raise TspaceError(f"--checkpoint names unit {int(unit)} twice; give one per unit")
        picks[int(unit)] = digest
    return picks


# --- jobs ---


@jobs_app.command("create")
def jobs_create(
    file: Annotated[Path, typer.Argument(help="Job spec (TOML).")],
    folder: DirOption = Path("."),
    as_json: JsonOption = False,
) -> None:
    """Create a job on the running coordinator; its data is stored as shards there."""
    from coordinator import admin_views as views
    from tspace_core import serde

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TspaceError(f"cannot read the job file {file}: {exc}") from None
    request = admin_pb2.CreateJobRequest(spec_toml=text, base_dir=str(file.resolve().parent))
    job = serde.job_from_proto(admin_call(folder, "CreateJob", request))
    if as_json:
        print_json(views.job_dict(job))
        return
    say(
        f"job {job.name} created: {plural(job.units, 'unit')} of {job.total_steps} steps "
        f"(hash {job.job_hash[: views.DIGEST_SHOWN]}); workers can lease its units now"
    )


@jobs_app.command("list")
def jobs_list(folder: DirOption = Path("."), as_json: JsonOption = False) -> None:
    """Every job with its status and progress."""
    from coordinator import admin_views as views
    from tspace_core import serde

    response = admin_call(folder, "ListJobs", admin_pb2.ListJobsRequest())
    jobs = [serde.job_from_proto(j) for j in response.jobs]
    if as_json:
        print_json([views.job_dict(j) for j in jobs])
    elif not jobs:
        say("no jobs yet; create one with `tspace-coord jobs create FILE`")
    else:
        out = stdout()
        out.print(views.jobs_table(jobs, time.time(), out.width))


@jobs_app.command("show")
def jobs_show(
    name: Annotated[str, typer.Argument(help="The job's name.")],
    folder: DirOption = Path("."),
    as_json: JsonOption = False,
) -> None:
    """A job: status, hash, shards, ensembles and every unit."""
    from coordinator import admin_views as views
    from tspace_core import serde

    detail = admin_call(folder, "GetJob", admin_pb2.GetJobRequest(name=name))
    job = replace(
        serde.job_from_proto(detail.job),
        spec_json=detail.spec_json,
        shards=tuple(serde.shard_from_proto(s) for s in detail.shards),
    )
    units = [serde.unit_status_from_proto(u) for u in detail.units]
    if as_json:
        print_json(views.job_detail_dict(job, units, list(detail.ensembles)))
    else:
        out = stdout()
        out.print(views.job_view(job, units, list(detail.ensembles), time.time(), out.width))


def change_job(folder: Path, name: str, action: str) -> None:
    """Pause, resume or cancel `name`, and say what that did."""
    from tspace_core import serde
    from tspace_core.catalogue.records import UNIT_LEASED

    with AdminClient(folder) as client:
        units = client.call("ListUnits", admin_pb2.ListUnitsRequest(job=name)).units
        running = sum(1 for u in units if u.status == UNIT_LEASED)
        request = admin_pb2.ChangeJobRequest(name=name, action=action)
        job = serde.job_from_proto(client.call("ChangeJob", request))
    stopped = f"{plural(running, 'running unit')} stopped"
    if action == "pause":
        say(f"job {job.name} paused: {stopped}; `tspace-coord jobs resume {job.name}` continues it")
    elif action == "resume":
        left = job.units - job.units_done
        say(f"job {job.name} resumed: {left} of {plural(job.units, 'unit')} left to train")
    else:
        say(f"job {job.name} cancelled: {stopped}; cancelling is final")


@jobs_app.command("pause")
def jobs_pause(
    name: Annotated[str, typer.Argument(help="The job's name.")], folder: DirOption = Path(".")
) -> None:
    """Stop handing out the job's units and stop those running; they keep their checkpoints."""
    change_job(folder, name, "pause")


@jobs_app.command("resume")
def jobs_resume(
    name: Annotated[str, typer.Argument(help="The job's name.")], folder: DirOption = Path(".")
) -> None:
    """Hand out a paused job's units again; they resume from their newest checkpoints."""
    change_job(folder, name, "resume")


@jobs_app.command("cancel")
def jobs_cancel(
    name: Annotated[str, typer.Argument(help="The job's name.")], folder: DirOption = Path(".")
) -> None:
    """End a job for good: running units stop and none is handed out again."""
    change_job(folder, name, "cancel")


# --- units ---


@units_app.command("list")
def units_list(
    job: JobFilter = None,
    status: Annotated[
        str | None, typer.Option("--status", help="Only units in this status.")
    ] = None,
    folder: DirOption = Path("."),
    as_json: JsonOption = False,
) -> None:
    """Units with their status, progress, attempts, newest checkpoint and last error."""
    from coordinator import admin_views as views
    from tspace_core import serde
    from tspace_core.catalogue.records import UNIT_DONE, UNIT_FAILED, UNIT_LEASED, UNIT_PENDING

    statuses = (UNIT_PENDING, UNIT_LEASED, UNIT_DONE, UNIT_FAILED)
    if status is not None and status not in statuses:
        raise TspaceError(f"--status {status[:40]!r}: use one of {', '.join(statuses)}")
    response = admin_call(folder, "ListUnits", admin_pb2.ListUnitsRequest(job=job or ""))
    units = [serde.unit_status_from_proto(u) for u in response.units]
    units = [u for u in units if status is None or u.status == status]
    if as_json:
        print_json([views.unit_dict(u) for u in units])
    elif not units:
        say("no units match")
    else:
        out = stdout()
        out.print(views.units_table(units, time.time(), out.width))


@units_app.command("retry")
def units_retry(
    job: Annotated[str, typer.Argument(help="The job's name.")],
    unit: UnitArgument,
    folder: DirOption = Path("."),
) -> None:
    """Give a failed unit fresh attempts; it resumes from its newest checkpoint."""
    from tspace_core import serde

    request = admin_pb2.RetryUnitRequest(job=job, unit=unit)
    record = serde.unit_status_from_proto(admin_call(folder, "RetryUnit", request))
    say(
        f"unit {record.unit} of {record.job} is {record.status} again with fresh attempts; "
        "the next lease resumes from its newest checkpoint"
    )


@units_app.command("reset")
def units_reset(
    job: Annotated[str, typer.Argument(help="The job's name.")],
    unit: UnitArgument,
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="Digest (or 8+ leading hex digits) to train from.")
    ],
    folder: DirOption = Path("."),
) -> None:
    """Train a unit again from one of its checkpoints; its later checkpoints are discarded."""
    from coordinator import admin_views as views
    from tspace_core import serde

    with AdminClient(folder) as client:
        request = admin_pb2.ResetUnitRequest(job=job, unit=unit, checkpoint=checkpoint)
        record = serde.unit_status_from_proto(client.call("ResetUnit", request))
        listed = client.call(
            "ListCheckpoints", admin_pb2.ListCheckpointsRequest(job=record.job, unit=record.unit)
        ).checkpoints
    ckpts = [serde.checkpoint_info_from_proto(c) for c in listed]
    target = next((c for c in ckpts if c.sha256.startswith(checkpoint.strip().lower())), None)
    where = f"step {target.step} ({target.sha256[: views.DIGEST_SHOWN]})" if target else checkpoint
    discarded = sum(c.discarded for c in ckpts)
    say(
        f"unit {record.unit} of {record.job} reset to {where}: {record.status}, "
        f"{plural(discarded, 'later checkpoint')} discarded"
    )


# --- workers ---


@workers_app.command("list")
def workers_list(folder: DirOption = Path("."), as_json: JsonOption = False) -> None:
    """Every registered worker: site, status, device, when last seen."""
    from coordinator import admin_views as views
    from tspace_core import serde

    response = admin_call(folder, "ListWorkers", admin_pb2.ListWorkersRequest())
    now = time.time()
    workers = [(serde.worker_from_proto(w, now), w.last_seen_age_s) for w in response.workers]
    if as_json:
        print_json([views.worker_dict(w, age) for w, age in workers])
    elif not workers:
        say("no workers yet; `tspace-coord tokens create --site NAME` makes a join token")
    else:
        out = stdout()
        out.print(views.workers_table(workers, out.width))


@workers_app.command("show")
def workers_show(
    worker_id: Annotated[str, typer.Argument(help="The worker's id.")],
    folder: DirOption = Path("."),
    as_json: JsonOption = False,
) -> None:
    """A worker: its key, host, registration, leased units and checkpoints signed."""
    from coordinator import admin_views as views
    from tspace_core import serde

    response = admin_call(folder, "GetWorker", admin_pb2.GetWorkerRequest(worker_id=worker_id))
    now = time.time()
    worker = replace(
        serde.worker_from_proto(response.worker, now),
        public_key=bytes(response.public_key),
        hostname=response.hostname,
        registered_at=response.registered_at,
    )
    detail = views.WorkerDetail(
        worker=worker,
        last_seen_age_s=response.worker.last_seen_age_s,
        leased=tuple(serde.unit_status_from_proto(u) for u in response.leased),
        checkpoints=response.checkpoints,
    )
    if as_json:
        print_json(views.worker_detail_dict(detail))
    else:
        out = stdout()
        out.print(views.worker_view(detail, now, out.width))


@workers_app.command("revoke")
def workers_revoke(
    worker_id: Annotated[str, typer.Argument(help="The worker's id.")],
    folder: DirOption = Path("."),
) -> None:
    """Refuse a worker's credential from now on; what it signed is no longer trusted, and the
    units it was training or completed with a checkpoint it signed are trained again."""
    from coordinator import admin_views as views

    request = admin_pb2.RevokeWorkerRequest(worker_id=worker_id)
    response = admin_call(folder, "RevokeWorker", request)
    requeued = [(u.job, u.unit) for u in response.requeued]
    say(views.revocation_line(response.worker.worker_id, response.checkpoints, requeued))


# --- join tokens ---


@tokens_app.command("create")
def tokens_create(
    site: Annotated[str, typer.Option("--site", help="The site the token is for.")],
    expires: Annotated[
        str | None,
        typer.Option("--expires", help="Lifetime: seconds, or e.g. 90m, 24h, 7d (default 24h)."),
    ] = None,
    folder: DirOption = Path("."),
    as_json: JsonOption = False,
) -> None:
    """Print a one-time join token (only the token, on stdout) for a site's worker."""
    from coordinator import admin_views as views
    from coordinator.dashboard import fmt_duration

    ttl = parse_duration(expires, "--expires") if expires is not None else 0.0
    response = admin_call(folder, "Enroll", admin_pb2.EnrollRequest(site=site, ttl_s=ttl))
    pins = join_pins(folder)
    if as_json:
        print_json(
            {
                "token": response.token,
                "token_id": response.token_id,
                "site": site,
                "expires_in_s": response.expires_in_s,
                **pins,
            }
        )
        return
    sys.stdout.write(response.token + "\n")
    expires_at = views.time_label(time.time() + response.expires_in_s)
    port = str(pins["address"]).rsplit(":", 1)[1]
    command = f"tspace-worker join --coordinator HOST:{port} --token TOKEN"
    if pins["ca_fingerprint"]:
        command += f" --ca-fingerprint {pins['ca_fingerprint']}"
    if enrol := pins["enrol_address"]:
        command += f" --enrol HOST:{enrol.rsplit(':', 1)[1]}"
    note = (
        f"join token {response.token_id} for site {site}; expires in "
        f"{fmt_duration(response.expires_in_s)} ({expires_at}); a worker joins with "
        f"`{command}` (HOST: this machine's name or address as the site sees it)"
    )
    stderr().print(Text(note), soft_wrap=True)


def join_pins(folder: Path) -> dict[str, str | None]:
    """What a site needs besides its token: where the coordinator listens, the fingerprint of
    its CA when it serves TLS, and the registration address under mutual TLS."""
    from coordinator.config import CA_CERT, TLS_DIR, read_endpoint
    from tspace_core import tls

    endpoint = read_endpoint(folder)
    assert endpoint is not None  # admin_call found it already
    fingerprint = None
    if endpoint.tls:
        fingerprint = tls.fingerprint((folder / TLS_DIR / CA_CERT).read_bytes())
    return {
        "address": endpoint.address,
        "ca_fingerprint": fingerprint,
        "enrol_address": endpoint.enrol_address,
    }


@tokens_app.command("list")
def tokens_list(folder: DirOption = Path("."), as_json: JsonOption = False) -> None:
    """Every join token by id (never the token): site, status, expiry, who used it."""
    from coordinator import admin_views as views
    from tspace_core import serde

    response = admin_call(folder, "ListTokens", admin_pb2.ListTokensRequest())
    tokens = [serde.token_from_proto(t) for t in response.tokens]
    if as_json:
        print_json([views.token_dict(t) for t in tokens])
    elif not tokens:
        say("no join tokens yet; `tspace-coord tokens create --site NAME` makes one")
    else:
        out = stdout()
        out.print(views.tokens_table(tokens, time.time(), out.width))


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id, as `tokens list` shows it.")],
    folder: DirOption = Path("."),
) -> None:
    """Make an unused join token worthless."""
    from tspace_core import serde

    request = admin_pb2.RevokeTokenRequest(token_id=token_id)
    token = serde.token_from_proto(admin_call(folder, "RevokeToken", request))
    say(f"join token {token.token_id} for site {token.site} revoked")


# --- checkpoints ---


def checkpoints_request(job: str | None, unit: int | None) -> admin_pb2.ListCheckpointsRequest:
    request = admin_pb2.ListCheckpointsRequest(job=job or "")
    if unit is not None:
        request.unit = unit
    return request


@checkpoints_app.command("list")
def checkpoints_list(
    job: JobFilter = None,
    unit: UnitFilter = None,
    folder: DirOption = Path("."),
    as_json: JsonOption = False,
) -> None:
    """Checkpoints: digest, unit, step, signer, trust, metrics, size, age."""
    from coordinator import admin_views as views
    from tspace_core import serde

    response = admin_call(folder, "ListCheckpoints", checkpoints_request(job, unit))
    ckpts = [serde.checkpoint_info_from_proto(c) for c in response.checkpoints]
    if as_json:
        print_json([views.checkpoint_dict(c) for c in ckpts])
    elif not ckpts:
        say("no checkpoints match")
    else:
        out = stdout()
        out.print(views.checkpoints_table(ckpts, time.time(), out.width))


@checkpoints_app.command("verify")
def checkpoints_verify(
    digests: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[DIGEST]...", help="Digests or prefixes (default: all that match)."
        ),
    ] = None,
    job: JobFilter = None,
    unit: UnitFilter = None,
    folder: DirOption = Path("."),
    as_json: JsonOption = False,
) -> None:
    """Re-read checkpoints from the store and check digest, signature and signer.

    Exits 1 when any checkpoint fails, 0 when all pass."""
    from coordinator import admin_views as views

    if digests and (job is not None or unit is not None):
        raise TspaceError("give checkpoint digests or --job/--unit, not both")
    request = admin_pb2.VerifyCheckpointsRequest(job=job or "", checkpoints=digests or [])
    if unit is not None:
        request.unit = unit
    verdicts = stream_verdicts(folder, request, show_lines=not as_json)
    failed = sum(not v.ok for v in verdicts)
    if as_json:
        print_json([views.verdict_dict(v) for v in verdicts])
    elif not verdicts:
        stderr().print("no checkpoints to verify")
    else:
        stderr().print(
            f"{plural(len(verdicts), 'checkpoint')} verified: "
            f"{len(verdicts) - failed} ok, {failed} failed"
        )
    if failed:
        raise typer.Exit(1)


def stream_verdicts(
    folder: Path, request: admin_pb2.VerifyCheckpointsRequest, *, show_lines: bool
) -> list[views.Verdict]:
    """The VerifyCheckpoints verdicts, with a progress bar on stderr while they arrive;
    `show_lines` prints each one's line on stdout as it comes."""
    from coordinator import admin_views as views
    from tspace_core import serde

    out, err = stdout(), stderr()
    progress = Progress(
        TextColumn("verifying checkpoints"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=True,
        # Lines for stdout are drawn above the bar only when stdout is that same terminal.
        redirect_stdout=sys.stdout.isatty(),
        redirect_stderr=False,
    )
    verdicts: list[views.Verdict] = []
    with AdminClient(folder) as client, progress:
        task = progress.add_task("verify", total=None)
        with closing(client.stream("VerifyCheckpoints", request)) as stream:
            for msg in stream:
                verdict = views.Verdict(
                    index=msg.index,
                    total=msg.total,
                    ok=msg.ok,
                    problems=tuple(msg.problems),
                    checkpoint=serde.checkpoint_info_from_proto(msg.checkpoint),
                )
                verdicts.append(verdict)
                progress.update(task, total=msg.total, completed=msg.index)
                if show_lines:
                    out.print(views.verdict_line(verdict), soft_wrap=True)
    return verdicts


# --- ensembles ---


@ensembles_app.command("list")
def ensembles_list(folder: DirOption = Path("."), as_json: JsonOption = False) -> None:
    """Every registered ensemble with its aliases."""
    from coordinator import admin_views as views
    from tspace_core import serde

    response = admin_call(folder, "ListEnsembles", admin_pb2.ListEnsemblesRequest())
    ensembles = [serde.ensemble_from_proto(e)[0] for e in response.ensembles]
    if as_json:
        print_json([views.ensemble_dict(e) for e in ensembles])
    elif not ensembles:
        say("no ensembles yet; a job registers <job>:final when its last unit is done")
    else:
        out = stdout()
        out.print(views.ensembles_table(ensembles, time.time(), out.width))


@ensembles_app.command("show")
def ensembles_show(
    name: Annotated[str, typer.Argument(help="An ensemble's name or an alias.")],
    folder: DirOption = Path("."),
    as_json: JsonOption = False,
) -> None:
    """An ensemble's members: unit, states, checkpoint, step, signer, trust."""
    from coordinator import admin_views as views
    from tspace_core import serde

    response = admin_call(folder, "GetEnsemble", admin_pb2.GetEnsembleRequest(name=name))
    record, timesteps, alphas_cumprod = serde.ensemble_from_proto(response)
    if as_json:
        print_json(views.ensemble_dict(record, timesteps, alphas_cumprod, detail=True))
    else:
        out = stdout()
        out.print(views.ensemble_view(record, time.time(), out.width))


@ensembles_app.command("register")
def ensembles_register(
    name: Annotated[str, typer.Argument(help="The new ensemble's name.")],
    job: Annotated[str, typer.Option("--job", help="The job whose units it covers.")],
    select: Annotated[
        str,
        typer.Option("--select", help="Each unit's checkpoint: final, newest or best:METRIC."),
    ] = "final",
    checkpoint: Annotated[
        list[str] | None,
        typer.Option("--checkpoint", help="UNIT=DIGEST: pick that unit's checkpoint (repeat)."),
    ] = None,
    folder: DirOption = Path("."),
) -> None:
    """Register an ensemble of one checkpoint per unit of a job."""
    from tspace_core import serde

    picks = parse_picks(checkpoint or [])
    request = admin_pb2.RegisterEnsembleRequest(
        name=name, job=job, select=select, checkpoints=picks
    )
    record, _, _ = serde.ensemble_from_proto(admin_call(folder, "RegisterEnsemble", request))
    picked = f", {len(picks)} picked by hand" if picks else ""
    say(
        f"ensemble {record.name} registered: {plural(len(record.members), 'member')} "
        f"of job {record.job} ({select}{picked})"
    )


@ensembles_app.command("alias")
def ensembles_alias(
    alias: Annotated[str, typer.Argument(help="The alias, e.g. production.")],
    ensemble: Annotated[str, typer.Argument(help="The ensemble it names.")],
    folder: DirOption = Path("."),
) -> None:
    """Point an alias at an ensemble (an existing alias moves)."""
    from tspace_core import serde

    request = admin_pb2.SetAliasRequest(alias=alias, ensemble=ensemble)
    info = serde.alias_from_proto(admin_call(folder, "SetAlias", request))
    say(f"alias {info.alias} now names ensemble {info.ensemble}")
