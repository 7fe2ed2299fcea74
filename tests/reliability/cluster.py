"""Real tspace processes for the reliability tests: a coordinator, worker sites, and the audit
that ends every run (every unit done, every checkpoint verifies, nothing orphaned or doubled)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from coordinator.admin_client import admin_call
from coordinator.config import CONFIG_FILE, init_dir
from tspace_core.blobs import BlobStore
from tspace_core.catalogue import Catalogue
from tspace_core.proto.tspace.v1 import admin_pb2
from tspace_core.verification import checkpoint_problems

T = TypeVar("T")
SERVE = [sys.executable, "-m", "coordinator", "serve"]
JOIN = [sys.executable, "-c", "from worker.cli import main; main()", "join"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], T], timeout: float, what: str, every: float = 0.1) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class Cluster:
    """A coordinator folder served on a fixed loopback port (so a restart comes back where the
    workers look for it) and worker sites as `tspace-worker join` processes, all logging under
    `root/logs`."""

    root: Path
    catalogue_url: str | None = None
    lease_ttl_s: float = 4.0
    port: int = field(default_factory=free_port)
    server: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: int = 0

    def __post_init__(self) -> None:
        self.folder = self.root / "coord"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        init_dir(self.folder, self.catalogue_url)
        config = json.loads((self.folder / CONFIG_FILE).read_text())
        config["lease_ttl_s"] = self.lease_ttl_s
        (self.folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        self.catalogue_url = config["catalogue_url"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- the coordinator ---------------------------------------------------------------------

    def start_coordinator(self) -> None:
        """Serve the folder and wait until it answers."""
        log = (self.logs / "coordinator.log").open("ab")
        command = [*SERVE, str(self.folder), "--listen", self.address]
        self.server = subprocess.Popen(command, stdout=log, stderr=log)
        log.close()
        wait_until(self._answers, 90, "the coordinator to serve")

    def _answers(self) -> bool:
        assert self.server is not None
        if self.server.poll() is not None:
            raise AssertionError(f"the coordinator exited with {self.server.returncode}")
        try:
            admin_call(self.folder, "ListJobs", admin_pb2.ListJobsRequest())
        except Exception:
            return False
        return True

    def kill_coordinator(self) -> None:
        """SIGKILL: no shutdown of any kind runs."""
        assert self.server is not None
        self.server.send_signal(signal.SIGKILL)
        self.server.wait(30)

    def restart_coordinator(self) -> None:
        self.restarts += 1
        self.start_coordinator()

    def admin(self, method: str, request: object) -> Any:
        return admin_call(self.folder, method, request)

    def create_job(self, spec_toml: str) -> None:
        self.admin("CreateJob", admin_pb2.CreateJobRequest(spec_toml=spec_toml))

    # -- worker sites ------------------------------------------------------------------------

    def start_worker(
        self, site: str, *extra: str, via: str | None = None
    ) -> subprocess.Popen[bytes]:
        """A worker process for `site`, reaching the coordinator directly or `via` an address
        (a proxy's); it registers with a fresh token on its first start."""
        state = self.root / "sites" / site
        target = via or self.address
        args = ["--coordinator", target, "--threads", "1", "--state-dir", str(state)]
        if not (state / "identity.json").exists():
            token = self.admin("Enroll", admin_pb2.EnrollRequest(site=site)).token
            args += ["--token", token]
        args += ["--ca", str(self.folder / "tls" / "ca.crt"), *extra]
        log = (self.logs / f"{site}.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        worker = subprocess.Popen([*JOIN, *args], stdout=log, stderr=log, env=env)
        log.close()
        self.workers[site] = worker
        return worker

    def kill_worker(self, site: str) -> None:
        self.workers[site].send_signal(signal.SIGKILL)
        self.workers[site].wait(30)

    def worker_log(self, site: str) -> str:
        return (self.logs / f"{site}.log").read_text(errors="replace")

    def wait_workers(self, timeout: float) -> dict[str, int]:
        """Wait for every worker to exit; their exit codes."""
        deadline = time.monotonic() + timeout
        codes = {}
        for site, worker in self.workers.items():
            codes[site] = worker.wait(max(deadline - time.monotonic(), 1))
        return codes

    def stop(self) -> None:
        for worker in self.workers.values():
            if worker.poll() is None:
                worker.kill()
                worker.wait(30)
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()

    # -- reading the outcome -----------------------------------------------------------------

    @contextmanager
    def catalogue(self) -> Iterator[Catalogue]:
        assert self.catalogue_url is not None
        catalogue = Catalogue(self.catalogue_url)
        try:
            yield catalogue
        finally:
            catalogue.close()

    def blobs(self) -> BlobStore:
        return BlobStore(self.folder / "blobs")

    def logs_with_tracebacks(self) -> list[str]:
        return [p.name for p in self.logs.iterdir() if "Traceback" in p.read_text(errors="replace")]


@dataclass(frozen=True)
class Audit:
    """What the end-of-run audit found; `problems` is empty when every invariant holds."""

    problems: list[str]
    checkpoints: int
    requeues: int
    ensembles: list[str]


def audit(cluster: Cluster, job: str) -> Audit:
    """Every unit done, an ensemble registered, every registered checkpoint verifies (digest,
    size, signature, statement), each registered once, every blob belongs to a row or a job's
    shards (no orphans), no partial uploads left of ended leases, and every requeue explained
    by an event."""
    problems: list[str] = []
    store = cluster.blobs()
    with cluster.catalogue() as catalogue:
        units = catalogue.units(job)
        problems += [f"unit {u.unit} is {u.status}" for u in units if u.status != "done"]
        rows = catalogue.list_checkpoints(job=job)
        digests = Counter(r.sha256 for r in rows)
        problems += [
            f"checkpoint {d[:12]} registered {n} times" for d, n in digests.items() if n > 1
        ]
        steps = Counter((r.unit, r.step, r.attempt) for r in rows)
        problems += [
            f"unit/step/attempt {k} registered {n} times" for k, n in steps.items() if n > 1
        ]
        for record in rows:
            problems += [
                f"unit {record.unit} step {record.step}: {p}"
                for p in checkpoint_problems(record, store.path(record.sha256))
                if record.in_use
            ]
        shards = {s.sha256 for j in catalogue.list_jobs() for s in j.shards}
        known = {r.sha256 for r in catalogue.list_checkpoints()} | shards
        problems += [f"orphan blob {d[:12]}" for d in store.digests() if d not in known]
        leases_open = {u.lease_id for u in units if u.lease_id}
        problems += [f"unit {u.unit} still leased" for u in units if u.lease_id]
        problems += [
            f"partial upload {k} left behind"
            for k in store.partial_keys()
            if k.split(".", 1)[0] not in leases_open
        ]
        ensembles = [e.name for e in catalogue.list_ensembles() if e.job == job]
        if not ensembles:
            problems.append(f"no ensemble registered for {job}")
        events = catalogue.events(limit=100_000)
        requeues = [e for e in events if e.job == job and "requeued" in e.message]
        attempts = sum(u.attempts for u in units)
        # Each lease beyond a unit's first was granted because an earlier one ended, and each
        # ending (expiry, failure, cancellation, reset) logs an event naming the unit.
        endings = [e for e in events if e.job == job and e.kind.startswith("lease_")]
        if attempts - len(units) > len(endings):
            problems.append(
                f"{attempts - len(units)} re-leases, {len(endings)} lease events to explain them"
            )
    return Audit(problems, len(rows), len(requeues), ensembles)
