"""`tspace-coord status`: the layout fits a small terminal at fleet scale, the figures follow
from the snapshot, --json and --once say what the coordinator says, failures read clearly, and
a person watching in an 80x24 tmux window sees units progress."""

from __future__ import annotations

import io
import json
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rich.console import Console

from coordinator.dashboard import Dashboard, run_status
from coordinator.status_view import RateMeter, StatusView, eta_s, progress, snapshot_to_dict
from tspace_core import serde
from tspace_core.catalogue.records import EventRecord, JobRecord, UnitRecord, WorkerRecord
from tspace_core.errors import TspaceError
from tspace_core.proto.tspace.v1 import admin_pb2, worker_pb2

if TYPE_CHECKING:
    from conftest import CheckpointMaker, Harness, WorkerClient

SQLITE = pytest.mark.parametrize("catalogue_url", ["sqlite"], indirect=True)
REPO = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000.0
TIMEOUT_S = 30.0
UNIT_ROW = re.compile(r"^(\d+) ")
MORE = re.compile(r"^\+(\d+) more \((.*?)\)?$")  # cut short with "…" when narrow


def fleet(units: int = 100, workers: int = 50, leased: int = 4, failed: int = 2) -> StatusView:
    """A snapshot: the first 40 units done, then `leased`, then `failed`, the rest pending;
    unit u leased by worker u % workers at step 10 * u; the last worker revoked."""
    fleet_workers = tuple(
        WorkerRecord(
            worker_id=f"w-{i:012x}",
            site=f"site-{i % 7}",
            public_key=b"",
            key_id=f"key{i}",
            status="revoked" if i == workers - 1 else "active",
            device="cuda:0 (NVIDIA H100 80GB HBM3)" if i % 2 else "cpu",
            hostname="",
            registered_at=0.0,
            last_seen=NOW - 3 * i,
            units_done=i % 5,
        )
        for i in range(workers)
    )

    def unit(u: int) -> UnitRecord:
        status = ["done"] * 40 + ["leased"] * leased + ["failed"] * failed
        s = status[u] if u < len(status) else "pending"
        owner = fleet_workers[u % workers].worker_id if s == "leased" else None
        is_leased = s == "leased"
        return UnitRecord(
            job="digits",
            unit=u,
            timesteps=(999 - 10 * u,),
            status=s,
            attempts=3 if s == "failed" else 1,
            total_steps=1000,
            worker_id=owner,
            step=10 * u if is_leased else 0,
            loss=0.05 if is_leased else 0.0,
            images_per_s=100.0 + u if is_leased else 0.0,
        )

    events = tuple(
        EventRecord(NOW - i, "unit_leased", f"unit {40 + i % leased} leased", "digits", 40 + i % 4)
        for i in range(20)
    )
    job = JobRecord("digits", "h" * 64, "", "active", 1000, 0.0, units=units, units_done=40)
    return StatusView(NOW, (job,), tuple(unit(u) for u in range(units)), fleet_workers, events)


def draw(view: StatusView, width: int = 80, height: int = 24, rate: float | None = None) -> str:
    console = Console(width=width, height=height, record=True, file=io.StringIO())
    console.print(Dashboard(view, rate, "127.0.0.1:50051"))
    return console.export_text()


