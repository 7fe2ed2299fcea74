"""Control-plane throughput: heartbeats/s and AcquireUnit latency with many simulated workers.

    python bench/control_plane.py [--workers 10 100 500] [--catalogues sqlite postgresql]
        [--window 5] [--rounds 3] [--procs 2] [--profile DIR] [--json out.json]

For each catalogue (SQLite file, or a fresh PostgreSQL database on TSPACE_TEST_POSTGRES_URL or
--postgres-url, dropped after) and each fleet size N, one coordinator runs as its own process
(`python -m coordinator init`, then `serve` over TLS on 127.0.0.1) with a job of min(2N, 1000)
single-state tiny units, lease TTL of an hour and max_attempts raised so nothing expires or
fails. N workers are enrolled and registered with their own Ed25519 keys (the functions of
tests/reliability/soak.py) and each leases one unit. Then, per configuration:

- heartbeat: the N workers heartbeat their leases as fast as they can (closed loop, one thread
  per worker, spread over --procs client processes) for --window seconds after --warmup;
- acquire: each worker gives its unit back (FailUnit) and leases again (AcquireUnit, timed),
  in a closed loop, the same way.

Latencies are client-side (call to answer) for calls started in the window. Coordinator and
client CPU seconds per second come from /proc. Configurations are interleaved in rounds (the
order reversed every other round) and each figure is the median over rounds. Afterwards each
catalogue's transactions of one heartbeat (credential lookup, last_seen write, lease update)
are timed one at a time from this process, next to one fsync. --profile DIR adds
one unmeasured round with `py-spy record --nonblocking --gil` attached to each coordinator, writing
collapsed stacks to DIR. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from coordinator.config import hash_secret
from tspace_core.catalogue import Beat, Catalogue
from tspace_core.proto.tspace.v1 import worker_pb2, worker_pb2_grpc
from tspace_core.rpc import CREDENTIAL_HEADER, ChannelSecurity, open_channel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reliability"))
import soak

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LEASE_TTL_S = 3600.0  # nothing expires during a run
TIMEOUT_S = 30.0
MODES = ("heartbeat", "acquire", "paced")


# --- the client processes (run as `control_plane.py --client`, spec as JSON on stdin) ---


def heartbeat_loop(stub: Any, md: Any, lease_id: str, t0: float, t1: float) -> dict[str, Any]:
    """Heartbeat one lease back to back until t1; latencies of calls started in [t0, t1]."""
    latencies: list[float] = []
    done, step, errors = 0, 0, Counter[str]()
    while (start := time.monotonic()) < t1:
        step += 1
        beat = worker_pb2.HeartbeatRequest(
            lease_id=lease_id, step=step, loss=0.1, images_per_s=100.0
        )
        try:
            answer = stub.Heartbeat(beat, metadata=md, timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            errors[f"Heartbeat {err.code().name if isinstance(err, grpc.Call) else '?'}"] += 1
            continue
        end = time.monotonic()
        if answer.cancel:
            errors["Heartbeat CANCEL"] += 1
        if start >= t0:
            latencies.append(end - start)
        done += t0 <= end <= t1
    return {"latencies": latencies, "done": done, "errors": errors, "lease": lease_id}


def acquire_loop(stub: Any, md: Any, lease_id: str, t0: float, t1: float) -> dict[str, Any]:
    """Give the unit back and lease again until t1; AcquireUnit latencies started in [t0, t1].
    A cycle under way at t1 is finished, so the worker ends holding a lease."""
    latencies: list[float] = []
    done, errors = 0, Counter[str]()
    lease: str | None = lease_id
    while time.monotonic() < t1 or lease is None:
        try:
            if lease is not None:
                request = worker_pb2.FailUnitRequest(lease_id=lease, error="bench: given back")
                stub.FailUnit(request, metadata=md, timeout=TIMEOUT_S)
                lease = None
            start = time.monotonic()
            answer = stub.AcquireUnit(worker_pb2.AcquireUnitRequest(), metadata=md, timeout=60)
        except grpc.RpcError as err:
            errors[f"{err.code().name if isinstance(err, grpc.Call) else '?'}"] += 1
            time.sleep(0.05)
            continue
        end = time.monotonic()
        if answer.WhichOneof("result") == "assignment":
            lease = answer.assignment.lease_id
        else:
            errors["AcquireUnit no_work"] += 1
        if start >= t0 and start <= t1:
            latencies.append(end - start)
        done += t0 <= end <= t1
    return {"latencies": latencies, "done": done, "errors": errors, "lease": lease}


def paced_loop(
    stub: Any,
    md: Any,
    lease_id: str,
    t0: float,
    t1: float,
    beat_every: float,
    acquire_every: float,
    seed: int,
) -> dict[str, Any]:
    """A worker at a steady pace: a heartbeat every `beat_every` s, and, at Poisson times
    `acquire_every` s apart on average, its unit given back and a new one leased (AcquireUnit
    timed). Acquires are offered at a fixed rate whatever the answers take (an open loop), so
    their latency is that of a coordinator under this load, not of a queue of waiting
    workers."""
    rng = random.Random(seed)
    latencies: list[float] = []
    done, errors = 0, Counter[str]()
    lease: str | None = lease_id
    now = time.monotonic()
    next_beat = now + rng.uniform(0, beat_every)
    next_acquire = now + rng.expovariate(1 / acquire_every)
    step = 0
    while True:
        if time.monotonic() >= t1 and lease is not None:
            break
        due = min(next_beat, next_acquire)
        time.sleep(max(0.0, due - time.monotonic()))
        try:
            if lease is not None and next_beat <= next_acquire:
                next_beat += beat_every
                step += 1
                beat = worker_pb2.HeartbeatRequest(lease_id=lease, step=step, loss=0.1)
                stub.Heartbeat(beat, metadata=md, timeout=TIMEOUT_S)
                continue
            next_acquire += rng.expovariate(1 / acquire_every)
            if lease is not None:
                request = worker_pb2.FailUnitRequest(lease_id=lease, error="bench: given back")
                stub.FailUnit(request, metadata=md, timeout=TIMEOUT_S)
                lease = None
            start = time.monotonic()
            answer = stub.AcquireUnit(worker_pb2.AcquireUnitRequest(), metadata=md, timeout=60)
        except grpc.RpcError as err:
            errors[f"{err.code().name if isinstance(err, grpc.Call) else '?'}"] += 1
            continue
        end = time.monotonic()
        if answer.WhichOneof("result") == "assignment":
            lease = answer.assignment.lease_id
        else:
            errors["AcquireUnit no_work"] += 1
        if t0 <= start <= t1:
            latencies.append(end - start)
        done += t0 <= end <= t1
    return {"latencies": latencies, "done": done, "errors": errors, "lease": lease}


def client_main() -> None:
    """One client process: connect, say "ready", wait for "T0 T1", run, print JSON results."""
    spec = json.loads(sys.stdin.readline())
    security = ChannelSecurity(Path(spec["ca"]).read_bytes())
    workers = spec["workers"]  # [credential, lease_id] pairs
    channels = [
        open_channel(spec["address"], security)
        for _ in range(max(1, min(spec["channels"], len(workers))))
    ]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
    stubs = [worker_pb2_grpc.WorkerServiceStub(c) for c in channels]
    loops: dict[str, Any] = {"heartbeat": heartbeat_loop, "acquire": acquire_loop}
    loops["paced"] = functools.partial(
        paced_loop, beat_every=spec["beat_every"], acquire_every=spec["acquire_every"]
    )
    loop = loops[spec["mode"]]
    print("ready", flush=True)
    t0, t1 = map(float, sys.stdin.readline().split())
    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        futures = [
            pool.submit(
                loop,
                stubs[i % len(stubs)],
                ((CREDENTIAL_HEADER, cred),),
                lease,
                t0,
                t1,
                **({"seed": seed} if spec["mode"] == "paced" else {}),
            )
            for i, (cred, lease, seed) in enumerate(workers)
        ]
        results = [f.result() for f in futures]
    for channel in channels:
        channel.close()
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    out = {
        "latencies": [x for r in results for x in r["latencies"]],
        "done": sum(r["done"] for r in results),
        "errors": dict(errors),
        "leases": [r["lease"] for r in results],
    }
    print(json.dumps(out), flush=True)


# --- the coordinators ---


@dataclass
class Fleet:
    """One coordinator process and its registered workers, each holding a lease."""

    catalogue: str
    workers: int
    process: subprocess.Popen[bytes]
    folder: Path
    url: str
    address: str
    ca: Path
    credentials: list[str]
    leases: list[str]
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)  # by mode and kind, all rounds


def start_fleet(stack: contextlib.ExitStack, catalogue: str, n: int, args: Any) -> Fleet:
    """A served coordinator with n registered workers, each holding one leased unit."""
    settings = soak.Settings(
        workers=n, catalogue=catalogue, postgres_url=args.postgres_url, lease_ttl_s=LEASE_TTL_S
    )
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tspace-cp-")))
    url = stack.enter_context(soak.catalogue_url(settings, folder))
    process, address = soak.start_coordinator(folder, url, settings)
    stack.callback(soak.stop_coordinator, process)
    coord = folder / "coordinator"
    ca = coord / "tls" / "ca.crt"
    channels = [open_channel(address, ChannelSecurity(ca.read_bytes())) for _ in range(4)]
    tally = soak.Tally()
    admin = (coord / "admin.credential").read_text().strip()
    fleet = soak.enrol_fleet(channels, admin, settings, tally)
    if tally.errors or len(fleet) != n:
        raise SystemExit(f"enrolment failed: {dict(tally.errors)}")

    def lease(worker: soak.SimWorker) -> str:
        answer = worker.stub.AcquireUnit(
            worker_pb2.AcquireUnitRequest(), metadata=worker.metadata, timeout=TIMEOUT_S
        )
        return answer.assignment.lease_id

    with ThreadPoolExecutor(max_workers=8) as pool:
        leases = list(pool.map(lease, fleet))
    for channel in channels:
        channel.close()
    if not all(leases):
        raise SystemExit("a worker got no unit at the start")
    credentials = [w.credential for w in fleet]
    return Fleet(catalogue, n, process, folder, url, address, ca, credentials, leases)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def start_clients(fleet: Fleet, mode: str, args: Any) -> list[subprocess.Popen[str]]:
    """--procs client processes (fewer for a small fleet), each with a slice of the workers."""
    procs = max(1, min(args.procs, fleet.workers))
    triples = list(zip(fleet.credentials, fleet.leases, range(fleet.workers), strict=True))
    children = []
    for k in range(procs):
        spec = {
            "address": fleet.address,
            "ca": str(fleet.ca),
            "mode": mode,
            "channels": args.channels,
            "workers": triples[k::procs],
            "beat_every": args.beat_every,
            "acquire_every": fleet.workers / args.acquire_rate,
        }
        child = subprocess.Popen(
            [sys.executable, __file__, "--client"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(spec) + "\n")
        child.stdin.flush()
        children.append(child)
    for child in children:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise SystemExit(f"a {mode} client failed to start")
    return children


def measure(fleet: Fleet, mode: str, args: Any, profile: Path | None = None) -> dict[str, float]:
    """One window of `mode` against `fleet`; its figures (rates per second, times in ms)."""
    children = start_clients(fleet, mode, args)
    t0 = time.monotonic() + args.warmup
    t1 = t0 + args.window
    for child in children:
        assert child.stdin is not None
        child.stdin.write(f"{t0} {t1}\n")
        child.stdin.flush()
    spy = None
    time.sleep(max(0.0, t0 - time.monotonic()))
    if profile is not None:
        out = profile / f"{fleet.catalogue}-{fleet.workers}-{mode}.txt"
        command = [args.py_spy, "record", "--nonblocking", "--gil", "--format", "raw", "-r", "200"]
        command += ["-d", str(int(args.window)), "-o", str(out), "--pid", str(fleet.process.pid)]
        spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    coord0, client0 = cpu_s(fleet.process.pid), sum(cpu_s(c.pid) for c in children)
    time.sleep(max(0.0, t1 - time.monotonic()))
    coord1, client1 = cpu_s(fleet.process.pid), sum(cpu_s(c.pid) for c in children)
    wall = args.window
    outs = []
    for child in children:
        stdout, _ = child.communicate(timeout=120)
        if child.returncode != 0:
            raise SystemExit(f"a {mode} client exited with {child.returncode}")
        outs.append(json.loads(stdout))
    if spy is not None:
        spy.wait(timeout=60)
    fleet.leases = [None] * fleet.workers  # type: ignore[list-item]
    procs = len(children)
    for k, out in enumerate(outs):
        fleet.leases[k::procs] = out["leases"]
    if not all(fleet.leases):
        raise SystemExit(f"a worker ended the {mode} window without a lease")
    latencies = [x for out in outs for x in out["latencies"]]
    errors = sum(n for out in outs for n in out["errors"].values())
    for out in outs:
        fleet.errors.update({f"{mode}: {kind}": n for kind, n in out["errors"].items()})
    return {
        "per_s": sum(out["done"] for out in outs) / wall,
        "ms_p50": soak.percentile(latencies, 50),
        "ms_p99": soak.percentile(latencies, 99),
        "calls": float(len(latencies)),
        "errors": float(errors),
        "coordinator_cpu_s_per_s": (coord1 - coord0) / wall,
        "client_cpu_s_per_s": (client1 - client0) / wall,
    }


def step_costs(fleet: Fleet, repeat: int) -> dict[str, list[float]]:
    """[median wall ms, mean CPU ms] of each catalogue transaction a heartbeat makes (the auth
    interceptor's credential lookup and last_seen write, then the handler's), called one at a
    time from this process while the coordinator idles; and of one fsync of a 4 KiB write in
    the coordinator's folder (what a durable commit waits for)."""
    catalogue = Catalogue(fleet.url)
    credential_hash = hash_secret(fleet.credentials[0])
    worker = catalogue.worker_by_credential(credential_hash)
    assert worker is not None
    lease, worker_id = fleet.leases[0], worker.worker_id
    fd = os.open(fleet.folder / "fsync.probe", os.O_WRONLY | os.O_CREAT)

    def fsync() -> None:
        os.write(fd, b"x" * 4096)
        os.fsync(fd)

    steps = {
        "worker_by_credential (read)": lambda: catalogue.worker_by_credential(credential_hash),
        "touch_worker (write)": lambda: catalogue.touch_worker(worker_id, time.time()),
        "beat (write, one per transaction)": lambda: catalogue.beat_many(
            [Beat(lease, worker_id, time.time(), LEASE_TTL_S, 1, 0.1, 1.0)]
        ),
        "32 beats in one transaction, per beat": lambda: catalogue.beat_many(
            [Beat(lease, worker_id, time.time(), LEASE_TTL_S, 1, 0.1, 1.0)] * 32
        ),
        "fsync 4 KiB": fsync,
    }
    costs = {}
    try:
        for name, step in steps.items():
            times, cpu0 = [], time.process_time()
            for _ in range(repeat):
                started = time.perf_counter()
                step()
                times.append(time.perf_counter() - started)
            cpu = (time.process_time() - cpu0) / repeat
            per = 32 if name.startswith("32 beats") else 1
            costs[name] = [1000 * statistics.median(times) / per, 1000 * cpu / per]
    finally:
        os.close(fd)
        catalogue.close()
    return costs


