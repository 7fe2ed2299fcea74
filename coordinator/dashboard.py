"""The dashboard behind `tspace-coord status`: the coordinator's Status stream, drawn with rich."""

from __future__ import annotations

import json
import time
from collections.abc import Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import grpc
from rich.console import Console, ConsoleOptions, Group, JustifyMethod, RenderableType, RenderResult
from rich.live import Live
from rich.table import Table
from rich.text import Text

from coordinator.status_view import (
    RateMeter,
    StatusView,
    current_units,
    eta_s,
    images_per_s,
    leases_by_worker,
    progress,
    snapshot_to_dict,
    unit_steps,
)
from tspace_core.catalogue.records import (
    JOB_DONE,
    UNIT_DONE,
    UNIT_FAILED,
    UNIT_LEASED,
    UNIT_PENDING,
    WORKER_REVOKED,
    UnitRecord,
    WorkerRecord,
)
from tspace_core.errors import TspaceError
from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc
from tspace_core.rpc import ADMIN_HEADER, ChannelSecurity, open_channel

# A live view may stay open all day, but every call still gets a deadline.
LIVE_DEADLINE_S = 24 * 3600.0
ONCE_DEADLINE_S = 30.0
MIN_INTERVAL_S = 0.1  # the coordinator never streams faster than this
STATUS_STYLE = {UNIT_LEASED: "cyan", UNIT_DONE: "green", UNIT_FAILED: "bold red", "revoked": "red"}


# --- small formatters ---


def fmt_duration(seconds: float | None) -> str:
    """Two units at most: 42s, 3m05s, 2h07m, 3d4h; "—" when unknown."""
    if seconds is None:
        return "—"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def fmt_age(seconds: float) -> str:
    s = max(int(seconds), 0)
    for size, suffix in ((86400, "d"), (3600, "h"), (60, "m")):
        if s >= size:
            return f"{s // size}{suffix}"
    return f"{s}s"


def fmt_rate(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:.0f}"


def bar(fraction: float, width: int) -> Text:
    """A progress bar `width` cells wide; the empty part stays visible without colour."""
    done = round(min(max(fraction, 0.0), 1.0) * width)
    return Text("━" * done, style="green") + Text("─" * (width - done), style="bright_black")


def states_label(timesteps: tuple[int, ...]) -> str:
    if not timesteps:
        return ""
    if len(timesteps) == 1:
        return str(timesteps[0])
    return f"{min(timesteps)}-{max(timesteps)}"


def title(label: str, detail: str, width: int) -> Text:
    """A section's title line, ruled out to `width` so sections stand apart without blank lines."""
    text = Text(f"─ {label} ", style="bold") + Text(detail)
    text.append(" " + "─" * max(width - text.cell_len - 1, 0), style="bright_black")
    text.truncate(width, overflow="ellipsis")
    return text


def line(text: Text | str, width: int) -> Text:
    out = text.copy() if isinstance(text, Text) else Text(text)
    out.no_wrap = True
    out.truncate(width, overflow="ellipsis")
    return out


# --- tables that fit ---


@dataclass
class Column:
    """A column and its cells; `keep`: lower is dropped later when the terminal is narrow."""

    header: str
    cells: list[Text]
    keep: int
    cap: int = 16
    justify: JustifyMethod = "left"

    @property
    def width(self) -> int:
        return min(self.cap, max([len(self.header)] + [c.cell_len for c in self.cells]))


def fit_columns(columns: list[Column], width: int) -> list[Column]:
    """The columns that fit in `width` (one space between), most kept first, in display order."""
    chosen: set[int] = set()
    used = -1
    for i in sorted(range(len(columns)), key=lambda i: columns[i].keep):
        if used + 1 + columns[i].width <= width:
            chosen.add(i)
            used += 1 + columns[i].width
    return [c for i, c in enumerate(columns) if i in chosen]


def table(columns: list[Column], show_header: bool = True) -> Table:
    out = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, show_header=show_header)
    out.header_style = "bold"
    for c in columns:
        out.add_column(
            c.header, width=c.width, no_wrap=True, overflow="ellipsis", justify=c.justify
        )
    for row in zip(*(c.cells for c in columns), strict=True):
        out.add_row(*row)
    return out


def more_line(hidden: int, counts: dict[str, int], width: int) -> Text:
    detail = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    return line(Text(f"+{hidden} more ({detail})", style="italic bright_black"), width)


