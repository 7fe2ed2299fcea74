"""Worker overhead: a unit trained by `tspace-worker join` vs a bare PyTorch loop.

    python bench/worker_overhead.py [--preset tiny] [--size 8] [--batch 64] [--threads 1]
        [--steps 600] [--rounds 3] [--checkpoint-every 0 ...] [--keep DIR] [--profile DIR]
        [--json out.json]

One coordinator runs as its own process (`python -m coordinator serve`, TLS on 127.0.0.1, the
product's default lease TTL, so heartbeats every 10 s). Each round runs, one after another and
in rotated order, every configuration as a fresh process with `torch.set_num_threads(--threads)`:

- bare: `bare_loop` of bench/train_speed.py on the job's model (sample, noise, forward,
  backward, AdamW; nothing else);
- trainer: the product's `UnitTrainer` for the job's unit, built by `make_trainer` exactly as the
  worker builds it (EMA, gradient clipping, LR schedule), stepped in a loop, no coordinator;
- worker (one per --checkpoint-every value; 0, only the final checkpoint, is the product's
  default): a one-unit job is created on the coordinator and a real `tspace-worker join` process
  leases it, fetches its shard, trains, heartbeats, writes, signs and uploads checkpoints in the
  background, and completes it.

images/s is measured over the same steady window in every configuration: steps --steps/10 to
9*--steps/10 (the first tenth, with start-up, data fetch and warm-up, and the last tenth, with
the final checkpoint, are outside it). The worker's window comes from its own log: without a
terminal it logs a line, timestamped to the millisecond, at every tenth of the unit's steps, so
the window's time is the wall-clock time between the step-S/10 and step-9S/10 lines, with
everything the worker does meanwhile (heartbeats, checkpoint writes, uploads, its log) inside it.
The bare loop and trainer time the same number of steps after the same number of warm-up steps.
The worker's log also gives, for reference, its own images/s figure (a moving average of the
time of `train_step` alone, which is what heartbeats report) and the whole unit from lease to
completion (data fetch, model build, final checkpoint and upload included).

The machine may be shared, and a one-thread process then gets less than a core, by chance. So
each configuration's CPU seconds per second over its window are measured too (the children's
process_time, all threads; the worker's and the coordinator's from /proc/PID/stat), and images
per CPU second (the work each image costs, whatever share of the machine the process got) is
shown beside images/s, with the CPU s/s the rest of the machine used meanwhile (/proc/stat, not
idle, steal included, less this benchmark's own processes).

Every ratio is the median over rounds of the round's worker (or trainer) figure over the same
round's bare figure. --profile DIR then trains one more unit per worker configuration, not
measured, with `py-spy record` (pip install py-spy) attached over its steady window, and prints
where the worker process's samples fall. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from coordinator.admin_client import admin_call
from coordinator.config import init_dir
from tspace_core.proto.tspace.v1 import admin_pb2

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
JOIN = [sys.executable, "-m", "worker", "join"]
SERVE = [sys.executable, "-m", "coordinator", "serve"]


# --- the job and the processes --------------------------------------------------------------


def job_toml(
    name: str, units: int, preset: str, size: int, steps: int, batch: int, checkpoint_every: int
) -> str:
    """A job of `units` single-state units; every field not named keeps the product default."""
    resize = "" if size == 8 else f"resize = {size}\n"
    return (
        f'name = "{name}"\n[states]\ncount = {units}\n[units]\npartition = "single"\n'
        f'[model]\npreset = "{preset}"\n'
        f"[training]\nsteps = {steps}\nbatch_size = {batch}\n"
        f"checkpoint_every = {checkpoint_every}\n"
        f'[data]\nsource = "digits"\n{resize}'
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MACHINE = 0  # as a pid to CpuSampler: every CPU of the machine (/proc/stat)


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, in clock ticks (None once it has gone); for MACHINE, the
    ticks of all CPUs not idle (steal included: time this machine could not use)."""
    if pid == MACHINE:
        stat = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(stat[:8]) - stat[3] - stat[4]  # less idle and iowait
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


