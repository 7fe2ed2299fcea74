"""What the admin commands print: records as JSON-ready dicts (snake_case keys, bytes as hex,
times as Unix seconds) and as rich tables that fit the terminal."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from coordinator.dashboard import STATUS_STYLE, Column, fit_columns, fmt_age, states_label, table
from coordinator.status_view import OFF_WIRE, unit_steps
from tspace_core.catalogue.records import (
    CheckpointRecord,
    EnsembleRecord,
    JobRecord,
    TokenRecord,
    UnitRecord,
    WorkerRecord,
)

DIGEST_SHOWN = 12
ERROR_SHOWN = 60
# Record fields the admin API does not carry: serde fills them with neutral values, so JSON
# output leaves them out rather than print a made-up empty value.
JOB_OFF_WIRE = OFF_WIRE[JobRecord]
UNIT_OFF_WIRE = OFF_WIRE[UnitRecord]
WORKER_OFF_WIRE = ("public_key", "hostname", "registered_at")
TOKEN_OFF_WIRE = ("used_at",)
CHECKPOINT_OFF_WIRE = ("shards_seen",)
MEMBER_OFF_WIRE = ("worker_id", "created_at", "attempt", "metrics", "shards_seen", "discarded")


@dataclass(frozen=True)
class WorkerDetail:
    """A worker as `workers show` sees it: the record (public key, host and registration time
    included), its age as the coordinator measured it, the units it trains now and how many
    checkpoints it signed."""

    worker: WorkerRecord
    last_seen_age_s: float
    leased: tuple[UnitRecord, ...]
    checkpoints: int


@dataclass(frozen=True)
class Verdict:
    """One checkpoint's outcome in `checkpoints verify`: ok, or every problem found."""

    index: int
    total: int
    ok: bool
    problems: tuple[str, ...]
    checkpoint: CheckpointRecord


# --- JSON ---


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types: dataclasses as dicts, bytes as hex, tuples as lists."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def record_dict(record: Any, drop: Iterable[str] = ()) -> dict[str, Any]:
    """A record's fields as JSON-ready values, without the fields in `drop`."""
    out = jsonable(record)
    for name in drop:
        out.pop(name, None)
    return dict(out)


def job_dict(job: JobRecord) -> dict[str, Any]:
    return record_dict(job, JOB_OFF_WIRE)


def job_detail_dict(
    job: JobRecord, units: Sequence[UnitRecord], ensembles: Sequence[str]
) -> dict[str, Any]:
    """The job, its resolved spec (parsed), shards, units and ensembles."""
    return {
        "job": job_dict(job),
        "spec": json.loads(job.spec_json) if job.spec_json else None,
        "shards": jsonable(job.shards),
        "units": [unit_dict(u) for u in units],
        "ensembles": list(ensembles),
    }


def unit_dict(unit: UnitRecord) -> dict[str, Any]:
    return record_dict(unit, UNIT_OFF_WIRE)


def worker_dict(worker: WorkerRecord, last_seen_age_s: float) -> dict[str, Any]:
    """`last_seen` is on this host's clock; `last_seen_age_s` is the coordinator's figure."""
    return record_dict(worker, WORKER_OFF_WIRE) | {"last_seen_age_s": last_seen_age_s}


def worker_detail_dict(detail: WorkerDetail) -> dict[str, Any]:
    return record_dict(detail.worker) | {
        "last_seen_age_s": detail.last_seen_age_s,
        "leased": [unit_dict(u) for u in detail.leased],
        "checkpoints": detail.checkpoints,
    }


def token_dict(token: TokenRecord) -> dict[str, Any]:
    return record_dict(token, TOKEN_OFF_WIRE)


def checkpoint_dict(ckpt: CheckpointRecord) -> dict[str, Any]:
    return record_dict(ckpt, CHECKPOINT_OFF_WIRE)


def verdict_dict(verdict: Verdict) -> dict[str, Any]:
    return {
        "index": verdict.index,
        "total": verdict.total,
        "ok": verdict.ok,
        "problems": list(verdict.problems),
        "checkpoint": checkpoint_dict(verdict.checkpoint),
    }