# --- the run and the report ---


def run(args: argparse.Namespace, costs: dict[str, Any]) -> list[Fleet]:
    """Start the fleets, measure them in rounds, time the steps; fills `costs`."""
    with contextlib.ExitStack() as stack:
        fleets = []
        for catalogue in args.catalogues:
            for n in args.workers:
                started = time.monotonic()
                fleets.append(start_fleet(stack, catalogue, n, args))
                print(f"{catalogue} N={n}: ready in {time.monotonic() - started:.1f} s", flush=True)
        for fleet in fleets:
            fleet.runs = {mode: [] for mode in MODES}
        for r in range(args.rounds):
            for fleet in fleets if r % 2 == 0 else fleets[::-1]:
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    figures = measure(fleet, mode, args)
                    fleet.runs[mode].append(figures)
                    print(
                        f"round {r + 1} {fleet.catalogue} N={fleet.workers} {mode}: "
                        f"{figures['per_s']:.0f}/s p50 {figures['ms_p50']:.1f} ms "
                        f"p99 {figures['ms_p99']:.1f} ms errors {figures['errors']:.0f}",
                        flush=True,
                    )
        for fleet in fleets:
            if fleet.workers == min(args.workers):
                costs[fleet.catalogue] = step_costs(fleet, args.repeat)
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            for fleet in fleets:
                for mode in MODES:
                    measure(fleet, mode, args, profile=args.profile)
    return fleets