class CpuSampler(threading.Thread):
    """Samples the CPU time of some processes every `every` s, against time.time()."""

    def __init__(self, pids: dict[str, int], every: float = 0.1) -> None:
        super().__init__(name="cpu-sampler", daemon=True)
        self.pids, self.every = pids, every
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            now = time.time()
            for name, pid in self.pids.items():
                ticks = cpu_ticks(pid)
                if ticks is not None:
                    self.samples[name].append((now, ticks))
            if self._halt.wait(self.every):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def rate(self, name: str, t0: float, t1: float) -> float | None:
        """CPU s/s of `name` from t0 to t1, its CPU time interpolated between samples."""
        samples = self.samples[name]
        if len(samples) < 2 or not samples[0][0] <= t0 < t1 <= samples[-1][0]:
            return None
        times = [s[0] for s in samples]
        ticks = [float(s[1]) for s in samples]
        used = interpolate(times, ticks, t1) - interpolate(times, ticks, t0)
        return used / CLOCK_TICKS / (t1 - t0)


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """y at x, linearly between the nearest points of the increasing xs (x within them)."""
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-9)
    raise ValueError(f"{x} is outside {xs[0]}..{xs[-1]}")


@dataclass
class Coordinator:
    """A coordinator folder under `root`, served by its own process on a loopback port, and
    worker sites that join it as `tspace-worker join` processes."""

    root: Path
    port: int = field(default_factory=free_port)
    server: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.folder = self.root / "coord"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        init_dir(self.folder)  # the product's defaults: lease TTL 30 s, SQLite, TLS

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with (self.logs / "coordinator.log").open("ab") as log:
            command = [*SERVE, str(self.folder), "--listen", self.address]
            self.server = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + 90
        while True:
            if self.server.poll() is not None:
                raise SystemExit(f"the coordinator exited with {self.server.returncode}")
            try:
                self.admin("ListJobs", admin_pb2.ListJobsRequest())
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def admin(self, method: str, request: object) -> Any:
        return admin_call(self.folder, method, request)

    def create_job(self, spec: str) -> None:
        self.admin("CreateJob", admin_pb2.CreateJobRequest(spec_toml=spec))

    def start_worker(self, site: str, threads: int, log: Path) -> subprocess.Popen[bytes]:
        """`tspace-worker join` for `site`; it registers with a fresh token on its first start.
        It exits once the coordinator has no work left."""
        state = self.root / "sites" / site
        args = ["--coordinator", self.address, "--threads", str(threads)]
        args += ["--state-dir", str(state), "--ca", str(self.folder / "tls" / "ca.crt")]
        if not (state / "identity.json").exists():
            args += ["--token", self.admin("Enroll", admin_pb2.EnrollRequest(site=site)).token]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open("ab") as out:
            return subprocess.Popen([*JOIN, *args], stdout=out, stderr=out, env=env)

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(30)


# --- reading a worker's log ------------------------------------------------------------------

STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) tspace\.worker "
PROGRESS = re.compile(STAMP + r"(\S+) unit (\d+): step (\d+)/(\d+), loss \S+\s+(\d+) img/s")
LEASED = re.compile(STAMP + r"leased unit (\d+) of (\S+) ")
COMPLETED = re.compile(STAMP + r"unit (\d+) completed")


