"""Network faults between sites: two worker sites in network namespaces of their own, each
joined to a hub namespace by a veth pair, reach the coordinator in the hub through a fault proxy
(200 +- 50 ms each way, a bandwidth cap, random resets); one site goes through a blackhole, the
other's link is cut for 30 s. The job completes, and every registration is single and sound.

Run it alone, with its figures: python -m pytest tests/reliability/test_network.py -m network -s
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from faultproxy import Faults, ProxyProcess, ProxyStats
from netns import Network, unavailable

from coordinator.config import CONFIG_FILE, hash_secret, init_dir, new_secret
from coordinator.jobs import create_job
from tspace_core.blobs import BlobStore
from tspace_core.catalogue import Catalogue
from tspace_core.catalogue.errors import CatalogueError
from tspace_core.catalogue.records import LEASE_EXPIRED
from tspace_core.verification import checkpoint_problems

pytestmark = pytest.mark.network

T = TypeVar("T")
# tiny_job trains 4 steps with a checkpoint every 2: a unit uploads two ~10 MB checkpoints, about
# 5 s at the capped rate, so the job is still training when the faults hit.
JOB, UNITS, STEPS = "net", 6, 4
SITES = ("east", "west")
PORT = 7443  # the coordinator on the hub's loopback, each proxy on the hub's end of a link
LEASE_TTL_S = 15.0  # longer than the blackhole, shorter than the cut
BLACKHOLE_S, CUT_S = 5.0, 30.0
LINK = Faults(delay_s=0.2, jitter_s=0.05, bytes_per_s=4_000_000)
RESET_PROBABILITY = 0.002  # per 64 KiB chunk: a few resets over the run
WORKER_DEADLINE_S = 300.0


def wait_until(check: Callable[[], T], timeout: float, what: str, every: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return result


@pytest.fixture
def network() -> Iterator[Network]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    with Network(SITES) as net:
        yield net


@dataclass
class Deployment:
    """The coordinator and the proxies in the hub, a worker per site; every process logs under
    root/logs and is stopped by stop()."""

    net: Network
    root: Path
    coordinator: subprocess.Popen[bytes] | None = None
    proxies: dict[str, ProxyProcess] = field(default_factory=dict)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder, self.logs = self.root / "coord", self.root / "logs"
        self.logs.mkdir(parents=True)
        hub_ips = [link.hub_ip for link in self.net.links.values()]
        init_dir(self.folder, hosts=hub_ips)  # the certificate names the addresses sites dial
        config = json.loads((self.folder / CONFIG_FILE).read_text())
        config["lease_ttl_s"] = LEASE_TTL_S
        (self.folder / CONFIG_FILE).write_text(json.dumps(config))
        self.catalogue = Catalogue(config["catalogue_url"])

    def _start(self, netns: str, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.logs / log).open("ab") as out:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            command = self.net.command(netns, argv)
            return subprocess.Popen(command, stdout=out, stderr=out, env=env)

    def prepare(self, spec: str) -> dict[str, str]:
        """The job and a join token per site, recorded before the coordinator serves (as its
        admin service would), so the workers can start alongside it; the tokens."""
        now = time.time()
        create_job(self.catalogue, BlobStore(self.folder / "blobs"), spec, None, now)
        tokens = {site: new_secret() for site in SITES}
        for site, token in tokens.items():
            self.catalogue.add_token(hash_secret(token), site, now + 3600, now)
        return tokens

    def start_hub(self) -> None:
        """Serve over TLS on the hub's loopback, and a proxy per site on the hub's end of its
        link; the workers' first calls are retried until the coordinator answers."""
        serve = ["-m", "coordinator", "serve", str(self.folder), "--listen", f"127.0.0.1:{PORT}"]
        self.coordinator = self._start(self.net.hub, [sys.executable, *serve], "coordinator.log")
        for i, (site, link) in enumerate(self.net.links.items()):
            proxy = ProxyProcess(
                self.root / f"proxy-{site}",
                f"{link.hub_ip}:{PORT}",
                f"127.0.0.1:{PORT}",
                replace(LINK, seed=i),
                prefix=self.net.command(self.net.hub, []),
            )
            self.proxies[site] = proxy.start()

    def start_worker(self, site: str, token: str) -> None:
        link = self.net.link(site)
        join = ["-m", "worker", "join", "--coordinator", f"{link.hub_ip}:{PORT}"]
        join += ["--token", token, "--ca", str(self.folder / "tls" / "ca.crt")]
        join += ["--threads", "1", "--state-dir", str(self.root / "sites" / site)]
        self.workers[site] = self._start(link.netns, [sys.executable, *join], f"{site}.log")

    def worker_id(self, site: str) -> str | None:
        identity = self.root / "sites" / site / "identity.json"
        return json.loads(identity.read_text())["worker_id"] if identity.exists() else None

    def leases(self, site: str, fresh_s: float | None = None) -> list[Any]:
        """The units `site` holds a lease on whose final checkpoint is not registered yet; with
        `fresh_s`, only those whose newest checkpoint was registered in the last fresh_s s."""
        worker, now = self.worker_id(site), time.time()
        return [
            u
            for u in self.catalogue.units(JOB)
            if u.status == "leased"
            and u.worker_id == worker
            and (u.newest_step or 0) < u.total_steps
            and (fresh_s is None or now - (u.newest_checkpoint_at or 0.0) < fresh_s)
        ]

    def log(self, name: str) -> str:
        path = self.logs / name
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> dict[str, ProxyStats]:
        for process in [*self.workers.values(), self.coordinator]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(30)
        stats = {site: proxy.stop() for site, proxy in self.proxies.items()}
        self.catalogue.close()
        return stats


