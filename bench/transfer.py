"""Checkpoint upload throughput through the coordinator vs a raw loopback TCP copy.

    python bench/transfer.py [--sizes 64,256,1024] [--rounds 3] [--no-plaintext] [--json out.json]

The coordinator runs as its own process (`python -m coordinator init`, then `serve` on
127.0.0.1), once over TLS and once with `--no-tls`. For each size (MiB) a job is created whose
model (the tiny preset with wider block_out_channels) makes a checkpoint of about that size, one
worker is registered and leases its single unit, and real checkpoints of that unit are written
with save_unit_checkpoint (model and EMA weights; no optimizer step is taken, so no Adam moments),
one per upload, each at a new step so each has new bytes. The upload is timed around
worker.client.Session.upload (the real client: UploadStatus, then the stream) up to the
registered reply, so the coordinator's digest, statement and signature checks, checkpoint
metadata check, fsync and catalogue write are all inside it.

The baseline is a raw socket: a child process on loopback that reads the same number of bytes
(sent with socket.sendfile from the same file) and discards them, or writes them to a file and
fsyncs it at the end ("raw+fsync"); the time runs from connect to its one-byte reply.

Configurations are interleaved in rounds (order rotated each round) so machine noise hits all
alike; each figure is the median over rounds. During the largest upload the coordinator's
VmRSS is sampled from /proc every 50 ms: idle is the RSS just before the upload, peak the
largest sample; the CPU seconds the coordinator process and this client process spent per
second of those uploads are shown too (1.0 is one core kept busy). The JSON also lists every
upload.

Flower (`flwr`) is measured in the same rounds when `--flower-venv` holds it (default: .venv-flower
at the repository root; `python3 -m venv .venv-flower && .venv-flower/bin/pip install flwr numpy`;
it needs an environment of its own because its pins clash with tspace's). A SuperLink and a
SuperNode run on 127.0.0.1 without TLS, and each measurement is one `flwr run` of
bench/flower_transfer/app whose ClientApp replies with the same checkpoint file's bytes as one
numpy array in an ArrayRecord; the ServerApp checks their SHA-256. The Flower figure is the
SuperNode-to-SuperLink hop of that reply (bench/flower_transfer/deployment.py says exactly what
each Flower span covers); the reply path and round trip, beside those of a tiny reply in the same
run, are in a second table. During the largest size the VmRSS of the SuperLink and the SuperNode
is sampled over the whole run as for the coordinator. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

# bench/ is on sys.path when this runs as a script.
from flower_transfer.deployment import FlowerDeployment
from flower_transfer.report import print_flower, summarize_flower

from coordinator.config import ADMIN_CREDENTIAL_FILE
from tspace_core import serde
from tspace_core.data import load_dataset
from tspace_core.models import ModelConfig, build_unet, count_parameters, unet_config
from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc, worker_pb2
from tspace_core.rpc import ADMIN_HEADER, ChannelSecurity, open_channel
from tspace_core.runner import make_trainer, model_config_for, save_unit_checkpoint
from tspace_core.signing import Statement, generate_key, key_id, public_key_bytes, sign
from worker.agent import resolve_assignment
from worker.client import Session

MIB = 2**20
STEPS = 100_000  # a unit's steps: every checkpoint uploaded is an intermediate one
START_TIMEOUT_S = 120.0
RSS_INTERVAL_S = 0.05
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
JOB_TOML = """
name = "{name}"
[states]
count = 1
[units]
partition = "single"
[model]
preset = "tiny"
kwargs = {{ block_out_channels = [{c}, {c2}] }}
[training]
steps = {steps}
batch_size = 8
[data]
source = "digits"
"""
# Reads one transfer per connection: a 9-byte header (size, durable), the bytes, then replies.
RAW_SERVER = """
import os, socket, struct, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
buf = bytearray(1 << 20)
view = memoryview(buf)
while True:
    conn, _ = server.accept()
    with conn:
        head = b""
        while len(head) < 9:
            head += conn.recv(9 - len(head))
        size, durable = struct.unpack("!QB", head)
        path = os.path.join(sys.argv[1], "raw.bin")
        out = open(path, "wb", buffering=0) if durable else None
        got = 0
        while got < size:
            n = conn.recv_into(view, min(len(buf), size - got))
            if not n:
                break
            if out is not None:
                out.write(view[:n])
            got += n
        if out is not None:
            os.fsync(out.fileno())
            out.close()
            os.unlink(path)
        conn.sendall(b"k")