def count_by(values: list[str], order: tuple[str, ...]) -> dict[str, int]:
    counts = {k: 0 for k in order}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


# --- the sections ---


def pick_units(view: StatusView, units: tuple[UnitRecord, ...]) -> list[UnitRecord]:
    """Units in the order worth showing: leased, failed, recently in the news, then the rest."""
    recent = [(e.job, e.unit) for e in view.events if e.unit is not None]
    rank_recent = {key: i for i, key in reversed(list(enumerate(recent)))}

    def rank(u: UnitRecord) -> tuple[int, int]:
        if u.status == UNIT_LEASED:
            return (0, 0)
        if u.status == UNIT_FAILED:
            return (1, 0)
        if (u.job, u.unit) in rank_recent:
            return (2, rank_recent[(u.job, u.unit)])
        return (3 if u.status == UNIT_PENDING else 4, 0)

    return sorted(units, key=rank)  # stable: catalogue order within a rank


def units_section(view: StatusView, rows: int, width: int) -> list[RenderableType]:
    units = current_units(view)
    counts = count_by([u.status for u in units], (UNIT_DONE, UNIT_LEASED, UNIT_PENDING))
    summary = " · ".join(f"{n} {s}" for s, n in counts.items() if n)
    head = title("units", f"{len(units)} · {summary}", width)
    if rows <= 0 or not units:
        return [head]
    ordered = pick_units(view, units)
    shown = ordered if len(ordered) <= rows else ordered[: rows - 1]
    multi_job = len({u.job for u in units}) > 1

    def cells(fn: Any) -> list[Text]:
        return [fn(u) for u in shown]

    def checkpoint_age(u: UnitRecord) -> Text:
        """How long ago the newest checkpoint a lease would resume from was registered."""
        if u.newest_checkpoint_at is None:
            return Text("")
        age = view.time - u.newest_checkpoint_at
        return Text(fmt_age(age), style="yellow" if u.status == UNIT_LEASED and age > 600 else "")

    def styled(u: UnitRecord) -> Text:
        return Text(u.status, style=STATUS_STYLE.get(u.status, "bright_black"))

    columns = [
        Column("unit", cells(lambda u: Text(f"{u.job}/{u.unit}" if multi_job else str(u.unit))), 0),
        Column("states", cells(lambda u: Text(states_label(u.timesteps))), 6, cap=11),
        Column("status", cells(styled), 0),
        Column("worker", cells(lambda u: Text(u.worker_id or "")), 2, cap=14),
        Column("step", cells(lambda u: Text(f"{unit_steps(u)}/{u.total_steps}")), 0, 13, "right"),
        Column("loss", cells(lambda u: Text(f"{u.loss:.4f}" if u.loss else "")), 3, 7, "right"),
        Column("ckpt", cells(checkpoint_age), 3, 4, "right"),
        Column("att", cells(lambda u: Text(str(u.attempts))), 4, 3, "right"),
    ]
    bar_min, bar_max = 6, 30
    columns = fit_columns(columns, width - bar_min - 1)
    bar_width = min(bar_max, width - sum(c.width + 1 for c in columns))
    fractions = [unit_steps(u) / u.total_steps if u.total_steps else 0.0 for u in shown]
    progress_column = Column("progress", [bar(f, bar_width) for f in fractions], 1, bar_width)
    at = next(i for i, c in enumerate(columns) if c.header == "step")
    out: list[RenderableType] = [head, table([*columns[:at], progress_column, *columns[at:]])]
    if len(shown) < len(ordered):
        hidden = ordered[len(shown) :]
        order = (UNIT_LEASED, UNIT_FAILED, UNIT_DONE, UNIT_PENDING)
        out.append(more_line(len(hidden), count_by([u.status for u in hidden], order), width))
    return out