def ensemble_dict(
    record: EnsembleRecord,
    timesteps: Sequence[int] = (),
    alphas_cumprod: Sequence[float] = (),
    *,
    detail: bool = False,
) -> dict[str, Any]:
    """The ensemble and its members; `detail` adds the resolved spec and the base schedule."""
    out = record_dict(record, ("spec_json", "members"))
    out["members"] = [
        {
            "unit": m.unit,
            "timesteps": list(m.timesteps),
            "trusted": m.checkpoint.trusted,
            "checkpoint": record_dict(m.checkpoint, MEMBER_OFF_WIRE),
        }
        for m in record.members
    ]
    if detail:
        out["spec"] = json.loads(record.spec_json) if record.spec_json else None
        out["timesteps"] = list(timesteps)
        out["alphas_cumprod"] = list(alphas_cumprod)
    return out


# --- small formatters ---


def ago(t: float | None, now: float) -> str:
    """How long ago `t` was, e.g. "3m"; "" when unknown."""
    return fmt_age(now - t) if t else ""


def until(t: float, now: float) -> str:
    """ "in 23h" for a future time, "2h ago" for a past one."""
    return f"in {fmt_age(t - now)}" if t > now else f"{fmt_age(now - t)} ago"


def time_label(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "unknown"


def fmt_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if v is not None)


def clip(text: str, width: int) -> str:
    """One line of at most `width` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def styled(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def flag(value: bool, yes: str = "yes", no: str = "no", bad: bool | None = None) -> Text:
    """yes/no; the answer equal to `bad` (if given) is marked for the operator's eye."""
    return Text(yes if value else no, style="bold red" if value == bad else "")


def fitted(columns: list[Column], width: int) -> Table:
    """The columns that fit in `width` cells: the least needed ones go first."""
    return table(fit_columns(columns, width))


def column(header: str, values: Iterable[str | Text], keep: int, cap: int, **kw: Any) -> Column:
    """A column of plain values (Text, so names with brackets are never read as markup)."""
    cells = [v if isinstance(v, Text) else Text(v) for v in values]
    return Column(header, cells, keep, cap, **kw)


# --- tables: `keep` 0 columns stay longest when the terminal is narrow ---


def jobs_table(jobs: Sequence[JobRecord], now: float, width: int) -> Table:
    return fitted(
        [
            column("job", [j.name for j in jobs], 0, 32),
            column("status", [styled(j.status) for j in jobs], 0, 9),
            column("done", [f"{j.units_done}/{j.units}" for j in jobs], 0, 13, justify="right"),
            column("failed", [str(j.units_failed or "") for j in jobs], 1, 6, justify="right"),
            column("steps", [str(j.total_steps) for j in jobs], 3, 9, justify="right"),
            column("hash", [j.job_hash[:DIGEST_SHOWN] for j in jobs], 4, DIGEST_SHOWN),
            column("created", [ago(j.created_at, now) for j in jobs], 2, 7, justify="right"),
        ],
        width,
    )


def units_table(units: Sequence[UnitRecord], now: float, width: int) -> Table:
    def newest(u: UnitRecord) -> str:
        if u.newest_step is None:
            return ""
        return f"step {u.newest_step}, {ago(u.newest_checkpoint_at, now)}"

    return fitted(
        [
            column("unit", [str(u.unit) for u in units], 0, 6, justify="right"),
            column("job", [u.job for u in units], 1, 24),
            column("states", [states_label(u.timesteps) for u in units], 6, 11),
            column("status", [styled(u.status) for u in units], 0, 7),
            column("worker", [u.worker_id or "" for u in units], 2, 20),
            column("step", [f"{unit_steps(u)}/{u.total_steps}" for u in units], 0, 13),
            column(
                "loss", [f"{u.loss:.4f}" if u.loss else "" for u in units], 4, 7, justify="right"
            ),
            column("att", [str(u.attempts) for u in units], 3, 3, justify="right"),
            column("checkpoint", [newest(u) for u in units], 3, 18),
            column("last error", [clip(u.last_error, ERROR_SHOWN) for u in units], 5, ERROR_SHOWN),
        ],
        width,
    )