"""


# --- sizing the model ---


def checkpoint_bytes(channels: int) -> int:
    """Roughly the checkpoint of the tiny preset at [c, 2c] on digits: weights and EMA."""
    model = ModelConfig(kwargs={"block_out_channels": [channels, 2 * channels]})
    cfg = unet_config(model, 8, 1, 10)  # digits: 8x8 grey images, 10 classes
    with torch.device("meta"):
        return 8 * count_parameters(build_unet(cfg))


def channels_for(target: int) -> int:
    """The multiple of 8 whose checkpoint is closest to `target` bytes (sizes grow as c^2)."""
    low, high = 8, 8
    while checkpoint_bytes(high) < target:
        low, high = high, high * 2
    while high - low > 8:
        mid = (low + high) // 16 * 8
        low, high = (mid, high) if checkpoint_bytes(mid) < target else (low, mid)
    return min((low, high), key=lambda c: abs(checkpoint_bytes(c) - target))


# --- the coordinator process ---


@dataclasses.dataclass
class Served:
    """One coordinator process, its address and how to reach it."""

    name: str
    folder: Path
    process: subprocess.Popen[bytes]
    address: str
    security: ChannelSecurity | None

    @property
    def admin_md(self) -> tuple[tuple[str, str], ...]:
        return ((ADMIN_HEADER, (self.folder / ADMIN_CREDENTIAL_FILE).read_text().strip()),)


def start_coordinator(root: Path, name: str, tls: bool) -> Served:
    folder = root / name
    init = [sys.executable, "-m", "coordinator", "init", str(folder)]
    done = subprocess.run(init, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if done.returncode != 0:
        raise SystemExit(f"coordinator init failed:\n{done.stdout}{done.stderr}")
    config_file = folder / "coordinator.json"
    config = json.loads(config_file.read_text())
    config |= {"lease_ttl_s": 24 * 3600.0, "max_checkpoint_bytes": 8 * 2**30}
    config_file.write_text(json.dumps(config, indent=2))
    serve = [sys.executable, "-m", "coordinator", "serve", str(folder), "--listen", "127.0.0.1:0"]
    if not tls:
        serve.append("--no-tls")
    with (root / f"{name}.log").open("wb") as log:
        process = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        address_file = folder / "address"
        if address_file.exists() and (address := address_file.read_text().strip()):
            ca = ChannelSecurity((folder / "tls" / "ca.crt").read_bytes()) if tls else None
            print(f"{name}: coordinator pid {process.pid} at {address}", file=sys.stderr)
            return Served(name, folder, process, address, ca)
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the coordinator did not start; see {root / f'{name}.log'}")


def stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- one leased unit and its checkpoints ---


def sha256_file(path: Path) -> str:
    content_hash = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * MIB):
            content_hash.update(block)
    return content_hash.hexdigest()


@dataclasses.dataclass
class Uploader:
    """A registered worker holding the lease on a job's only unit, and that unit's trainer."""

    session: Session
    key: Any
    assignment: serde.Assignment
    write: Any  # (step, path) -> None: a real checkpoint of the unit at that step

    def upload(self, path: Path, step: int) -> float:
        """Seconds from the call to the registered reply."""
        digest, size, a = sha256_file(path), path.stat().st_size, self.assignment
        statement = Statement(
            job=a.job,
            job_hash=a.job_hash,
            unit=a.unit,
            attempt=a.attempt,
            step=step,
            final=False,
            sha256=digest,
            size=size,
            key_id=key_id(public_key_bytes(self.key)),
            time=time.time(),
        ).to_bytes()
        signature = sign(self.key, statement)
        start = time.perf_counter()
        reply = self.session.upload(a.lease_id, path, digest, statement, signature)
        elapsed = time.perf_counter() - start
        if reply is None or reply.already_registered or reply.checkpoint.sha256 != digest:
            raise SystemExit(f"the upload of {path.name} was not registered anew: {reply}")
        return elapsed


def make_uploader(served: Served, size_mib: int, channels: int) -> Uploader:
    """Create the job, enroll and register a worker, lease the unit, build its trainer."""
    name = f"xfer-{size_mib}"
    with open_channel(served.address, served.security) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        spec = JOB_TOML.format(name=name, c=channels, c2=2 * channels, steps=STEPS)
        admin.CreateJob(
            admin_pb2.CreateJobRequest(spec_toml=spec), metadata=served.admin_md, timeout=600
        )
        token = admin.Enroll(
            admin_pb2.EnrollRequest(site="bench"), metadata=served.admin_md, timeout=30
        ).token
    session = Session(served.address, security=served.security)
    key = generate_key()
    request = worker_pb2.RegisterRequest(
        token=token, public_key=public_key_bytes(key), device="cpu"
    )
    session.credential = session.call("Register", request).credential
    lease = session.call("AcquireUnit", worker_pb2.AcquireUnitRequest())
    a = serde.assignment_from_proto(lease.assignment)
    if a.job != name:
        raise SystemExit(f"the worker leased a unit of {a.job}, not of {name}")
    job, _ = resolve_assignment(a)
    data = load_dataset(job.spec.data)
    config = model_config_for(job, data)
    trainer = make_trainer(job, a.unit, data, config, "cpu")

    def write(step: int, path: Path) -> None:
        trainer.step = step
        save_unit_checkpoint(trainer, job, a.unit, data, config, path)

    return Uploader(session, key, a, write)


# --- the raw socket ---


def raw_copy(port: int, path: Path, durable: bool) -> float:
    size = path.stat().st_size
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock, path.open("rb") as f:
        sock.sendall(struct.pack("!QB", size, int(durable)))
        sock.sendfile(f)
        if sock.recv(1) != b"k":
            raise SystemExit("the raw server did not acknowledge the copy")
    return time.perf_counter() - start


# --- memory ---


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit(f"no VmRSS for process {pid}")


class RssPeak(threading.Thread):
    """The largest VmRSS of a process, sampled every RSS_INTERVAL_S until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="rss", daemon=True)
        self.pid, self.peak, self.done = pid, vm_rss_kib(pid), threading.Event()

    def run(self) -> None:
        while not self.done.wait(RSS_INTERVAL_S):
            self.peak = max(self.peak, vm_rss_kib(self.pid))

    def finish(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, vm_rss_kib(self.pid))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def measure_upload(
    served: Served, uploader: Uploader, path: Path, step: int, sample_rss: bool
) -> tuple[float, dict[str, float], dict[str, float]]:
    """Seconds of one upload; the CPU seconds the coordinator and this client spent on it;
    the coordinator's RSS before it and at its peak (KiB) when `sample_rss`."""
    pid = served.process.pid
    sampler = RssPeak(pid) if sample_rss else None
    idle = vm_rss_kib(pid)
    if sampler is not None:
        sampler.start()
    coord0, client0 = cpu_s(pid), time.process_time()
    seconds = uploader.upload(path, step)
    cpu = {
        "coordinator_cpu_s": cpu_s(pid) - coord0,
        "client_cpu_s": time.process_time() - client0,
        "seconds": seconds,
    }
    mem: dict[str, float] = {}
    if sampler is not None:
        mem = {"idle_kib": idle, "peak_kib": sampler.finish()}
    return seconds, cpu, mem


