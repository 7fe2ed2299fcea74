"""A chaos run: a real job trained by real worker processes while faults land at seeded random
times, then the audit of every invariant (tests/reliability/cluster.py `audit`).

    python tests/reliability/chaos.py --seed 7 --minutes 10 [--workers 3] [--units 12]
        [--catalogue sqlite|postgresql] [--json chaos.json] [--keep DIR]

Each site reaches the coordinator through a fault-injecting proxy of its own (faultproxy.py:
delay and jitter, random resets). The faults, drawn from a generator seeded by --seed: a
worker SIGKILLed (restarted a few seconds later), the coordinator SIGKILLed (restarted), a
site's link cut or blackholed for a while, every connection of a site reset, a registered
checkpoint's blob corrupted on disk, and, with a private PostgreSQL catalogue, the database
stopped hard and started again. Every kind lands at least once, the rest at random; faults stop
once the job is done. Then `checkpoints verify` runs over the catalogue: a corrupt blob it finds
is marked bad and its unit retrained, so the workers are started again until the job is done.
The run ends with the audit; the exit status is 1 if it found anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster import Audit, Cluster, audit, wait_until
from faultproxy import FaultProxy, Faults
from pgserver import PgServer

from coordinator.admin_client import AdminClient
from tspace_core.proto.tspace.v1 import admin_pb2

JOB_NAME = "chaos"
KINDS = ("kill_worker", "kill_coordinator", "cut", "blackhole", "resets", "corrupt", "database")


def job_spec(units: int, steps: int) -> str:
    return f"""