def workers_section(view: StatusView, rows: int, width: int) -> list[RenderableType]:
    leases = leases_by_worker(view)

    def state(w: WorkerRecord) -> str:
        return (
            "revoked" if w.status == WORKER_REVOKED else "busy" if w.worker_id in leases else "idle"
        )

    def rate(w: WorkerRecord) -> float:
        return images_per_s(leases.get(w.worker_id, []))

    def rank(w: WorkerRecord) -> tuple[int, float]:
        # Busy workers fastest first, idle ones most recently seen first.
        order = {"busy": 0, "idle": 1}.get(state(w), 2)
        return (order, -rate(w) if rate(w) else view.time - w.last_seen)

    workers = sorted(view.workers, key=rank)
    counts = count_by([state(w) for w in workers], ("busy", "idle", "revoked"))
    summary = " · ".join(f"{n} {s}" for s, n in counts.items() if n)
    head = title("workers", f"{len(workers)} · {summary}" if workers else "none registered", width)
    if rows <= 0 or not workers:
        return [head]
    shown = workers if len(workers) <= rows else workers[: rows - 1]

    def cells(fn: Any) -> list[Text]:
        return [fn(w) for w in shown]

    def seen(w: WorkerRecord) -> Text:
        age = view.time - w.last_seen
        return Text(fmt_age(age), style="yellow" if age > 120 else "")

    def unit_list(w: WorkerRecord) -> Text:
        return Text(",".join(str(u.unit) for u in leases.get(w.worker_id, [])))

    columns = [
        Column("worker", cells(lambda w: Text(w.worker_id)), 0, 14),
        Column("site", cells(lambda w: Text(w.site)), 1, 12),
        Column("device", cells(lambda w: Text(w.device)), 5, 16),
        Column("status", cells(lambda w: Text(state(w), STATUS_STYLE.get(state(w), ""))), 3, 7),
        Column("seen", cells(seen), 2, 4, "right"),
        Column("done", cells(lambda w: Text(str(w.units_done))), 3, 4, "right"),
        Column("img/s", cells(lambda w: Text(fmt_rate(rate(w)))), 1, 6, "right"),
        Column("units", cells(unit_list), 4, 10),
    ]
    out: list[RenderableType] = [head, table(fit_columns(columns, width))]
    if len(shown) < len(workers):
        hidden = workers[len(shown) :]
        counts = count_by([state(w) for w in hidden], ("busy", "idle", "revoked"))
        out.append(more_line(len(hidden), counts, width))
    return out


def events_section(view: StatusView, rows: int, width: int) -> list[RenderableType]:
    if rows <= 0:
        return []
    events = view.events[:rows]
    when = [Text(time.strftime("%H:%M:%S", time.localtime(e.time))) for e in events]
    kinds = Column("kind", [Text(e.kind, style="magenta") for e in events], 1, 21)
    fixed = fit_columns([Column("time", when, 0, 8), kinds], width - 11)
    message_width = width - sum(c.width + 1 for c in fixed)
    message = Column("message", [Text(e.message) for e in events], 0, message_width)
    return [title("events", "newest first", width), table([*fixed, message], show_header=False)]


def header(view: StatusView, steps_per_s: float | None, width: int, source: str) -> list[Text]:
    clock = time.strftime("%H:%M:%S", time.localtime(view.time))
    jobs = sorted(view.jobs, key=lambda j: j.status == JOB_DONE)
    summary = " · ".join(
        f"{j.name} {j.status} {j.units_done}/{j.units}"
        + (f" ({j.units_failed} failed)" if j.units_failed else "")
        for j in jobs
    )
    first = Text("tspace ", style="bold") + Text(f"{source} {clock} · ".lstrip())
    first += Text(summary or "no jobs yet: create one with `tspace-coord jobs create`")
    steps, total = progress(view)
    fraction = steps / total if total else 0.0
    figures = (
        f" {fraction:6.1%} {steps}/{total} steps · ETA {fmt_duration(eta_s(view, steps_per_s))}"
        f" · {fmt_rate(images_per_s(current_units(view)))} img/s"
    )
    second = bar(fraction, min(30, max(width - len(figures) - 1, 0))) + Text(figures)
    return [line(first, width), line(second, width)]