def workers_table(workers: Sequence[tuple[WorkerRecord, float]], width: int) -> Table:
    """Workers with the age the coordinator measured for each."""
    return fitted(
        [
            column("worker", [w.worker_id for w, _ in workers], 0, 20),
            column("site", [w.site for w, _ in workers], 1, 16),
            column("status", [styled(w.status) for w, _ in workers], 0, 7),
            column("device", [w.device for w, _ in workers], 4, 24),
            column("seen", [fmt_age(age) for _, age in workers], 2, 4, justify="right"),
            column("done", [str(w.units_done) for w, _ in workers], 3, 5, justify="right"),
            column("key", [w.key_id for w, _ in workers], 5, 16),
        ],
        width,
    )


def tokens_table(tokens: Sequence[TokenRecord], now: float, width: int) -> Table:
    def expires(t: TokenRecord) -> str:
        return until(t.expires_at, now) if t.status in ("unused", "expired") else ""

    return fitted(
        [
            column("token", [t.token_id for t in tokens], 0, DIGEST_SHOWN),
            column("site", [t.site for t in tokens], 0, 16),
            column("status", [styled(t.status) for t in tokens], 0, 7),
            column("created", [ago(t.created_at, now) for t in tokens], 3, 7, justify="right"),
            column("expires", [expires(t) for t in tokens], 1, 9),
            column("worker", [t.worker_id or "" for t in tokens], 2, 20),
        ],
        width,
    )


def checkpoints_table(checkpoints: Sequence[CheckpointRecord], now: float, width: int) -> Table:
    cs = checkpoints
    return fitted(
        [
            column("digest", [c.sha256[:DIGEST_SHOWN] for c in cs], 0, DIGEST_SHOWN),
            column("job", [c.job for c in cs], 2, 16),
            column("unit", [str(c.unit) for c in cs], 0, 6, justify="right"),
            column("step", [str(c.step) for c in cs], 0, 8, justify="right"),
            column("final", [flag(c.final) for c in cs], 1, 5),
            column("worker", [c.worker_id for c in cs], 4, 20),
            column("trusted", [flag(c.trusted, bad=False) for c in cs], 1, 7),
            column("discarded", [flag(c.discarded, bad=True) for c in cs], 3, 9),
            column("metrics", [fmt_metrics(c.metrics) for c in cs], 5, 24),
            column("size", [fmt_bytes(c.size) for c in cs], 6, 10, justify="right"),
            column("age", [ago(c.created_at, now) for c in cs], 5, 4, justify="right"),
        ],
        width,
    )


def ensembles_table(ensembles: Sequence[EnsembleRecord], now: float, width: int) -> Table:
    def trusted(e: EnsembleRecord) -> Text:
        n = sum(m.checkpoint.trusted for m in e.members)
        return Text(f"{n}/{len(e.members)}", style="" if n == len(e.members) else "bold red")

    return fitted(
        [
            column("ensemble", [e.name for e in ensembles], 0, 32),
            column("job", [e.job for e in ensembles], 1, 16),
            column("members", [str(len(e.members)) for e in ensembles], 2, 7, justify="right"),
            column("trusted", [trusted(e) for e in ensembles], 1, 7, justify="right"),
            column("aliases", [", ".join(e.aliases) for e in ensembles], 0, 32),
            column("created", [ago(e.created_at, now) for e in ensembles], 3, 7, justify="right"),
        ],
        width,
    )


def members_table(record: EnsembleRecord, width: int) -> Table:
    ms, cs = record.members, [m.checkpoint for m in record.members]
    return fitted(
        [
            column("unit", [str(m.unit) for m in ms], 0, 6, justify="right"),
            column("states", [states_label(m.timesteps) for m in ms], 2, 11),
            column("digest", [c.sha256[:DIGEST_SHOWN] for c in cs], 0, DIGEST_SHOWN),
            column("step", [str(c.step) for c in cs], 1, 8, justify="right"),
            column("signer key", [c.key_id for c in cs], 3, 16),
            column(
                "trusted", [flag(c.trusted, no="no (signer revoked)", bad=False) for c in cs], 0, 19
            ),
        ],
        width,
    )