def rows(fleets: list[Fleet]) -> list[dict[str, Any]]:
    """Medians over rounds, one row per (catalogue, N)."""

    def median(fleet: Fleet, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in fleet.runs[mode])

    return [
        {
            "catalogue": f.catalogue,
            "workers": f.workers,
            "heartbeats_per_s": median(f, "heartbeat", "per_s"),
            "heartbeat_ms_p50": median(f, "heartbeat", "ms_p50"),
            "heartbeat_ms_p99": median(f, "heartbeat", "ms_p99"),
            "heartbeat_coord_cpu": median(f, "heartbeat", "coordinator_cpu_s_per_s"),
            "heartbeat_client_cpu": median(f, "heartbeat", "client_cpu_s_per_s"),
            "acquires_per_s": median(f, "acquire", "per_s"),
            "acquire_ms_p50": median(f, "acquire", "ms_p50"),
            "acquire_ms_p99": median(f, "acquire", "ms_p99"),
            "acquire_coord_cpu": median(f, "acquire", "coordinator_cpu_s_per_s"),
            "acquire_client_cpu": median(f, "acquire", "client_cpu_s_per_s"),
            "paced_acquires_per_s": median(f, "paced", "per_s"),
            "paced_acquire_ms_p50": median(f, "paced", "ms_p50"),
            "paced_acquire_ms_p99": median(f, "paced", "ms_p99"),
            "paced_coord_cpu": median(f, "paced", "coordinator_cpu_s_per_s"),
            "errors": sum(r["errors"] for m in MODES for r in f.runs[m]),
        }
        for f in fleets
    ]