@pytest.fixture
def deployment(network: Network, tmp_path: Path) -> Iterator[Deployment]:
    deployment = Deployment(network, tmp_path)
    try:
        yield deployment
    finally:
        deployment.stop()


def inject_faults(d: Deployment) -> dict[str, Any]:
    """Resets once both sites have joined; a blackhole on east while it uploads; west's link
    down for CUT_S while it uploads, and meanwhile one reset of all east's connections."""
    wait_until(lambda: all(d.worker_id(s) for s in SITES), 180, "both sites to join")
    for proxy in d.proxies.values():  # a lost Register answer would spend the token for nothing
        proxy.set_faults(replace(proxy.faults, reset_probability=RESET_PROBABILITY))
    # Mid-unit: its first checkpoint is registered, the last one is on its way.
    wait_until(lambda: [u for u in d.leases("east") if u.newest_step], 120, "east mid-unit")
    d.proxies["east"].blackhole(True)
    time.sleep(BLACKHOLE_S)
    d.proxies["east"].blackhole(False)
    # Just after one of west's checkpoints registered, with the final one seconds away. (A cut
    # between a final upload and its CompleteUnit leaves a unit whose next lease resumes at the
    # last step and trains nothing; tspace-worker then gives that lease up, and the unit fails
    # after max_attempts. That case is not this scenario's.)
    held = wait_until(lambda: d.leases("west", fresh_s=1.0), 120, "west mid-unit", every=0.05)
    d.net.set_link("west", up=False)
    cut_at = time.monotonic()
    try:
        units = d.catalogue.units(JOB)
        # West's lease holds the job open until it expires, so east is still connected.
        time.sleep(LEASE_TTL_S / 2)
        d.proxies["east"].reset_all()
        time.sleep(max(CUT_S - (time.monotonic() - cut_at), 0.0))
    finally:
        d.net.set_link("west", up=True)
    return {
        "cut_lease": held[0].lease_id,
        "cut_ended": time.time(),
        "done_when_cut": sum(u.status == "done" for u in units),
        "done_after_cut": sum(u.status == "done" for u in d.catalogue.units(JOB)),
    }


def registration_problems(catalogue: Catalogue, store: BlobStore) -> list[str]:
    """Every unit done with a final checkpoint in <job>:final; every checkpoint row single (one
    per digest and per unit, step and attempt) and sound (blob present, digest, signature)."""
    problems = [f"unit {u.unit} is {u.status}" for u in catalogue.units(JOB) if u.status != "done"]
    rows = catalogue.list_checkpoints(job=JOB)
    for what, counts in (
        ("digest", Counter(r.sha256 for r in rows)),
        ("unit/step/attempt", Counter((r.unit, r.step, r.attempt) for r in rows)),
    ):
        problems += [f"{what} {k} registered {n} times" for k, n in counts.items() if n > 1]
    for r in rows:
        problems += [
            f"unit {r.unit} step {r.step}: {p}"
            for p in checkpoint_problems(r, store.path(r.sha256))
        ]
    try:
        ensemble = catalogue.get_ensemble(f"{JOB}:final")
    except CatalogueError as exc:
        return [*problems, str(exc)]
    members = {m.unit: m.checkpoint for m in ensemble.members}
    if sorted(members) != list(range(UNITS)):
        problems.append(f"{JOB}:final covers units {sorted(members)}")
    problems += [
        f"{JOB}:final member of unit {u} is step {c.step}, final={c.final}"
        for u, c in members.items()
        if not (c.final and c.step == STEPS)
    ]
    return problems