# --- Flower ---


def measure_flower(
    flower: FlowerDeployment, path: Path, size: int, r: int, sample_rss: bool, timeout_s: float
) -> tuple[float | None, dict[str, Any]]:
    """Seconds of the reply's SuperNode-to-SuperLink hop (None when it failed) and the record
    of the whole run; with `sample_rss`, the SuperLink's and SuperNode's RSS over the run."""
    digest = sha256_file(path)
    procs = {"superlink": flower.link.pid, "supernode": flower.node.pid} if sample_rss else {}
    samplers = {name: RssPeak(pid) for name, pid in procs.items()}
    idle = {name: sampler.peak for name, sampler in samplers.items()}
    for sampler in samplers.values():
        sampler.start()
    result = flower.transfer(path, digest, timeout_s)
    record: dict[str, Any] = {"size": size, "round": r + 1, **result}
    if samplers:
        record["memory"] = {
            name: {"idle_kib": idle[name], "peak_kib": sampler.finish()}
            for name, sampler in samplers.items()
        }
        for name, mem in record["memory"].items():
            growth = (mem["peak_kib"] - mem["idle_kib"]) / 1024
            print(f"round {r + 1} flower: {name} RSS growth {growth:.0f} MiB", file=sys.stderr)
    if "error" in result:
        print(f"round {r + 1} flower {size} MiB failed: {result['error']}", file=sys.stderr)
        return None, record
    check = result["check"]
    if not check["intact"] or check["bytes"] != path.stat().st_size:
        raise SystemExit(f"Flower delivered other bytes than {path.name}: {check}")
    return float(result["hop_s"]["big"]), record