COLUMNS = (  # (key, header, format)
    ("catalogue", "catalogue", "{:>10}"),
    ("workers", "N", "{:>4}"),
    ("heartbeats_per_s", "beats/s", "{:>8.0f}"),
    ("heartbeat_ms_p50", "beat p50", "{:>8.1f}"),
    ("heartbeat_ms_p99", "beat p99", "{:>8.1f}"),
    ("heartbeat_coord_cpu", "coord CPU", "{:>9.2f}"),
    ("heartbeat_client_cpu", "clnt CPU", "{:>8.2f}"),
    ("acquires_per_s", "acq/s", "{:>6.0f}"),
    ("acquire_ms_p50", "acq p50", "{:>8.1f}"),
    ("acquire_ms_p99", "acq p99", "{:>8.1f}"),
    ("acquire_coord_cpu", "coord CPU", "{:>9.2f}"),
    ("acquire_client_cpu", "clnt CPU", "{:>8.2f}"),
    ("paced_acquires_per_s", "paced acq/s", "{:>11.0f}"),
    ("paced_acquire_ms_p50", "paced p50", "{:>9.1f}"),
    ("paced_acquire_ms_p99", "paced p99", "{:>9.1f}"),
    ("paced_coord_cpu", "coord CPU", "{:>9.2f}"),
    ("errors", "errors", "{:>6.0f}"),
)