def section(text: str, name: str) -> list[str]:
    """The lines of one section, from its title line to the next title."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"─ {name} "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("─ ")), len(lines))
    return lines[start + 1 : end]


def listed(lines: list[str], row: re.Pattern[str]) -> tuple[list[str], int, dict[str, int]]:
    """(rows matching `row`, N of the "+N more" line, its breakdown by status)."""
    rows = [line for line in lines if row.match(line)]
    more = [m for m in map(MORE.match, lines) if m]
    if not more:
        return rows, 0, {}
    parts = [p for p in more[0].group(2).split(", ") if not p.endswith("…")]
    counts = {k: int(n) for n, k in (part.split(" ") for part in parts)}
    return rows, int(more[0].group(1)), counts


# --- the layout, without a network ---


def test_100_units_and_50_workers_fit_80x24_with_what_matters_shown() -> None:
    view = fleet(leased=4, failed=2)
    text = draw(view)
    lines = text.splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 80, text
    rows, hidden, counts = listed(section(text, "units"), UNIT_ROW)
    shown = {int(r.split()[0]): r for r in rows}
    for u in view.units:
        if u.status in ("leased", "failed"):
            assert u.unit in shown and u.status in shown[u.unit], text
    assert hidden > 0 and len(rows) + hidden == 100 and sum(counts.values()) == hidden, text
    assert "410/1000" in shown[41].split(), text  # the step column reads step/total
    rows, hidden, counts = listed(section(text, "workers"), re.compile(r"^w-"))
    assert hidden > 0 and len(rows) + hidden == 50 and sum(counts.values()) == hidden, text
    busy = {f"w-{u % 50:012x}" for u in range(40, 44)}
    assert busy <= {r.split()[0] for r in rows}, "workers holding leases come first"
    assert section(text, "events"), text


@pytest.mark.parametrize(
    ("width", "height"), [(40, 12), (60, 20), (80, 24), (100, 30), (132, 43), (200, 60)]
)
def test_every_size_stays_inside_the_terminal(width: int, height: int) -> None:
    text = draw(fleet(leased=30, failed=5), width, height)
    lines = text.splitlines()
    assert len(lines) <= height and max(map(len, lines)) <= width, text
    rows, hidden, _ = listed(section(text, "units"), UNIT_ROW)
    assert len(rows) + hidden == 100 and rows, text


def test_narrow_terminals_drop_the_least_needed_columns_first() -> None:
    wide = section(draw(fleet(), 100, 24), "units")[0].split()
    narrow = section(draw(fleet(), 50, 24), "units")[0].split()
    assert {"states", "loss", "att"} <= set(wide)
    assert not {"states", "att"} & set(narrow)
    assert {"unit", "status", "step"} <= set(narrow)


def test_rate_and_eta_follow_from_successive_snapshots() -> None:
    first = fleet(leased=4, failed=2)
    later_units = tuple(
        u if u.status != "leased" else UnitRecord(**{**u.__dict__, "step": u.step + 50})
        for u in first.units
    )
    later = StatusView(NOW + 10, first.jobs, later_units, first.workers, first.events)
    meter = RateMeter()
    assert meter.observe(first) is None  # one snapshot gives no rate
    rate = meter.observe(later)
    assert rate == pytest.approx(4 * 50 / 10)
    steps, total = progress(later)
    assert (steps, total) == (40 * 1000 + sum(10 * u + 50 for u in range(40, 44)), 100 * 1000)
    failed_steps = 2 * 1000  # failed units wait for an operator: not in the ETA
    assert eta_s(later, rate) == pytest.approx((total - steps - failed_steps) / rate)
    shown = draw(later, rate=rate).splitlines()[1]
    # (100000 - 41860 - 2000) steps / 20 steps/s = 2807 s
    assert f"{steps}/{total} steps" in shown and "ETA 46m47s" in shown, shown
    expired = StatusView(NOW + 20, first.jobs, first.units, first.workers, first.events)
    assert meter.observe(expired) is None  # progress fell (a lease expired): no rate


def test_snapshot_dict_is_plain_json_with_worker_rates_summed_over_their_leases() -> None:
    view = fleet(workers=3, leased=6)
    data = json.loads(json.dumps(snapshot_to_dict(view)))
    assert set(data) == {"time", "progress", "jobs", "units", "workers", "events"}
    by_worker = {w["worker_id"]: w["images_per_s"] for w in data["workers"]}
    expected = {f"w-{i:012x}": 0.0 for i in range(3)}
    for u in range(40, 46):
        expected[f"w-{u % 3:012x}"] += 100.0 + u
    assert by_worker == pytest.approx(expected)
    assert data["workers"][2]["last_seen_age_s"] == pytest.approx(6.0)


# --- against a coordinator ---


def admin_credential(coord: Harness) -> str:
    return coord.admin_metadata[0][1]


def address(coord: Harness) -> str:
    assert coord.coordinator is not None
    return coord.coordinator.address


def leased_with_progress(coord: Harness, step: int = 3) -> tuple[WorkerClient, serde.Assignment]:
    coord.create_job()
    worker = coord.register()
    a = coord.assignment(worker)
    request = worker_pb2.HeartbeatRequest(
        lease_id=a.lease_id, step=step, loss=0.25, images_per_s=123.0
    )
    coord.worker.Heartbeat(request, metadata=worker.metadata, timeout=TIMEOUT_S)
    return worker, a


@SQLITE
def test_json_snapshot_says_what_the_catalogue_holds(coord: Harness) -> None:
    worker, a = leased_with_progress(coord)
    out = io.StringIO()
    run_status(
        address(coord),
        admin_credential(coord),
        once=False,
        as_json=True,
        console=Console(file=out),
    )
    data = json.loads(out.getvalue())
    assert set(data["jobs"][0]) == {
        "name",
        "job_hash",
        "status",
        "units",
        "units_done",
        "units_failed",
        "total_steps",
        "created_at",
    }
    assert set(data["units"][0]) == {
        *("job", "unit", "timesteps", "status", "attempts", "total_steps", "last_error"),
        *("worker_id", "step", "loss", "images_per_s", "newest_step", "newest_checkpoint_at"),
    }
    catalogue = {u.unit: u for u in coord.catalogue.units()}
    assert [(u["unit"], u["status"], u["worker_id"], u["step"]) for u in data["units"]] == [
        (u.unit, u.status, u.worker_id, u.step) for u in catalogue.values()
    ]
    assert catalogue[a.unit].step == 3 and catalogue[a.unit].worker_id == worker.worker_id
    (w,) = data["workers"]
    assert (w["worker_id"], w["images_per_s"], w["device"]) == (worker.worker_id, 123.0, "cpu")
    assert 0 <= w["last_seen_age_s"] < 30
    assert {"job_created", "worker_registered", "unit_leased"} <= {
        e["kind"] for e in data["events"]
    }
    assert data["progress"]["steps"] == 3 and data["progress"]["total_steps"] == 3 * 4


@SQLITE
def test_once_prints_one_plain_snapshot(coord: Harness) -> None:
    worker, a = leased_with_progress(coord)
    out = io.StringIO()
    console = Console(file=out, width=80, height=24)
    run_status(
        address(coord),
        admin_credential(coord),
        once=True,
        as_json=False,
        console=console,
    )
    text = out.getvalue()
    assert "\x1b" not in text, "plain output must carry no control codes"
    lines = text.splitlines()
    assert sum(line.startswith("tspace ") for line in lines) == 1 and len(lines) <= 24, text
    assert "tiny active 0/3" in lines[0]
    row = next(line for line in lines if line.startswith(f"{a.unit} "))
    assert "leased" in row and worker.worker_id in row and "3/4" in row and "0.2500" in row, text
    assert any(line.startswith(worker.worker_id) and "busy" in line for line in lines), text


@SQLITE
def test_units_show_their_newest_checkpoint(coord: Harness, checkpoints: CheckpointMaker) -> None:
    worker, a = leased_with_progress(coord, step=3)
    coord.upload_file(worker, a, checkpoints.path(a, 2), 2)
    out = io.StringIO()
    run_status(
        address(coord),
        admin_credential(coord),
        once=True,
        as_json=False,
        console=Console(file=out, width=80, height=24),
    )
    header = next(line for line in out.getvalue().splitlines() if line.startswith("unit "))
    assert re.search(r"loss\s+ckpt\s+att$", header), header
    row = next(line for line in out.getvalue().splitlines() if line.startswith(f"{a.unit} "))
    assert re.search(r"0\.2500\s+\d+s\s+1$", row), row
    # Paused, the unit is pending again and counts the steps of the checkpoint it resumes from.
    request = admin_pb2.ChangeJobRequest(name="tiny", action="pause")
    coord.admin.ChangeJob(request, metadata=coord.admin_metadata, timeout=TIMEOUT_S)
    out = io.StringIO()
    run_status(
        address(coord), admin_credential(coord), once=False, as_json=True, console=Console(file=out)
    )
    data = json.loads(out.getvalue())
    unit = next(u for u in data["units"] if u["unit"] == a.unit)
    assert (unit["status"], unit["newest_step"], unit["worker_id"]) == ("pending", 2, None)
    assert data["progress"]["steps"] == 2
    assert data["jobs"][0]["status"] == "paused"


class Stop(Exception):
    pass


class Snapshots(io.StringIO):
    """A console file that notes when each snapshot's header arrives and stops after `n`."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.times: list[float] = []

    def write(self, s: str) -> int:
        self.times += [time.monotonic()] * len(re.findall(r"(?m)^tspace ", s))
        written = super().write(s)
        if len(self.times) >= self.n:
            raise Stop
        return written