def stamp(text: str) -> float:
    """A logging asctime (local time, milliseconds) as seconds since the epoch."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class UnitLog:
    """What one worker's log says about one unit: (time, step) at every tenth of its steps,
    the images/s it reported there, and when it was leased and completed."""

    job: str
    steps: int
    points: list[tuple[float, int]]
    reported: dict[int, float]
    leased: float
    completed: float

    def time_at(self, step: int) -> float:
        for t, s in self.points:
            if s == step:
                return t
        raise SystemExit(f"the worker's log has no line for step {step} of {self.job}")

    def step_at(self, t: float) -> float:
        """The step reached at time t, interpolated linearly between logged points."""
        return interpolate([p[0] for p in self.points], [float(p[1]) for p in self.points], t)

    def window(self) -> tuple[float, float]:
        """The steady window: from the step-S/10 line to the step-9S/10 line."""
        return self.time_at(self.steps // 10), self.time_at(9 * self.steps // 10)

    def images_per_s(self, batch: int) -> float:
        t0, t1 = self.window()
        return batch * (8 * self.steps // 10) / (t1 - t0)


def read_unit_log(path: Path, job: str) -> UnitLog:
    text = path.read_text(errors="replace")
    points, reported, total = [], {}, 0
    leased = completed = None
    for line in text.splitlines():
        if (m := PROGRESS.match(line)) and m.group(2) == job:
            step, total = int(m.group(4)), int(m.group(5))
            points.append((stamp(m.group(1)), step))
            reported[step] = float(m.group(6))
        elif (m := LEASED.match(line)) and m.group(3) == job:
            leased = stamp(m.group(1))
        elif (m := COMPLETED.match(line)) and leased is not None and completed is None:
            completed = stamp(m.group(1))
    if not points or leased is None or completed is None:
        raise SystemExit(f"{path} does not show {job} trained and completed:\n{text[-3000:]}")
    return UnitLog(job, total, points, reported, leased, completed)


# --- the child processes: the bare loop and the trainer on their own -------------------------


def child(kind: str, job_file: Path, threads: int) -> dict[str, float]:
    """Train the job's unit 0 (`trainer`) or the same model with `bare_loop` (`bare`) for
    S/10 warm-up steps and 8S/10 timed steps; images/s of the timed steps."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_speed import bare_loop, trainer_loop

    from tspace_core.data import load_dataset
    from tspace_core.jobspec import load_job
    from tspace_core.models import build_unet
    from tspace_core.runner import make_trainer, model_config_for

    torch.set_num_threads(threads)
    job = load_job(job_file)
    data = load_dataset(job.spec.data, job.base_dir)
    config = model_config_for(job, data)
    batch = job.spec.training.batch_size
    warm, timed = job.spec.training.steps // 10, 8 * job.spec.training.steps // 10
    if kind == "bare":
        model = build_unet(config, seed=0)
        bare_loop(model, data.images, batch, warm)
        t0, cpu, wall = time.time(), time.process_time(), time.perf_counter()
        rate = bare_loop(model, data.images, batch, timed)
    else:
        trainer = make_trainer(job, 0, data, config, "cpu")
        trainer_loop(trainer, warm)
        t0, cpu, wall = time.time(), time.process_time(), time.perf_counter()
        rate = trainer_loop(trainer, timed)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "images_per_s": rate,
        "cpu": cpu / wall,
        "images_per_cpu_s": batch * timed / cpu,
        "t0": t0,
        "t1": time.time(),
    }