# --- the run ---


@dataclasses.dataclass
class Rig:
    """What the rounds measure against, and what they collect."""

    sizes: list[int]
    coordinators: dict[str, Served]
    uploaders: dict[tuple[str, int], Uploader]
    port: int
    scratch: Path
    flower: FlowerDeployment | None
    flower_timeout_s: float
    times: dict[tuple[str, int], list[float]] = dataclasses.field(default_factory=dict)
    memory: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    flower_runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def configs(self) -> list[str]:
        return ["raw", "raw+fsync", *self.coordinators, *(["flower"] * bool(self.flower))]


def measure(rig: Rig, config: str, size: int, r: int, path: Path) -> float | None:
    """Seconds of one transfer of `path` by `config` (None if Flower failed)."""
    largest = size == max(rig.sizes)
    if config.startswith("raw"):
        return raw_copy(rig.port, path, config == "raw+fsync")
    if config == "flower":
        assert rig.flower is not None
        seconds, record = measure_flower(rig.flower, path, size, r, largest, rig.flower_timeout_s)
        rig.flower_runs.append(record)
        return seconds
    served, uploader = rig.coordinators[config], rig.uploaders[(config, size)]
    seconds, cpu, mem = measure_upload(served, uploader, path, r + 1, largest)
    rig.memory.append({"config": config, "size": size, "round": r + 1, **cpu, **mem})
    if mem:
        growth = (mem["peak_kib"] - mem["idle_kib"]) / 1024
        print(f"round {r + 1} {config}: RSS growth {growth:.0f} MiB", file=sys.stderr)
    return seconds


def one_round(r: int, rig: Rig) -> None:
    configs = rig.configs
    for size in rig.sizes:
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        # Both coordinators hold the same job, so one file is a checkpoint of either's unit;
        # step r + 1 gives each round new bytes.
        path = rig.scratch / f"{size}.safetensors"
        rig.uploaders[(next(iter(rig.coordinators)), size)].write(r + 1, path)
        done = {}
        for config in order:
            seconds = measure(rig, config, size, r, path)
            if seconds is not None:
                rig.times[(config, size)].append(seconds)
            done[config] = "failed" if seconds is None else f"{seconds:.2f}s"
        path.unlink(missing_ok=True)
        line = ", ".join(f"{c} {done[c]}" for c in configs)
        print(f"round {r + 1} {size} MiB: {line}", file=sys.stderr)


