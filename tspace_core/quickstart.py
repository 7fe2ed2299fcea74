"""`tspace quickstart`: the whole system on this machine — a coordinator, workers as separate
processes over real gRPC, the digits job, a registered ensemble and a sample grid."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import grpc

from tspace_core.errors import TspaceError
from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc
from tspace_core.rpc import ADMIN_HEADER, ChannelSecurity, open_channel

MARKER = "quickstart.json"
START_TIMEOUT_S = 60.0


def example_job() -> str:
    return resources.files("tspace_core.examples").joinpath("digits.toml").read_text()


def with_steps(spec: str, steps: int | None) -> str:
    """The example with its per-unit step count replaced (for a quicker run)."""
    if steps is None:
        return spec
    changed, n = re.subn(r"(?m)^steps = \d+", f"steps = {steps}", spec)
    every, _ = re.subn(
        r"(?m)^checkpoint_every = \d+", f"checkpoint_every = {max(steps // 3, 1)}", changed
    )
    if n != 1:
        raise TspaceError("the example job has no single `steps = N` line to override")
    return every


def prepare_dir(folder: Path) -> None:
    """A fresh folder; a previous quickstart's folder is replaced, anything else is refused."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise TspaceError(
                f"{folder} exists and is not a quickstart folder; choose another with --dir"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"created": time.time()}))


@dataclass
class Processes:
    """Child processes, each logging to its own file; all are ended on exit."""

    logs: Path
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("wb")
        self.children[name] = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )

    def failed(self) -> str | None:
        for name, p in self.children.items():
            code = p.poll()
            if code not in (None, 0):
                return f"{name} exited with status {code}; see {self.logs / (name + '.log')}"
        return None

    def stop(self, timeout: float = 10.0) -> None:
        for p in self.children.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.children.values():
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def wait_for_file(path: Path, processes: Processes, timeout: float = START_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if problem := processes.failed():
            raise TspaceError(problem)
        time.sleep(0.1)
    raise TspaceError(f"the coordinator did not start within {timeout:.0f} s")


class Admin:
    """The few admin calls the quickstart makes."""

    def __init__(self, address: str, credential: str, security: ChannelSecurity) -> None:
        self.channel = open_channel(address, security)
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.metadata = ((ADMIN_HEADER, credential),)

    def call(self, method: str, request: object, timeout: float = 120.0) -> object:
        try:
            return getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise TspaceError(f"coordinator: {exc.details()} ({exc.code().name})") from None

    def snapshot(self) -> admin_pb2.StatusSnapshot:
        stream = self.call("Status", admin_pb2.StatusRequest(interval_s=0))
        return next(iter(stream))  # type: ignore[call-overload]

    def close(self) -> None:
        self.channel.close()


@dataclass(frozen=True)
class QuickstartResult:
    folder: Path
    address: str
    job: str
    ensemble: str
    seconds: float
    security: ChannelSecurity  # TLS pinned to the coordinator's CA


def run(
    folder: Path,
    processes: Processes,
    workers: int,
    steps: int | None,
    show: Callable[[admin_pb2.StatusSnapshot], None],
    threads: int | None = None,
) -> tuple[QuickstartResult, Admin]:
    """Start everything and train the example to a registered ensemble.

    Returns the admin connection; the caller samples, then stops `processes` (also on error).
    """
    started = time.perf_counter()
    prepare_dir(folder)
    coord_dir = folder / "coordinator"
    init = subprocess.run(
        python_module("coordinator", "init", str(coord_dir)), capture_output=True, text=True
    )
    if init.returncode != 0:
        raise TspaceError(f"tspace-coord init failed: {init.stderr.strip()[-2000:]}")
    processes.start(
        "coordinator",
        python_module("coordinator", "serve", str(coord_dir), "--listen", "127.0.0.1:0"),
    )
    address = wait_for_file(coord_dir / "address", processes)
    credential = (coord_dir / "admin.credential").read_text().strip()
    # The coordinator serves TLS, as it does by default; everything here pins its CA.
    ca_file = coord_dir / "tls" / "ca.crt"
    security = ChannelSecurity(ca_file.read_bytes())
    admin = Admin(address, credential, security)
    job_file = folder / "digits.toml"
    job_file.write_text(with_steps(example_job(), steps))
    job = admin.call(
        "CreateJob",
        admin_pb2.CreateJobRequest(spec_toml=job_file.read_text(), base_dir=str(folder.resolve())),
    )
    per_worker = threads or max(1, (os.cpu_count() or 1) // workers)
    for i in range(workers):
        token = admin.call("Enroll", admin_pb2.EnrollRequest(site=f"site-{i}")).token  # type: ignore[attr-defined]
        processes.start(
            f"worker-{i}",
            python_module(
                "worker",
                "join",
                "--coordinator",
                address,
                "--token",
                token,
                "--ca",
                str(ca_file),
                "--state-dir",
                str(folder / "workers" / f"site-{i}"),
                "--threads",
                str(per_worker),
            ),
        )
    name = job.name  # type: ignore[attr-defined]
    while True:
        snapshot = admin.snapshot()
        show(snapshot)
        state = next((j for j in snapshot.jobs if j.name == name), None)
        if state is not None and state.status == "done":
            break
        if state is not None and (state.status == "failed" or state.units_failed):
            raise TspaceError(
                f"job {name}: {state.units_failed} unit(s) failed after every attempt; "
                f"see the logs in {processes.logs}"
            )
        if problem := processes.failed():
            raise TspaceError(problem)
        time.sleep(1.0)
    seconds = time.perf_counter() - started
    result = QuickstartResult(folder, address, name, f"{name}:final", seconds, security)
    return result, admin
