"""A soak of the coordinator: many light simulated workers registering, leasing and heartbeating.

    python tests/reliability/soak.py --workers 200 --minutes 10 --catalogue sqlite [--json out.json]
    python tests/reliability/soak.py --workers 200 --minutes 10 --catalogue postgresql

The coordinator runs as its own process (`python -m coordinator init`, then `serve` over TLS on
127.0.0.1), so its resident memory (VmRSS, sampled every second) is its alone. A PostgreSQL
catalogue is a fresh database on TSPACE_TEST_POSTGRES_URL (or --postgres-url), dropped after.
One job of single-state tiny units is created, WORKERS join tokens are enrolled and as many
workers registered, each with its own Ed25519 key. Each simulated worker (a thread; no training)
then loops: AcquireUnit, heartbeat the lease every lease_ttl_s / 3 as tspace-worker does, and
after a random hold either give the unit back with FailUnit or drop it silently (the reaper
expires it), then acquire again, so leasing goes on all through the run. Start phases are
spread over one heartbeat interval so the load is smooth.

Latencies are client-side (call to answer), over the whole run, warm-up included. Any RPC
error, any heartbeat answered "cancel" (a live lease lost) and any traceback in the
coordinator's log is an error. Memory growth compares the RSS at the end of the warm-up (the
first --warmup fraction of the run) with the largest and the last RSS after it. The exit
status is 1 when there were errors or the growth exceeded --max-growth percent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
from sqlalchemy import make_url

from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from tspace_core.rpc import ADMIN_HEADER, CREDENTIAL_HEADER, ChannelSecurity, open_channel
from tspace_core.signing import generate_key, public_key_bytes

PG_ADMIN_URL = os.environ.get(
    "TSPACE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
TIMEOUT_S = 30.0  # the deadline of every call
START_TIMEOUT_S = 120.0
# Enough attempts that churn never fails a unit: the soak is about the coordinator, not policy.
MAX_ATTEMPTS = 1_000_000
MAX_UNITS = 1000  # a job's states.count is at most the schedule's T, 1000 by default
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Settings:
    """What one soak run does; durations in seconds."""

    workers: int = 200
    duration_s: float = 600.0
    catalogue: str = "sqlite"  # or "postgresql"
    postgres_url: str = PG_ADMIN_URL
    units: int = 0  # 0: twice the workers, so dropped leases awaiting expiry never starve anyone
    lease_ttl_s: float = 30.0
    hold_beats: tuple[int, int] = (3, 15)  # a lease is held this many heartbeats (uniform)
    fail_fraction: float = 0.5  # of ended holds given back with FailUnit; the rest are dropped
    warmup: float = 0.25
    channels: int = 8
    tls: bool = True
    seed: int = 0

    @property
    def unit_count(self) -> int:
        return self.units or min(2 * self.workers, MAX_UNITS)


@dataclass
class Tally:
    """What the simulated workers did, shared by their threads."""

    heartbeat_s: list[float] = field(default_factory=list)
    acquire_s: list[float] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def error(self, method: str, code: str, detail: str) -> None:
        with self.lock:
            self.errors[f"{method} {code}"] += 1
            # The first of each kind is shown as it happens; the table has the counts.
            if self.errors[f"{method} {code}"] == 1:
                print(f"error: {method} {code}: {detail}", file=sys.stderr, flush=True)


# --- the catalogue and the coordinator process ---


@contextlib.contextmanager
def catalogue_url(settings: Settings, folder: Path) -> Iterator[str]:
    """A SQLite file in `folder`, or a fresh PostgreSQL database dropped afterwards."""
    if settings.catalogue == "sqlite":
        yield f"sqlite:///{(folder / 'catalogue.db').resolve()}"
        return
    admin_url = make_url(settings.postgres_url)
    conninfo = admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        raise SystemExit(
            f"PostgreSQL at {admin_url.render_as_string()} is unreachable: {e}"
        ) from None
    name = f"tspace_soak_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield admin_url.set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_coordinator(
    folder: Path, url: str, settings: Settings
) -> tuple[subprocess.Popen[bytes], str]:
    """`init` the folder with the soak's lease settings, `serve` it; the process and address."""
    coord = folder / "coordinator"
    init = [sys.executable, "-m", "coordinator", "init", str(coord), "--catalogue", url]
    done = subprocess.run(init, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if done.returncode != 0:
        raise SystemExit(f"coordinator init failed:\n{done.stdout}{done.stderr}")
    config_file = coord / "coordinator.json"
    config = json.loads(config_file.read_text())
    config |= {"lease_ttl_s": settings.lease_ttl_s, "max_attempts": MAX_ATTEMPTS}
    config_file.write_text(json.dumps(config, indent=2))
    serve = [sys.executable, "-m", "coordinator", "serve", str(coord), "--listen", "127.0.0.1:0"]
    if not settings.tls:
        serve.append("--no-tls")
    with (folder / "coordinator.log").open("wb") as log:
        process = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        address_file = coord / "address"
        if address_file.exists() and (address := address_file.read_text().strip()):
            return process, address
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise SystemExit(f"the coordinator did not start:\n{log_tail(folder)}")


def stop_coordinator(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def log_tail(folder: Path, lines: int = 30) -> str:
    path = folder / "coordinator.log"
    return (
        "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
    )


class Sampler(threading.Thread):
    """Samples a process's VmRSS (KiB) and CPU seconds once a second, with the time."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int, float]] = []
        self.stop = threading.Event()

    def sample(self) -> tuple[float, int, float] | None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        rss = next(int(line.split()[1]) for line in status.splitlines() if line[:6] == "VmRSS:")
        cpu = (int(stat[11]) + int(stat[12])) / CLOCK_TICKS
        return time.monotonic(), rss, cpu

    def run(self) -> None:
        while True:
            if (s := self.sample()) is not None:
                self.samples.append(s)
            if self.stop.wait(1.0):
                return


# --- the simulated fleet ---


@dataclass
class SimWorker:
    """One registered worker: a credential, a stub, and the loop a real worker's lease follows."""

    index: int
    credential: str
    stub: worker_pb2_grpc.WorkerServiceStub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((CREDENTIAL_HEADER, self.credential),)

    def call(self, tally: Tally, method: str, request: Any) -> tuple[Any, float] | None:
        started = time.perf_counter()
        try:
            response = getattr(self.stub, method)(
                request, metadata=self.metadata, timeout=TIMEOUT_S
            )
        except grpc.RpcError as err:
            code = err.code().name if isinstance(err, grpc.Call) else "UNKNOWN"
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            tally.error(method, code, details or "")
            return None
        return response, time.perf_counter() - started

    def run(self, settings: Settings, tally: Tally, stop: threading.Event) -> None:
        rng = random.Random(settings.seed * 100_003 + self.index)
        # Spread the fleet over one heartbeat interval, as workers started at random times are.
        if stop.wait(self.index / settings.workers * settings.lease_ttl_s / 3):
            return
        while not stop.is_set():
            got = self.call(tally, "AcquireUnit", worker_pb2.AcquireUnitRequest())
            if got is None:
                stop.wait(1.0)
                continue
            response, seconds = got
            tally.acquire_s.append(seconds)
            if response.WhichOneof("result") != "assignment":
                tally.count("no_work")
                stop.wait(min(max(response.no_work.retry_after_s, 0.5), 10.0))
                continue
            tally.count("acquired")
            self.hold(response.assignment, settings, tally, stop, rng)

    def hold(
        self,
        assignment: worker_pb2.Assignment,
        settings: Settings,
        tally: Tally,
        stop: threading.Event,
        rng: random.Random,
    ) -> None:
        """Heartbeat the lease for a random number of beats, then fail it or drop it."""
        interval = max(assignment.lease_ttl_s / 3, 0.2)
        lease_id = assignment.lease_id
        for step in range(rng.randint(*settings.hold_beats)):
            if stop.wait(interval):
                return
            beat = worker_pb2.HeartbeatRequest(
                lease_id=lease_id, step=step + 1, loss=0.1, images_per_s=100.0
            )
            got = self.call(tally, "Heartbeat", beat)
            if got is None:
                continue  # as tspace-worker does: the next beat may get through
            tally.heartbeat_s.append(got[1])
            if got[0].cancel:
                tally.error("Heartbeat", "CANCEL", f"the coordinator ended live lease {lease_id}")
                return
        if rng.random() < settings.fail_fraction:
            request = worker_pb2.FailUnitRequest(lease_id=lease_id, error="soak: given back")
            if self.call(tally, "FailUnit", request) is not None:
                tally.count("failed_back")
        else:
            tally.count("dropped")


def job_toml(units: int) -> str:
    return f"""
name = "soak"
[states]
count = {units}
[units]
partition = "single"
[model]
preset = "tiny"
[training]
steps = 4
batch_size = 8
[data]
source = "digits"
"""


def enrol_fleet(
    channels: list[grpc.Channel], admin_credential: str, settings: Settings, tally: Tally
) -> list[SimWorker]:
    """Create the job, then enrol and register the workers (a few at a time, as sites would)."""
    admin_md = ((ADMIN_HEADER, admin_credential),)
    admin = admin_pb2_grpc.AdminServiceStub(channels[0])
    request = admin_pb2.CreateJobRequest(spec_toml=job_toml(settings.unit_count))
    try:
        admin.CreateJob(request, metadata=admin_md, timeout=START_TIMEOUT_S)
    except grpc.RpcError as err:
        raise SystemExit(f"the coordinator refused the soak's job: {err}") from None

    def register(i: int) -> SimWorker | None:
        stub = worker_pb2_grpc.WorkerServiceStub(channels[i % len(channels)])
        try:
            token = admin.Enroll(
                admin_pb2.EnrollRequest(site=f"site-{i % 7}"), metadata=admin_md, timeout=TIMEOUT_S
            ).token
            key = public_key_bytes(generate_key())
            registered = stub.Register(
                worker_pb2.RegisterRequest(token=token, public_key=key, device="cpu"),
                timeout=TIMEOUT_S,
            )
        except grpc.RpcError as err:
            code = err.code().name if isinstance(err, grpc.Call) else "UNKNOWN"
            tally.error("Enroll/Register", code, str(err))
            return None
        return SimWorker(i, registered.credential, stub)

    with ThreadPoolExecutor(max_workers=8) as pool:
        fleet = list(pool.map(register, range(settings.workers)))
    return [w for w in fleet if w is not None]


# --- figures ---


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`, in milliseconds; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def figures(
    settings: Settings, tally: Tally, samples: list[tuple[float, int, float]], window: float
) -> dict[str, Any]:
    """The run's figures; RSS in MiB, latencies in ms, growth in percent."""
    if not samples:
        raise SystemExit("no memory samples of the coordinator were taken")
    t0 = samples[0][0]
    warm = [s for s in samples if s[0] - t0 <= settings.warmup * window] or samples[:1]
    after = samples[len(warm) :] or samples[-1:]
    rss_warm = warm[-1][1]
    beats = tally.heartbeat_s
    return {
        "catalogue": settings.catalogue,
        "workers": settings.workers,
        "units": settings.unit_count,
        "lease_ttl_s": settings.lease_ttl_s,
        "duration_s": round(window, 1),
        "heartbeats": len(beats),
        "heartbeats_per_s": round(len(beats) / window, 2),
        "heartbeat_ms_p50": round(percentile(beats, 50), 2),
        "heartbeat_ms_p95": round(percentile(beats, 95), 2),
        "heartbeat_ms_p99": round(percentile(beats, 99), 2),
        "heartbeat_ms_max": round(1000 * max(beats, default=float("nan")), 2),
        "acquires": len(tally.acquire_s),
        "acquire_ms_p50": round(percentile(tally.acquire_s, 50), 2),
        "acquire_ms_p99": round(percentile(tally.acquire_s, 99), 2),
        "leases_granted": tally.counts["acquired"],
        "leases_failed_back": tally.counts["failed_back"],
        "leases_dropped": tally.counts["dropped"],
        "no_work_answers": tally.counts["no_work"],
        "rss_mib_warmup_end": round(rss_warm / 1024, 1),
        "rss_mib_max_after": round(max(s[1] for s in after) / 1024, 1),
        "rss_mib_end": round(after[-1][1] / 1024, 1),
        "rss_growth_pct_max": round(100 * (max(s[1] for s in after) / rss_warm - 1), 2),
        "rss_growth_pct_end": round(100 * (after[-1][1] / rss_warm - 1), 2),
        # One RSS sample (MiB) per tenth of the run: a leak shows as a steady climb.
        "rss_mib_by_tenth": [
            round(rss_at(samples, t0 + k * window / 10) / 1024, 1) for k in range(11)
        ],
        "coordinator_cpu_s_per_s": round((samples[-1][2] - samples[0][2]) / window, 3),
        "errors": sum(tally.errors.values()),
        "errors_by_code": dict(tally.errors),
    }


def rss_at(samples: list[tuple[float, int, float]], when: float) -> int:
    """The last RSS sampled at or before `when` (the first sample if none)."""
    return next((s[1] for s in reversed(samples) if s[0] <= when), samples[0][1])


def print_table(result: dict[str, Any]) -> None:
    for key, value in result.items():
        if key == "rss_mib_by_tenth":
            print(f"{key:<20}{' '.join(f'{v:.0f}' for v in value):>30}")
            continue
        if key == "errors_by_code":
            for what, n in sorted(value.items()):
                print(f"  {what:<36}{n:>12}")
            continue
        print(f"{key:<38}{value:>12}")


# --- the run ---


def soak(settings: Settings, folder: Path | None = None) -> dict[str, Any]:
    """Run one soak and return its figures (see figures())."""
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tspace-soak-")))
        url = stack.enter_context(catalogue_url(settings, folder))
        process, address = start_coordinator(folder, url, settings)
        stack.callback(stop_coordinator, process)
        coord = folder / "coordinator"
        security = (
            ChannelSecurity((coord / "tls" / "ca.crt").read_bytes()) if settings.tls else None
        )
        channels = [open_channel(address, security) for _ in range(settings.channels)]
        for channel in channels:
            stack.callback(channel.close)
        tally = Tally()
        started = time.monotonic()
        fleet = enrol_fleet(
            channels, (coord / "admin.credential").read_text().strip(), settings, tally
        )
        registration_s = time.monotonic() - started
        result = run_fleet(settings, fleet, tally, process)
        alive = process.poll() is None
        stop_coordinator(process)  # so its log is whole; the callback then has nothing to do
        tracebacks = (folder / "coordinator.log").read_text(errors="replace").count("Traceback")
    result |= {"registration_s": round(registration_s, 1), "registered": len(fleet)}
    for what, n in (
        ("coordinator EXITED", 0 if alive else 1),
        ("coordinator TRACEBACK", tracebacks),
    ):
        if n:
            result["errors"] += n
            result["errors_by_code"][what] = n
    return result


def run_fleet(
    settings: Settings, fleet: list[SimWorker], tally: Tally, process: subprocess.Popen[bytes]
) -> dict[str, Any]:
    """Run every simulated worker for the duration while sampling the coordinator."""
    sampler = Sampler(process.pid)
    stop = threading.Event()
    threads = [
        threading.Thread(target=w.run, args=(settings, tally, stop), name=f"sim-{w.index}")
        for w in fleet
    ]
    sampler.start()
    started = time.monotonic()
    try:  # an interrupted run stops its threads too, so the process can exit
        for thread in threads:
            thread.start()
        deadline = started + settings.duration_s
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        window = time.monotonic() - started
    finally:
        sampler.stop.set()
        sampler.join()
        stop.set()
        for thread in threads:
            if thread.ident is not None:
                thread.join(TIMEOUT_S + 5)
    return figures(settings, tally, sampler.samples, window)


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    parser.add_argument("--catalogue", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", default=PG_ADMIN_URL, help="server to make a database on")
    parser.add_argument(
        "--units", type=int, default=0, help="units of the job (default 2x workers)"
    )
    parser.add_argument("--lease-ttl", type=float, default=30.0, help="seconds; beats every ttl/3")
    parser.add_argument("--warmup", type=float, default=0.25, help="fraction of the run")
    parser.add_argument("--channels", type=int, default=8, help="client channels, shared")
    parser.add_argument("--no-tls", action="store_true", help="plaintext on loopback")
    parser.add_argument("--max-growth", type=float, default=10.0, help="percent; exit 1 above")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    checks = [
        (args.workers >= 1, "--workers must be at least 1"),
        (args.minutes > 0, "--minutes must be positive"),
        (0 <= args.units <= MAX_UNITS, f"--units must be in 0..{MAX_UNITS} (the schedule's T)"),
        (args.lease_ttl >= 1, "--lease-ttl must be at least 1 second"),
        (0 < args.warmup < 1, "--warmup must be a fraction in (0, 1)"),
        (args.channels >= 1, "--channels must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    settings = Settings(
        workers=args.workers,
        duration_s=60 * args.minutes,
        catalogue=args.catalogue,
        postgres_url=args.postgres_url,
        units=args.units,
        lease_ttl_s=args.lease_ttl,
        warmup=args.warmup,
        channels=args.channels,
        tls=not args.no_tls,
        seed=args.seed,
    )
    return settings, args


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    shown = {
        k: v for k, v in asdict(settings).items() if k != "postgres_url"
    }  # may hold a password
    print(f"soak: {json.dumps(shown)}", flush=True)
    result = soak(settings)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps({"settings": shown, **result}, indent=2))
    ok = result["errors"] == 0 and result["rss_growth_pct_max"] < args.max_growth
    print("PASS" if ok else "FAIL", f"(the bar: no errors, RSS growth under {args.max_growth}%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
