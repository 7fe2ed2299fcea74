"""The load a watching `tspace-coord status` dashboard puts on the coordinator.

    python bench/status_load.py [--window 10] [--rounds 2] [--interval 1] [--json out.json]

One in-process coordinator (SQLite catalogue in a temporary folder) holds a job of 100 units and
50 registered workers, each holding a lease with reported progress. Dashboards run as child
processes (`run_status` printing plain-text snapshots to /dev/null every interval), so this
process's CPU time (time.process_time) is the coordinator serving them plus its idle threads.
The configurations (0, 1 and 5 dashboards) are interleaved in rounds so machine drift hits all
alike; each row is the median over rounds. It also times one snapshot built in-process
(AdminService.snapshot) and one parsed and drawn at 80x24 by the client. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from coordinator.admin_service import AdminService
from coordinator.config import ADMIN_CREDENTIAL_FILE, init_dir, load_config
from coordinator.dashboard import Dashboard
from coordinator.server import Coordinator
from coordinator.state import CoordinatorState
from coordinator.status_view import StatusView
from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from tspace_core.rpc import ADMIN_HEADER, CREDENTIAL_HEADER, insecure_channel
from tspace_core.signing import generate_key, public_key_bytes

UNITS, WORKERS, STEPS = 100, 50, 300
JOB_TOML = f"""
name = "load"
[states]
count = {UNITS}
[units]
partition = "single"
[model]
preset = "tiny"
[training]
steps = {STEPS}
batch_size = 8
[data]
source = "digits"
"""
# The child reads the admin credential from stdin, so it never shows in a process listing.
DASHBOARD = """
import os, sys
from rich.console import Console
from coordinator.dashboard import run_status
credential = sys.stdin.readline().strip()
console = Console(file=open(os.devnull, "w"), width=80, height=24)
run_status(sys.argv[1], credential, once=False, as_json=False, interval=float(sys.argv[2]),
           console=console)