BACK = ("leased unit", "given up", "completed", "resuming the upload", "no work left")


def log_lines(text: str) -> Iterator[tuple[float, str]]:
    """(time, line) for each line of a worker's log that starts with its timestamp."""
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            yield datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp(), line


def figures(d: Deployment, faults: dict[str, Any], stats: dict[str, ProxyStats]) -> dict:
    """What the run measured, from the catalogue's events and rows and the proxies' counters."""
    events = [e for e in d.catalogue.events(limit=100_000) if e.job == JOB or e.worker_id]
    back = [
        t
        for t, line in log_lines(d.log("west.log"))
        if t > faults["cut_ended"] and any(word in line for word in BACK)
    ]
    leased = [e.time for e in events if e.kind == "unit_leased"]
    done = [e.time for e in events if e.kind == "job_done"]
    rows = d.catalogue.list_checkpoints(job=JOB)
    return {
        "job_s": round(max(done) - min(leased), 1) if done and leased else None,
        "requeues": sum("requeued" in e.message for e in events),
        "leases_expired": sum(e.kind == "lease_expired" for e in events),
        "west_back_after_link_up_s": round(min(back) - faults["cut_ended"], 1) if back else None,
        "checkpoints": len(rows),
        "unit_steps_registered_twice": sum(
            n > 1 for n in Counter((r.unit, r.step) for r in rows).values()
        ),
        "units_done_when_cut": faults["done_when_cut"],
        "units_done_after_cut": faults["done_after_cut"],
        **{f"{site}_proxy": vars(s) for site, s in stats.items()},
    }


def test_a_job_survives_delay_resets_a_blackhole_and_a_cut_site(
    deployment: Deployment, tiny_job: Any
) -> None:
    d, started = deployment, time.monotonic()
    tokens = d.prepare(tiny_job(JOB, UNITS))
    d.start_hub()
    for site in SITES:
        d.start_worker(site, tokens[site])
    faults = inject_faults(d)
    for site, worker in d.workers.items():
        code = worker.wait(WORKER_DEADLINE_S)
        assert code == 0, f"{site} exited with {code}:\n{d.log(f'{site}.log')[-3000:]}"
    store = BlobStore(d.folder / "blobs")
    problems = registration_problems(d.catalogue, store)
    with contextlib.suppress(AssertionError):  # the reaper sweeps those of ended leases
        wait_until(lambda: not store.partial_keys(), 15, "partial uploads to be swept")
    leftover = store.partial_keys()
    job, cut_lease = d.catalogue.get_job(JOB), d.catalogue.get_lease(faults["cut_lease"])
    stats = {site: proxy.stop() for site, proxy in d.proxies.items()}
    measured = {"test_s": round(time.monotonic() - started, 1), **figures(d, faults, stats)}
    print("\nnetwork faults:", json.dumps(measured, indent=1))

    assert job.status == "done" and not problems, problems
    assert not leftover, f"partial uploads of ended leases left behind: {leftover}"
    assert faults["done_when_cut"] < UNITS, "the job finished before the cut: make it longer"
    assert cut_lease.status == LEASE_EXPIRED, f"west's lease outlived the cut: {cut_lease}"
    assert stats["east"].blackholed >= 1 and stats["east"].resets >= 1
    assert all(s.bytes_up > 10_000_000 for s in stats.values())  # both sites uploaded through
    logs = ("coordinator.log", *(f"{s}.log" for s in SITES))
    tracebacks = {n: d.log(n)[-3000:] for n in logs if "Traceback" in d.log(n)}
    assert not tracebacks, tracebacks