@SQLITE
def test_without_a_terminal_it_prints_a_snapshot_per_interval(coord: Harness) -> None:
    leased_with_progress(coord)
    out = Snapshots(3)
    with pytest.raises(Stop):
        run_status(
            address(coord),
            admin_credential(coord),
            once=False,
            as_json=False,
            interval=0.3,
            console=Console(file=out, width=80, height=24),
        )
    gaps = [b - a for a, b in zip(out.times, out.times[1:], strict=False)]
    assert len(out.times) == 3 and all(0.2 < g < 2.0 for g in gaps), gaps
    assert "\x1b" not in out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_coordinator_is_named_clearly() -> None:
    target = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TspaceError, match=rf"coordinator at {target} is unreachable"):
        run_status(target, "secret", once=True, as_json=False, console=Console(file=io.StringIO()))
    assert time.monotonic() - started < 10


@SQLITE
def test_a_wrong_credential_is_refused_clearly(coord: Harness) -> None:
    with pytest.raises(TspaceError, match=r"refused the status stream.*admin credential"):
        run_status(
            address(coord),
            "not-the-credential",
            once=True,
            as_json=False,
            console=Console(file=io.StringIO()),
        )


def test_a_too_short_interval_is_refused_before_any_call() -> None:
    with pytest.raises(TspaceError, match="--interval"):
        run_status("127.0.0.1:1", "x", once=False, as_json=False, interval=0.0)