def run_child(kind: str, job_file: Path, threads: int) -> dict[str, Any]:
    """Run `child` in its own process; its figures, and the CPU s/s the rest of the machine
    used during its timed steps."""
    command = [sys.executable, __file__, "--child", kind, "--job-file", str(job_file)]
    command += ["--threads", str(threads)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    sampler = CpuSampler({"machine": MACHINE, "child": proc.pid})
    sampler.start()
    try:
        stdout, stderr = proc.communicate()
    finally:
        sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"the {kind} loop failed:\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    t0, t1 = result.pop("t0"), result.pop("t1")
    machine, own = sampler.rate("machine", t0, t1), sampler.rate("child", t0, t1)
    result["others_cpu"] = None if machine is None or own is None else machine - own
    return result


# --- one worker run ---------------------------------------------------------------------------


def run_workers(
    coord: Coordinator, job: str, spec: str, sites: list[str], threads: int, batch: int
) -> dict[str, Any]:
    """Create the job, start one worker per site, wait for all; what their logs and /proc say."""
    coord.create_job(spec)
    logs = {site: coord.logs / f"{job}-{site}.log" for site in sites}
    started = time.time()
    procs = {site: coord.start_worker(site, threads, logs[site]) for site in sites}
    assert coord.server is not None
    pids = {"machine": MACHINE, "coordinator": coord.server.pid}
    sampler = CpuSampler({**pids, **{s: p.pid for s, p in procs.items()}})
    sampler.start()
    try:
        for site, proc in procs.items():
            if proc.wait(1800) != 0:
                raise SystemExit(f"worker {site} exited with {proc.returncode}; see {logs[site]}")
    finally:
        sampler.stop()
    units = {site: read_unit_log(logs[site], job) for site in sites}
    # The window where every worker is in its steady part; each worker's steps in it.
    t0 = max(u.window()[0] for u in units.values())
    t1 = min(u.window()[1] for u in units.values())
    if t1 <= t0:
        raise SystemExit(f"{job}: the workers' steady windows do not overlap")
    steps = {s: u.step_at(t1) - u.step_at(t0) for s, u in units.items()}
    cpu = {s: sampler.rate(s, t0, t1) for s in sites}
    ours = [sampler.rate("coordinator", t0, t1), *cpu.values()]
    machine = sampler.rate("machine", t0, t1)
    others = None
    if machine is not None and all(v is not None for v in ours):
        others = machine - sum(v for v in ours if v is not None)
    return {
        "aggregate_images_per_s": batch * sum(steps.values()) / (t1 - t0),
        "common_window_s": t1 - t0,
        "per_worker_images_per_s": {s: u.images_per_s(batch) for s, u in units.items()},
        "reported_images_per_s": {
            s: u.reported[9 * u.steps // 10] for s, u in units.items()
        },  # the worker's own moving average, as heartbeats report it
        "unit_images_per_s": {
            s: batch * u.steps / (u.completed - u.leased) for s, u in units.items()
        },
        "start_to_lease_s": {s: u.leased - started for s, u in units.items()},
        "coordinator_cpu": sampler.rate("coordinator", t0, t1),
        "worker_cpu": cpu,
        # what other processes of the machine used meanwhile (this one's sampling is in it)
        "others_cpu": others,
        "aggregate_images_per_cpu_s": (
            batch * sum(steps.values()) / (sum(known) * (t1 - t0))
            if len(known := [c for c in cpu.values() if c]) == len(cpu)
            else None
        ),
        "images_per_cpu_s": {
            s: None if not c else batch * steps[s] / (c * (t1 - t0)) for s, c in cpu.items()
        },
    }


# --- an optional profile of the worker ---------------------------------------------------------


def profile_worker(
    coord: Coordinator, name: str, spec: str, threads: int, seconds: float, out: Path
) -> dict[str, float]:
    """Train one more unit, unmeasured, with `py-spy record` (raw, all threads, not idle)
    attached for `seconds` from the worker's first progress line; shares of the samples."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    coord.create_job(spec)
    log = coord.logs / f"{name}-site.log"
    worker = coord.start_worker("site", threads, log)
    while not (log.exists() and PROGRESS.search(log.read_text(errors="replace"))):
        if worker.poll() is not None:
            raise SystemExit(f"the profiled worker exited early; see {log}")
        time.sleep(0.1)
    raw = out / f"{name}.txt"
    command = [py_spy, "record", "--pid", str(worker.pid), "--format", "raw", "--threads"]
    command += ["--nonblocking", "--rate", "200", "--duration", str(max(int(seconds), 1))]
    subprocess.run([*command, "-o", str(raw)], check=True, capture_output=True)
    if worker.wait(1800) != 0:
        raise SystemExit(f"the profiled worker exited with {worker.returncode}; see {log}")
    return profile_shares(raw)


def profile_shares(raw: Path) -> dict[str, float]:
    """Shares of all samples: the training thread's, by what it was in, and each other
    thread's (by name; gRPC's own threads together)."""
    counts: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" in frames[0]:
            key = "main: other (truncated stacks, mostly inside train_step)"
            for marker, what in (
                ("train_step (", "main: train_step"),
                ("save_unit_checkpoint (", "main: checkpoint write"),
                ("_signed (", "main: checkpoint digest and signature"),
                ("_train (worker/agent.py", "main: the worker's loop around train_step"),
            ):
                if any(marker in f for f in frames):
                    key = what
                    break
        else:
            thread = frames[0].split(": ", 1)[-1]
            key = f"thread {thread}" if thread in ("heartbeat", "uploader") else "gRPC threads"
        counts[key] = counts.get(key, 0) + int(count)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


# --- the overhead benchmark -------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over rounds; ratios are medians of each round's ratio to that round's bare."""
    bare = rows["bare"]
    summary: dict[str, dict[str, Any]] = {}
    for config, runs in rows.items():
        out: dict[str, Any] = {"per_round_images_per_s": [run["images_per_s"] for run in runs]}
        for key in runs[0]:
            out[key] = median([run[key] for run in runs])
        for key in ("images_per_s", "images_per_cpu_s"):
            out[f"{key}_vs_bare"] = median(
                [
                    None if not (run[key] and base[key]) else run[key] / base[key]
                    for run, base in zip(runs, bare, strict=True)
                ]
            )
        summary[config] = out
    return summary


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    print(
        "| config | images/s | vs bare | per round | CPU s/s | images per CPU s | vs bare "
        "| worker-reported images/s | whole unit images/s | coordinator CPU s/s "
        "| other processes' CPU s/s |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for config, s in summary.items():
        label = config
        if config.startswith("worker:"):
            interval = int(config.split(":")[1])
            label = f"worker, checkpoint_every {interval}{' (final only)' if not interval else ''}"
        per_round = " / ".join(f"{v:,.0f}" for v in s["per_round_images_per_s"])
        print(
            f"| {label} | {s['images_per_s']:,.1f} | {fmt(s['images_per_s_vs_bare'], 3)} "
            f"| {per_round} | {fmt(s['cpu'], 3)} | {fmt(s['images_per_cpu_s'])} "
            f"| {fmt(s['images_per_cpu_s_vs_bare'], 3)} "
            f"| {fmt(s.get('reported_images_per_s'))} | {fmt(s.get('unit_images_per_s'))} "
            f"| {fmt(s.get('coordinator_cpu'), 3)} | {fmt(s.get('others_cpu'), 2)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=8, help="image side (digits are 8x8)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    parser.add_argument("--steps", type=int, default=600, help="steps of the unit (x10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        nargs="+",
        default=[0],
        help="one worker configuration per value (0, the default, writes only the last)",
    )
    parser.add_argument("--no-trainer", action="store_true", help="skip the trainer config")
    parser.add_argument("--keep", type=Path, default=None, help="keep the folder (logs) here")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="afterwards, train one unmeasured unit per worker config under py-spy; raw stacks "
        "to this folder",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=["bare", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--job-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.job_file, args.threads)))
        return
    if args.steps % 10 or args.steps < 20:
        parser.error("--steps must be a multiple of 10, at least 20")

    root = Path(tempfile.mkdtemp(prefix="tspace-overhead-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    configs = ["bare", *([] if args.no_trainer else ["trainer"])]
    configs += [f"worker:{c}" for c in args.checkpoint_every]
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    coord = Coordinator(root)
    coord.start()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    try:
        for r in range(args.rounds):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for config in order:
                kind, _, every = config.partition(":")
                name = f"overhead-r{r}-{kind}{every}"
                spec = job_toml(
                    name, 1, args.preset, args.size, args.steps, args.batch, int(every or 0)
                )
                if kind == "worker":
                    out = run_workers(coord, name, spec, ["site"], args.threads, args.batch)
                    row = {
                        "images_per_s": out["aggregate_images_per_s"],
                        "reported_images_per_s": out["reported_images_per_s"]["site"],
                        "unit_images_per_s": out["unit_images_per_s"]["site"],
                        "start_to_lease_s": out["start_to_lease_s"]["site"],
                        "cpu": out["worker_cpu"]["site"],
                        "images_per_cpu_s": out["images_per_cpu_s"]["site"],
                        "coordinator_cpu": out["coordinator_cpu"],
                        "others_cpu": out["others_cpu"],
                    }
                else:
                    job_file = root / f"{name}.toml"
                    job_file.write_text(spec)
                    row = run_child(kind, job_file, args.threads)
                rows[config].append(row)
                print(
                    f"round {r} {config}: {row['images_per_s']:.1f} images/s, "
                    f"{fmt(row['cpu'], 3)} CPU s/s, {fmt(row['images_per_cpu_s'])} images per "
                    f"CPU s; other processes {fmt(row['others_cpu'], 2)} CPU s/s",
                    flush=True,
                )
        summary = summarise(rows)
        profiles = {}
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            for config in configs:
                kind, _, every = config.partition(":")
                if kind != "worker":
                    continue
                name = f"overhead-profile-{kind}{every}"
                spec = job_toml(name, 1, args.preset, args.size, args.steps, args.batch, int(every))
                seconds = 0.8 * args.steps * args.batch / summary[config]["images_per_s"]
                profiles[config] = profile_worker(
                    coord, name, spec, args.threads, seconds, args.profile
                )
    finally:
        coord.stop()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"\n{args.preset}, {args.size}x{args.size}, batch {args.batch}, {args.threads} thread(s), "
        f"{args.steps} steps a unit (window: steps {args.steps // 10}-{9 * args.steps // 10}), "
        f"medians of {args.rounds} rounds\n"
    )
    print_table(summary)
    for config, shares in profiles.items():
        print(f"\npy-spy samples of the worker process, {config} (all threads, not idle):\n")
        print("| where | share of samples |\n| --- | ---: |")
        for where, share in shares.items():
            print(f"| {where} | {100 * share:.2f}% |")
    if args.json:
        result = {
            "profiles": profiles,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "summary": summary,
            "rounds": rows,
            "load_average_end": os.getloadavg(),
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