# --- whole views ---


def fields_block(rows: Sequence[tuple[str, str | Text]]) -> Group:
    """Label/value lines, labels aligned."""
    pad = max(len(label) for label, _ in rows) + 2
    return Group(
        *(
            Text(label.ljust(pad), style="bold") + (v if isinstance(v, Text) else Text(v))
            for label, v in rows
        )
    )


def job_view(
    job: JobRecord, units: Sequence[UnitRecord], ensembles: Sequence[str], now: float, width: int
) -> RenderableType:
    count = sum(s.count for s in job.shards)
    size = sum(s.size for s in job.shards)
    block = fields_block(
        [
            ("job", job.name),
            ("status", styled(job.status)),
            ("hash", job.job_hash),
            ("created", f"{time_label(job.created_at)} ({ago(job.created_at, now)} ago)"),
            ("units", f"{job.units_done}/{job.units} done, {job.units_failed} failed"),
            ("steps", f"{job.total_steps} per unit"),
            ("shards", f"{len(job.shards)} ({count} images, {fmt_bytes(size)})"),
            ("ensembles", ", ".join(ensembles) or "none yet"),
        ]
    )
    return Group(block, Text(""), units_table(units, now, width))


def worker_view(detail: WorkerDetail, now: float, width: int) -> RenderableType:
    w = detail.worker
    block = fields_block(
        [
            ("worker", w.worker_id),
            ("status", styled(w.status)),
            ("site", w.site),
            ("hostname", w.hostname),
            ("device", w.device),
            ("key id", w.key_id),
            ("public key", w.public_key.hex()),
            ("registered", f"{time_label(w.registered_at)} ({ago(w.registered_at, now)} ago)"),
            ("last seen", f"{fmt_age(detail.last_seen_age_s)} ago"),
            ("units done", str(w.units_done)),
            ("checkpoints", f"{detail.checkpoints} signed"),
            ("leased", ", ".join(f"{u.job}/{u.unit}" for u in detail.leased) or "none"),
        ]
    )
    if not detail.leased:
        return block
    return Group(block, Text(""), units_table(detail.leased, now, width))


def ensemble_view(record: EnsembleRecord, now: float, width: int) -> RenderableType:
    block = fields_block(
        [
            ("ensemble", record.name),
            ("job", f"{record.job} (hash {record.job_hash[:DIGEST_SHOWN]})"),
            ("created", f"{time_label(record.created_at)} ({ago(record.created_at, now)} ago)"),
            ("aliases", ", ".join(record.aliases) or "none"),
        ]
    )
    return Group(block, Text(""), members_table(record, width))


def revocation_line(worker_id: str, checkpoints: int, requeued: Sequence[tuple[str, int]]) -> str:
    """What `workers revoke` says: the checkpoints that are no longer trusted and exactly the
    units the coordinator put back to pending (as it reported them)."""
    signed = f"{checkpoints} checkpoint{'' if checkpoints == 1 else 's'}"
    if requeued:
        units = f"{len(requeued)} unit{'' if len(requeued) == 1 else 's'}"
        again = f"{units} back to pending to train again: " + ", ".join(
            f"{job}/{unit}" for job, unit in requeued
        )
    else:
        again = "no unit needs training again"
    return (
        f"worker {worker_id} revoked: its credential is refused, {signed} it signed no longer "
        f"trusted; {again}"
    )


def verdict_line(verdict: Verdict) -> Text:
    """ "ok" or every problem, after the checkpoint's digest, unit and step."""
    c = verdict.checkpoint
    where = f"{c.sha256[:DIGEST_SHOWN]}  {c.job} unit {c.unit} step {c.step}"
    if verdict.ok:
        return Text("ok      ", style="green") + Text(where)
    return Text("FAILED  ", style="bold red") + Text(f"{where}: " + "; ".join(verdict.problems))