# --- a person watching in tmux ---

TMUX = shutil.which("tmux")
WATCHER = """
import sys
from pathlib import Path
from coordinator.dashboard import run_status
credential = (Path(sys.argv[2]) / "admin.credential").read_text().strip()
run_status(sys.argv[1], credential, once=False, as_json=False, interval=0.5)
print("dashboard closed")
"""
WATCHED_JOB = """
name = "watched"
[states]
count = 6
[units]
partition = "single"
[model]
preset = "tiny"
[training]
steps = 500
batch_size = 8
[data]
source = "digits"
"""


@pytest.fixture
def tmux() -> Iterator[Callable[..., str]]:
    """Runs tmux commands on a private server, killed in teardown."""
    if TMUX is None:
        pytest.skip("tmux is not installed")
    server = f"tspace-dashboard-{secrets.token_hex(4)}"

    def run(*args: str) -> str:
        done = subprocess.run(
            [TMUX, "-L", server, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout

    try:
        yield run
    finally:
        subprocess.run([TMUX, "-L", server, "kill-server"], capture_output=True, timeout=10)


def steps_shown(pane: str) -> dict[int, int]:
    found = {}
    for line in pane.splitlines():
        m = re.match(r"^(\d+) .*leased.* (\d+)/500 ", line)
        if m:
            found[int(m.group(1))] = int(m.group(2))
    return found


@SQLITE
def test_a_person_in_an_80x24_tmux_window_sees_units_progress(
    coord: Harness, tmux: Callable[..., str], tmp_path: Path
) -> None:
    coord.admin.CreateJob(
        admin_pb2.CreateJobRequest(spec_toml=WATCHED_JOB),
        metadata=coord.admin_metadata,
        timeout=TIMEOUT_S,
    )
    workers = [coord.register(f"site-{i}") for i in range(3)]
    leases = {w.worker_id: coord.assignment(w) for w in workers}
    step = 0

    def beat() -> None:
        for w in workers:
            request = worker_pb2.HeartbeatRequest(
                lease_id=leases[w.worker_id].lease_id, step=step, loss=0.1, images_per_s=250.0
            )
            coord.worker.Heartbeat(request, metadata=w.metadata, timeout=TIMEOUT_S)

    script = tmp_path / "watch.py"
    script.write_text(WATCHER)
    command = " ".join(
        map(shlex.quote, [sys.executable, str(script), address(coord), str(coord.folder)])
    )
    # The sleep keeps the pane open, so a crash leaves its traceback to be captured.
    tmux(
        "new-session",
        "-d",
        "-s",
        "watch",
        "-x",
        "80",
        "-y",
        "24",
        "-c",
        str(REPO),
        f"{command}; sleep 60",
    )

    def capture() -> str:
        return tmux("capture-pane", "-p", "-t", "watch")

    deadline = time.monotonic() + 20
    while len(steps_shown(pane := capture())) < 3:
        assert time.monotonic() < deadline, f"no dashboard in the pane:\n{pane}"
        step += 5
        beat()
        time.sleep(0.2)
    first = capture()
    for _ in range(12):  # ~2.5 s of training progress
        step += 10
        beat()
        time.sleep(0.2)
    time.sleep(0.8)  # one refresh interval and a little more
    second = capture()
    lines = second.splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 80, second
    before, after = steps_shown(first), steps_shown(second)
    assert set(before) == set(after) == {a.unit for a in leases.values()}, second
    assert all(after[u] > before[u] for u in after), f"{first}\n---\n{second}"
    for w in workers:
        assert any(line.startswith(w.worker_id) for line in lines), second
    print(second)  # the screen a person saw; shown with pytest -s
    tmux("send-keys", "-t", "watch", "C-c")  # how a person leaves it
    deadline = time.monotonic() + 10
    while "dashboard closed" not in (pane := capture()):
        assert time.monotonic() < deadline, f"^C did not close the dashboard:\n{pane}"
        time.sleep(0.1)
    assert "Traceback" not in pane, pane