"""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def start_fleet(folder: Path) -> tuple[Coordinator, str]:
    """A served coordinator with the job and the workers, each holding one leased unit."""
    init_dir(folder)
    config = dataclasses.replace(load_config(folder), lease_ttl_s=24 * 3600.0)  # no expiry
    coordinator = Coordinator(CoordinatorState.open(folder, config), "127.0.0.1:0").start()
    admin_md = ((ADMIN_HEADER, (folder / ADMIN_CREDENTIAL_FILE).read_text().strip()),)
    with insecure_channel(coordinator.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        admin.CreateJob(admin_pb2.CreateJobRequest(spec_toml=JOB_TOML), metadata=admin_md)
        for i in range(WORKERS):
            token = admin.Enroll(admin_pb2.EnrollRequest(site=f"site-{i % 7}"), metadata=admin_md)
            request = worker_pb2.RegisterRequest(
                token=token.token, public_key=public_key_bytes(generate_key()), device="cpu"
            )
            md = ((CREDENTIAL_HEADER, workers.Register(request, timeout=30).credential),)
            lease = workers.AcquireUnit(worker_pb2.AcquireUnitRequest(), metadata=md, timeout=30)
            beat = worker_pb2.HeartbeatRequest(
                lease_id=lease.assignment.lease_id, step=3 * i, loss=0.05, images_per_s=500.0
            )
            workers.Heartbeat(beat, metadata=md, timeout=30)
    return coordinator, admin_md[0][1]


def child_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live child, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def measure(address: str, credential: str, n: int, args: argparse.Namespace) -> dict[str, float]:
    """CPU seconds per second of this process (and per dashboard) with `n` dashboards."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", DASHBOARD, address, str(args.interval)],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    try:
        for child in children:
            assert child.stdin is not None
            child.stdin.write(credential + "\n")
            child.stdin.close()
        time.sleep(args.warmup)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        client0 = sum(child_cpu_s(c.pid) for c in children)
        time.sleep(args.window)
        cpu1, wall1 = time.process_time(), time.perf_counter()
        client1 = sum(child_cpu_s(c.pid) for c in children)
        dead = [c for c in children if c.poll() is not None]
        if dead:
            raise SystemExit(f"a dashboard exited early: {dead[0].stderr.read()}")  # type: ignore[union-attr]
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)
    wall = wall1 - wall0
    return {
        "coordinator_cpu_s_per_s": (cpu1 - cpu0) / wall,
        "client_cpu_s_per_s_each": (client1 - client0) / wall / n if n else 0.0,
    }


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def snapshot_costs(coordinator: Coordinator, repeat: int) -> dict[str, float]:
    """Milliseconds to build one snapshot, and to parse and draw one at 80x24; its size."""
    service = AdminService(coordinator.state)
    msg = service.snapshot()
    data = msg.SerializeToString()

    def draw() -> None:
        view = StatusView.from_proto(admin_pb2.StatusSnapshot.FromString(data))
        Console(file=io.StringIO(), width=80, height=24).print(Dashboard(view))

    return {
        "snapshot_build_ms": median_ms(service.snapshot, repeat),
        "snapshot_bytes": float(len(data)),
        "client_parse_and_draw_ms": median_ms(draw, repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before measuring")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval", type=float, default=1.0, help="dashboard refresh, s")
    parser.add_argument("--dashboards", type=int, nargs="+", default=[0, 1, 5])
    parser.add_argument("--repeat", type=int, default=50, help="snapshots timed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    # A Status handler builds one more snapshot after its client hangs up, which can touch the
    # catalogue while the folder is removed; leftovers in a temporary folder do not matter.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        coordinator, credential = start_fleet(Path(tmp) / "coordinator")
        try:
            costs = snapshot_costs(coordinator, args.repeat)
            runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.dashboards}
            for _ in range(args.rounds):
                for n in args.dashboards:
                    runs[n].append(measure(coordinator.address, credential, n, args))
            time.sleep(args.interval + 0.5)  # let the last handlers see their clients gone
        finally:
            coordinator.stop(grace=0.5)
    report(args, costs, runs)


COLUMNS = (  # (key, header) of the printed table
    ("dashboards", "dashboards"),
    ("coordinator_cpu_s_per_s", "coord CPU s/s"),
    ("extra_cpu_s_per_s_per_dashboard", "extra/dashboard"),
    ("client_cpu_s_per_s_each", "client CPU s/s"),
)


def report(
    args: argparse.Namespace, costs: dict[str, float], runs: dict[int, list[dict[str, float]]]
) -> None:
    """Print the table (medians over rounds) and write the JSON; extra CPU is over 0 dashboards."""

    def median(n: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[n])

    base = median(0, "coordinator_cpu_s_per_s") if 0 in runs else float("nan")
    rows = [
        {
            "dashboards": n,
            "coordinator_cpu_s_per_s": median(n, "coordinator_cpu_s_per_s"),
            "extra_cpu_s_per_s_per_dashboard": (median(n, "coordinator_cpu_s_per_s") - base) / n
            if n
            else 0.0,
            "client_cpu_s_per_s_each": median(n, "client_cpu_s_per_s_each"),
        }
        for n in runs
    ]
    print(
        f"{UNITS} units, {WORKERS} workers, interval {args.interval} s, "
        f"window {args.window} s x {args.rounds} rounds, {os.cpu_count()} CPUs"
    )
    print("  ".join(f"{header:>15}" for _, header in COLUMNS))
    for row in rows:
        print(
            "  ".join(
                f"{row[key]:>15.4f}" if key != "dashboards" else f"{row[key]:>15}"
                for key, _ in COLUMNS
            )
        )
    for key, value in costs.items():
        print(f"{key:<26}{value:10.2f}")
    settings = {"units": UNITS, "workers": WORKERS, "cpus": os.cpu_count()}
    settings |= {"interval_s": args.interval, "window_s": args.window, "rounds": args.rounds}
    result: dict[str, Any] = {**settings, **costs, "rows": rows, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