def plan_rows(height: int, units: int, workers: int, events: int) -> tuple[int, int, int]:
    """Rows for the units, workers and events lists ("+N more" lines included) in `height`
    lines, after the two header lines and the titles and column headers of units and workers."""
    free = height - 2 - 4
    shown_events = min(events, max(2, height // 8)) if free >= 14 else 0
    free = max(free - (shown_events + 1 if shown_events else 0), 0)
    unit_rows = min(units, max(free * 3 // 5, free - workers))
    worker_rows = min(workers, free - unit_rows)
    unit_rows = min(units, free - worker_rows)
    return unit_rows, worker_rows, shown_events


def render_dashboard(
    view: StatusView, steps_per_s: float | None, width: int, height: int, source: str = ""
) -> Group:
    """The whole screen for one snapshot in at most `height` lines of `width` cells."""
    unit_rows, worker_rows, event_rows = plan_rows(
        height, len(current_units(view)), len(view.workers), len(view.events)
    )
    return Group(
        *header(view, steps_per_s, width, source),
        *units_section(view, unit_rows, width),
        *workers_section(view, worker_rows, width),
        *events_section(view, event_rows, width),
    )


@dataclass(frozen=True)
class Dashboard:
    """A snapshot laid out when drawn, for the size the console has then."""

    view: StatusView
    steps_per_s: float | None = None
    source: str = ""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or console.size.height
        yield render_dashboard(self.view, self.steps_per_s, options.max_width, height, self.source)


# --- the stream and the command ---


def stream_error(exc: grpc.RpcError, address: str) -> TspaceError:
    """A clear message for a failed Status call."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return TspaceError(
            f"the coordinator at {address} is unreachable ({details}); check that "
            "`tspace-coord serve` is running there and that its address file is current"
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return TspaceError(
            f"the coordinator at {address} refused the status stream: {details}; "
            "use the admin credential from the coordinator's folder"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TspaceError(f"the status stream from {address} ran out of time; run it again")
    name = code.name if code is not None else "UNKNOWN"
    return TspaceError(f"the coordinator at {address} answered: {details} ({name})")


def status_stream(
    channel: grpc.Channel, address: str, credential: str, interval_s: float
) -> Generator[StatusView, None, None]:
    """Snapshots from AdminService.Status; interval_s 0 asks for one. Closing it hangs up."""
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    call = stub.Status(
        admin_pb2.StatusRequest(interval_s=interval_s),
        timeout=LIVE_DEADLINE_S if interval_s else ONCE_DEADLINE_S,
        metadata=((ADMIN_HEADER, credential),),
    )
    try:
        for msg in call:
            yield StatusView.from_proto(msg)
    except grpc.RpcError as exc:
        raise stream_error(exc, address) from None
    finally:
        call.cancel()


def show_live(console: Console, views: Iterator[StatusView], address: str) -> None:
    meter = RateMeter()
    with console.status(f"waiting for the coordinator at {address}…"):
        first = next(views, None)
    if first is None:
        raise TspaceError(f"the coordinator at {address} sent no status; run it again")
    start = Dashboard(first, meter.observe(first), address)
    # auto_refresh redraws between snapshots, so a resized terminal is laid out again.
    with Live(start, console=console, screen=True, refresh_per_second=4) as live:
        for view in views:
            live.update(Dashboard(view, meter.observe(view), address), refresh=True)
    raise TspaceError(f"the coordinator at {address} ended the status stream")


def print_plain(console: Console, views: Iterator[StatusView], address: str, once: bool) -> None:
    meter = RateMeter()
    for n, view in enumerate(views):
        if n:
            console.print()
        console.print(Dashboard(view, meter.observe(view), address))
        if once:
            return
    if once:
        raise TspaceError(f"the coordinator at {address} sent no status; run it again")
    raise TspaceError(f"the coordinator at {address} ended the status stream")


def run_status(
    address: str,
    credential: str,
    *,
    once: bool,
    as_json: bool,
    interval: float = 1.0,
    console: Console | None = None,
    security: ChannelSecurity | None = None,
) -> None:
    """Show the coordinator's status: live until ^C, or one snapshot with `once` or `as_json`.

    On a terminal the live view redraws in place; elsewhere it prints one plain-text snapshot
    per interval. `as_json` prints one snapshot as JSON. Refusals raise TspaceError.
    """
    if not interval >= MIN_INTERVAL_S:
        raise TspaceError(f"--interval is {interval}; it must be at least {MIN_INTERVAL_S} s")
    console = console or Console()
    single = once or as_json
    with (
        open_channel(address, security) as channel,
        closing(status_stream(channel, address, credential, 0.0 if single else interval)) as views,
    ):
        try:
            if as_json:
                view = next(views, None)
                if view is None:
                    raise TspaceError(f"the coordinator at {address} sent no status; run it again")
                console.out(json.dumps(snapshot_to_dict(view), indent=2), highlight=False)
            elif single or not console.is_terminal:
                print_plain(console, views, address, single)
            else:
                show_live(console, views, address)
        except KeyboardInterrupt:
            return  # ^C is how a live view is left