name = "{JOB_NAME}"
[states]
count = {units}
[units]
partition = "single"
[model]
preset = "tiny"
[training]
steps = {steps}
batch_size = 8
checkpoint_every = {max(steps // 6, 1)}
[data]
source = "digits"
"""


@dataclass(frozen=True)
class Settings:
    seed: int = 7
    seconds: float = 60.0  # faults are drawn over this span
    workers: int = 2
    units: int = 6
    steps: int = 240
    catalogue: str = "sqlite"  # or "postgresql": a private server the run may restart
    lease_ttl_s: float = 6.0


@dataclass
class Run:
    """What happened: each fault as (seconds into the run, kind, detail)."""

    faults: list[tuple[float, str, str]] = field(default_factory=list)
    worker_exits: Counter[int] = field(default_factory=Counter)
    restarts: int = 0
    verify_rounds: int = 0
    seconds: float = 0.0


def schedule(settings: Settings, kinds: tuple[str, ...]) -> list[tuple[float, str]]:
    """Every kind once, then one more at random per 15 s, at seeded random times."""
    rng = random.Random(settings.seed)
    chosen = list(kinds) + [rng.choice(kinds) for _ in range(int(settings.seconds // 15))]
    times = sorted(rng.uniform(3.0, settings.seconds) for _ in chosen)
    rng.shuffle(chosen)
    return list(zip(times, chosen, strict=True))


class Chaos:
    """Runs the job and lands the faults; `database` is a PgServer when the catalogue is a
    private PostgreSQL server."""

    def __init__(self, settings: Settings, root: Path, database: PgServer | None = None) -> None:
        self.settings, self.database = settings, database
        self.rng = random.Random(settings.seed + 1)
        url = database.create_database("chaos") if database is not None else None
        self.cluster = Cluster(root, catalogue_url=url, lease_ttl_s=settings.lease_ttl_s)
        self.proxies: dict[str, FaultProxy] = {}
        self.run = Run()
        self.started = time.monotonic()

    def sites(self) -> list[str]:
        return [f"site-{i}" for i in range(self.settings.workers)]

    def start(self) -> None:
        self.cluster.start_coordinator()
        self.cluster.create_job(job_spec(self.settings.units, self.settings.steps))
        for i, site in enumerate(self.sites()):
            faults = Faults(delay_s=0.03, jitter_s=0.02, reset_probability=2e-4, seed=i)
            self.proxies[site] = FaultProxy("127.0.0.1:0", self.cluster.address, faults).start()
            self.start_worker(site)

    def start_worker(self, site: str) -> None:
        self.cluster.start_worker(site, via=self.proxies[site].address)

    def note(self, kind: str, detail: str) -> None:
        at = time.monotonic() - self.started
        self.run.faults.append((round(at, 1), kind, detail))
        print(f"{at:7.1f} s  {kind:16s} {detail}", flush=True)

    # -- faults --------------------------------------------------------------------------------

    def kill_worker(self) -> None:
        running = [s for s, w in self.cluster.workers.items() if w.poll() is None]
        if not running:
            return
        site = self.rng.choice(running)
        self.cluster.kill_worker(site)
        self.note("kill_worker", site)
        time.sleep(self.rng.uniform(1.0, 4.0))
        self.start_worker(site)

    def kill_coordinator(self) -> None:
        self.cluster.kill_coordinator()
        down = self.rng.uniform(1.0, 5.0)
        self.note("kill_coordinator", f"down {down:.1f} s")
        time.sleep(down)
        self.cluster.restart_coordinator()

    def span(self) -> float:
        """How long a link stays cut or blackholed: up to 15 s, less in a short run."""
        return self.rng.uniform(3.0, min(15.0, max(self.settings.seconds / 5, 4.0)))

    def cut(self) -> None:
        site, span = self.rng.choice(self.sites()), self.span()
        self.note("cut", f"{site} for {span:.1f} s")
        self.proxies[site].cut(True)
        time.sleep(span)
        self.proxies[site].cut(False)

    def blackhole(self) -> None:
        site, span = self.rng.choice(self.sites()), self.span()
        self.note("blackhole", f"{site} for {span:.1f} s")
        self.proxies[site].blackhole(True)
        time.sleep(span)
        self.proxies[site].blackhole(False)

    def resets(self) -> None:
        site = self.rng.choice(self.sites())
        self.note("resets", f"{site}: {self.proxies[site].reset_all()} connection(s)")

    def corrupt(self) -> None:
        with self.cluster.catalogue() as catalogue:
            rows = [c for c in catalogue.list_checkpoints(job=JOB_NAME) if c.in_use]
        if not rows:
            self.note("corrupt", "no checkpoint yet")
            return
        victim = self.rng.choice(rows)
        path = self.cluster.blobs().path(victim.sha256)
        data = bytearray(path.read_bytes())
        data[self.rng.randrange(len(data))] ^= 0xFF
        path.write_bytes(bytes(data))
        self.note("corrupt", f"unit {victim.unit} step {victim.step} ({victim.sha256[:12]})")

    def database_restart(self) -> None:
        if self.database is None:
            return
        down = self.rng.uniform(1.0, 5.0)
        self.note("database", f"PostgreSQL stopped hard, down {down:.1f} s")
        self.database.stop("immediate")
        time.sleep(down)
        self.database.start()

    # -- the run -------------------------------------------------------------------------------

    def job_done(self) -> bool:
        with self.cluster.catalogue() as catalogue:
            return all(u.status == "done" for u in catalogue.units(JOB_NAME))

    def supervise(self) -> None:
        """Restart a worker that exited while there is work: a worker's exit is a fact to
        record, and the job must still finish."""
        for site, worker in self.cluster.workers.items():
            code = worker.poll()
            if code is not None and code != -9 and not self.job_done():
                self.run.worker_exits[code] += 1
                self.note("worker_exit", f"{site} exited {code}; restarted")
                self.start_worker(site)

    def inject(self) -> None:
        kinds = KINDS if self.database is not None else KINDS[:-1]
        handlers: dict[str, Callable[[], None]] = {
            "kill_worker": self.kill_worker,
            "kill_coordinator": self.kill_coordinator,
            "cut": self.cut,
            "blackhole": self.blackhole,
            "resets": self.resets,
            "corrupt": self.corrupt,
            "database": self.database_restart,
        }
        for at, kind in schedule(self.settings, kinds):
            while time.monotonic() - self.started < at:
                self.supervise()
                time.sleep(0.2)
            if self.job_done():
                self.note("stop", f"the job is done; {kind} and later faults not injected")
                return
            handlers[kind]()

    def finish(self, timeout: float) -> None:
        """Wait for the job, then verify every checkpoint: a corrupt one that a unit's completion
        rests on sends the unit back to training, so repeat until the job stays done."""
        deadline = time.monotonic() + timeout
        while True:
            while not self.job_done():
                if time.monotonic() > deadline:
                    raise AssertionError("the job did not finish in time")
                self.supervise()
                time.sleep(0.5)
            # Nothing is left, so every worker exits; verify only then, or one still on its way
            # out would miss units the verification sends back to training.
            codes = self.cluster.wait_workers(120)
            self.run.worker_exits.update(c for c in codes.values() if c not in (0, -9))
            self.run.verify_rounds += 1
            request = admin_pb2.VerifyCheckpointsRequest(job=JOB_NAME)
            with AdminClient(self.cluster.folder) as admin:
                bad = [v for v in admin.stream("VerifyCheckpoints", request) if not v.ok]
            if bad:
                self.note("verify", f"{len(bad)} checkpoint(s) found corrupt, or marked bad before")
            if self.job_done():  # nothing the job's ensemble rests on was found corrupt
                break
            for site in self.sites():
                self.start_worker(site)
        # The reaper drops partial uploads of ended leases every few seconds.
        wait_until(lambda: not self.cluster.blobs().partial_keys(), 60, "the partials to go")
        self.run.seconds = time.monotonic() - self.started

    def stop(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        self.cluster.stop()


@contextlib.contextmanager
def chaos(settings: Settings, root: Path) -> Iterator[Chaos]:
    with contextlib.ExitStack() as stack:
        database = None
        if settings.catalogue == "postgresql":
            database = stack.enter_context(PgServer())
            database.start()
        run = Chaos(settings, root, database)
        stack.callback(run.stop)
        yield run


def run_chaos(settings: Settings, root: Path, timeout: float = 3600) -> tuple[Run, Audit]:
    with chaos(settings, root) as c:
        c.start()
        c.inject()
        c.finish(timeout)
        result = audit(c.cluster, JOB_NAME)
        traces = c.cluster.logs_with_tracebacks()
        if traces:
            result.problems.append(f"tracebacks in {traces}")
        return c.run, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--minutes", type=float, default=10.0, help="span the faults land in")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--units", type=int, default=0, help="default: 5 per minute of faults")
    parser.add_argument("--catalogue", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--json", type=Path, help="write the run and the audit here")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = parser.parse_args(argv)
    units = args.units or max(int(args.minutes * 5), 2)
    settings = Settings(
        seed=args.seed,
        seconds=args.minutes * 60,
        workers=args.workers,
        units=units,
        steps=max(240, int(args.minutes * 60)),
        catalogue=args.catalogue,
    )
    with contextlib.ExitStack() as stack:
        root = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        run, result = run_chaos(settings, root)
    kinds = Counter(kind for _, kind, _ in run.faults)
    print(f"\n{len(run.faults)} faults: {dict(kinds)}; done in {run.seconds:.0f} s")
    print(f"checkpoints {result.checkpoints}, requeues {result.requeues}, {result.ensembles}")
    print("audit: " + ("clean" if not result.problems else "; ".join(result.problems)))
    if args.json:
        out = {"settings": asdict(settings), "run": asdict(run), "audit": asdict(result)}
        args.json.write_text(json.dumps(out, indent=2))
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