def start_flower(args: argparse.Namespace, root: Path) -> FlowerDeployment | None:
    if args.no_flower:
        return None
    if not (args.flower_venv / "bin" / "flower-superlink").exists():
        print(
            f"Flower not measured: no flower-superlink in {args.flower_venv}/bin "
            "(python3 -m venv .venv-flower && .venv-flower/bin/pip install flwr numpy)",
            file=sys.stderr,
        )
        return None
    flower = FlowerDeployment.start(args.flower_venv, root)
    print(f"flower: superlink pid {flower.link.pid}, supernode {flower.node.pid}", file=sys.stderr)
    return flower


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="tspace-transfer-", dir=args.tmp))
    coordinators: dict[str, Served] = {}
    flower: FlowerDeployment | None = None
    raw = subprocess.Popen(
        [sys.executable, "-c", RAW_SERVER, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert raw.stdout is not None
        port = int(raw.stdout.readline())
        coordinators["grpc+tls"] = start_coordinator(root, "tls", tls=True)
        if not args.no_plaintext:
            coordinators["grpc"] = start_coordinator(root, "plain", tls=False)
        flower = start_flower(args, root)
        channels = {size: channels_for(size * MIB) for size in sizes}
        uploaders = {
            (name, size): make_uploader(served, size, channels[size])
            for name, served in coordinators.items()
            for size in sizes
        }
        sizes_bytes = {}
        for size in sizes:  # the real size of a checkpoint at that model width
            probe = root / "probe.safetensors"
            uploaders[(next(iter(coordinators)), size)].write(0, probe)
            sizes_bytes[size] = probe.stat().st_size
            probe.unlink()
        rig = Rig(sizes, coordinators, uploaders, port, root, flower, args.flower_timeout)
        rig.times = {(c, s): [] for c in rig.configs for s in sizes}
        for r in range(args.rounds):
            one_round(r, rig)
        for uploader in uploaders.values():
            uploader.session.close()
    finally:
        if flower is not None:
            flower.close()
        for served in coordinators.values():
            stop(served.process)
        stop(raw)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result = summarize(sizes, sizes_bytes, channels, rig.times, rig.memory, args.rounds)
    if flower is not None:
        result["flower"] = summarize_flower(sizes, sizes_bytes, rig.flower_runs)
    return result


def summarize(
    sizes: list[int],
    sizes_bytes: dict[int, int],
    channels: dict[int, int],
    times: dict[tuple[str, int], list[float]],
    memory: list[dict[str, Any]],
    rounds: int,
) -> dict[str, Any]:
    rows = []
    for size in sizes:
        mbs = {
            c: sizes_bytes[size] / 1e6 / statistics.median(t) if t else None
            for (c, s), t in times.items()
            if s == size
        }
        rows.append(
            {
                "size_mib": size,
                "bytes": sizes_bytes[size],
                "block_out_channels": [channels[size], 2 * channels[size]],
                "mb_per_s": mbs,
                "seconds": {c: t for (c, s), t in times.items() if s == size},
            }
        )
    mem, cpu = {}, {}
    for config in sorted({m["config"] for m in memory}):
        mine = [m for m in memory if m["config"] == config and "peak_kib" in m]
        mem[config] = {
            "idle_mib": statistics.median(m["idle_kib"] for m in mine) / 1024,
            "peak_mib": max(m["peak_kib"] for m in mine) / 1024,
            "max_growth_mib": max(m["peak_kib"] - m["idle_kib"] for m in mine) / 1024,
        }
        # CPU seconds per wall second of the largest uploads: 1.0 is one core kept busy.
        cpu[config] = {
            who: statistics.median(m[f"{who}_cpu_s"] / m["seconds"] for m in mine)
            for who in ("coordinator", "client")
        }
    return {
        "rounds": rounds,
        "sizes": rows,
        "memory_largest_upload": mem,
        "cpu_per_wall_s_largest_upload": cpu,
        "uploads": memory,
    }


def fmt(value: float | None, spec: str) -> str:
    return "failed" if value is None else format(value, spec)


def print_table(result: dict[str, Any]) -> None:
    rows = result["sizes"]
    configs = list(rows[0]["mb_per_s"])
    coords = [c for c in configs if not c.startswith("raw") and c != "flower"]
    head = f"{'size':>9} " + "".join(f"{c + ' MB/s':>16}" for c in configs)
    head += "".join(f"{c + '/raw':>14}{c + '/raw+fsync':>20}" for c in coords)
    if "flower" in configs:
        head += "".join(f"{c + '/flower':>17}" for c in coords)
    print(f"median of {result['rounds']} rounds")
    print(head)
    for row in rows:
        mbs = row["mb_per_s"]
        line = f"{row['bytes'] / MIB:>5.0f} MiB " + "".join(
            f"{fmt(mbs[c], '.0f'):>16}" for c in configs
        )
        line += "".join(
            f"{mbs[c] / mbs['raw']:>14.2f}{mbs[c] / mbs['raw+fsync']:>20.2f}" for c in coords
        )
        if "flower" in configs:
            flower = mbs["flower"]
            line += "".join(f"{fmt(flower and mbs[c] / flower, '.1f'):>17}" for c in coords)
        print(line)
    for config, mem in result["memory_largest_upload"].items():
        print(
            f"{config}: coordinator RSS idle {mem['idle_mib']:.0f} MiB, peak {mem['peak_mib']:.0f} "
            f"MiB, growth {mem['max_growth_mib']:.0f} MiB during the largest upload"
        )
    for config, cpu in result["cpu_per_wall_s_largest_upload"].items():
        print(
            f"{config}: CPU s per s during the largest upload: coordinator "
            f"{cpu['coordinator']:.2f}, client {cpu['client']:.2f}"
        )
    if "flower" in result:
        print_flower(result["flower"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,256,1024", help="checkpoint sizes in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-plaintext", action="store_true", help="measure TLS only")
    parser.add_argument("--no-flower", action="store_true", help="do not measure Flower")
    parser.add_argument(
        "--flower-venv",
        type=Path,
        default=Path(__file__).resolve().parents[1] / ".venv-flower",
        help="a virtual environment with flwr and numpy (default: .venv-flower)",
    )
    parser.add_argument(
        "--flower-timeout", type=float, default=900.0, help="seconds for one Flower run"
    )
    parser.add_argument("--tmp", default=None, help="where the files go (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the folder (logs, blobs)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(args)
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