def report(args: argparse.Namespace, fleets: list[Fleet], costs: dict[str, Any]) -> None:
    table = rows(fleets)
    print(
        f"window {args.window} s x {args.rounds} rounds, {args.procs} client processes, "
        f"{os.cpu_count()} CPUs; times in ms, CPU in s/s (coordinator, all clients)"
    )
    print(
        " ".join(
            fmt.replace(".0f", "").replace(".1f", "").replace(".2f", "").format(h)
            for _, h, fmt in COLUMNS
        )
    )
    for row in table:
        print(" ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS))
    for f in fleets:
        for kind, n in sorted(f.errors.items()):
            print(f"  errors {f.catalogue} N={f.workers} {kind}: {n}")
    for catalogue, steps in costs.items():
        print(f"{catalogue}: one call at a time, median wall ms / mean CPU ms")
        for name, (wall, cpu) in steps.items():
            print(f"  {name:<30}{wall:8.3f}{cpu:8.3f}")
    sqlite = {r["workers"]: r for r in table if r["catalogue"] == "sqlite"}
    if sqlite:
        best = max(r["heartbeats_per_s"] for r in sqlite.values())
        print(
            f"target >= 2000 heartbeats/s on SQLite: best {best:.0f}/s, "
            f"{'met' if best >= 2000 else 'MISSED'}"
        )
    for r in table:
        if r["workers"] == 100:
            ok = r["paced_acquire_ms_p99"] < 50
            print(
                f"target p99 acquire < 50 ms at 100 workers ({r['catalogue']}; paced, "
                f"{args.acquire_rate:g} acquires/s offered, a beat per worker every "
                f"{args.beat_every:g} s): {r['paced_acquire_ms_p99']:.1f} ms, "
                f"{'met' if ok else 'MISSED'}"
            )
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        settings.pop("postgres_url", None)  # may hold a password
        runs = [
            {"catalogue": f.catalogue, "workers": f.workers, "errors": f.errors, **f.runs}
            for f in fleets
        ]
        args.json.write_text(
            json.dumps(
                {"settings": settings, "rows": table, "costs": costs, "runs": runs}, indent=2
            )
        )


def main() -> None:
    if sys.argv[1:] == ["--client"]:
        client_main()
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument(
        "--catalogues",
        nargs="+",
        choices=["sqlite", "postgresql"],
        default=["sqlite", "postgresql"],
    )
    parser.add_argument("--postgres-url", default=soak.PG_ADMIN_URL)
    parser.add_argument("--window", type=float, default=5.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--channels", type=int, default=8, help="channels per client process")
    parser.add_argument("--repeat", type=int, default=200, help="calls per step timed")
    parser.add_argument(
        "--acquire-rate", type=float, default=20.0, help="acquires/s offered in the paced mode"
    )
    parser.add_argument(
        "--beat-every", type=float, default=1.0, help="s between a worker's beats when paced"
    )
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output folder")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if any(not 1 <= n <= soak.MAX_UNITS for n in args.workers):
        parser.error(f"--workers must be in 1..{soak.MAX_UNITS}")
    costs: dict[str, Any] = {}
    fleets = run(args, costs)
    report(args, fleets, costs)


if __name__ == "__main__":
    main()
