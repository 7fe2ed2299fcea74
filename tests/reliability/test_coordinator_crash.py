"""The coordinator killed with SIGKILL during training and again during a large upload, then
restarted on the same folder: the workers reconnect by themselves, the upload resumes from the
bytes the coordinator held (not from zero), nothing is registered twice and nothing is lost."""

from __future__ import annotations

import re
import time

from cluster import Cluster, audit, wait_until

LEASE_TTL_S = 10.0
INTERVAL, STEPS = 10, 30
# About 42 MB a checkpoint (weights, EMA and two Adam moments of a 2.6M-parameter U-Net), so an
# upload lasts long enough to be cut in the middle.
JOB = f"""
name = "restart"
[states]
count = 2
[units]
partition = "single"
[model]
preset = "tiny"
kwargs = {{ block_out_channels = [64, 128] }}
[training]
steps = {STEPS}
batch_size = 8
checkpoint_every = {INTERVAL}
[data]
source = "digits"
"""


def _registered(cluster: Cluster) -> int:
    with cluster.catalogue() as catalogue:
        return len(catalogue.list_checkpoints(job="restart"))


def _partial(cluster: Cluster, at_least: int) -> tuple[str, int] | None:
    """An upload in flight that holds at least `at_least` bytes: (its key, bytes held)."""
    for part in (cluster.folder / "blobs" / "uploads").glob("*.part"):
        try:
            size = part.stat().st_size
        except FileNotFoundError:
            continue
        if size >= at_least:
            return part.name.removesuffix(".part"), size
    return None


def test_coordinator_crashes_lose_nothing_and_uploads_resume(cluster: Cluster) -> None:
    cluster.create_job(JOB)
    cluster.start_worker("a")
    cluster.start_worker("b")

    # 1. Killed while both sites train (a checkpoint registered, none in flight).
    wait_until(lambda: _registered(cluster) >= 1 and not _partial(cluster, 1), 240, "training")
    cluster.kill_coordinator()
    down = time.monotonic()
    time.sleep(2.0)
    cluster.restart_coordinator()
    back_training = time.monotonic() - down

    # 2. Killed while a checkpoint streams in: more than 8 MiB held, not yet complete.
    key, held = wait_until(lambda: _partial(cluster, 8 << 20), 240, "an upload in flight", 0.005)
    cluster.kill_coordinator()
    part = cluster.folder / "blobs" / "uploads" / f"{key}.part"
    held = part.stat().st_size  # what survived the kill is what the coordinator still holds
    down = time.monotonic()
    time.sleep(2.0)
    cluster.restart_coordinator()
    back_upload = time.monotonic() - down

    codes = cluster.wait_workers(400)
    logs = {site: cluster.worker_log(site) for site in ("a", "b")}
    assert codes == {"a": 0, "b": 0}, logs
    sha = key.split(".", 1)[1]
    resumed = [
        (int(offset), int(size))
        for log in logs.values()
        for offset, size in re.findall(
            r"upload of step-\d+\.safetensors at byte (\d+) of (\d+)", log
        )
    ]
    sizes = {size for offset, size in resumed if offset == held}
    assert len(sizes) == 1, (held, resumed)
    (size,) = sizes

    result = audit(cluster, "restart")
    assert result.problems == []
    with cluster.catalogue() as catalogue:
        rows = catalogue.list_checkpoints(job="restart")
        units = catalogue.units("restart")
        expired = [e for e in catalogue.events(limit=1000) if e.kind == "lease_expired"]
    assert sha in {r.sha256 for r in rows}, "the interrupted upload was registered"
    # Nothing lost: every checkpoint each unit wrote is registered, once, in its one lease.
    for unit in units:
        steps = sorted(r.step for r in rows if r.unit == unit.unit)
        assert steps == list(range(INTERVAL, STEPS + 1, INTERVAL)), (unit.unit, steps)
        assert unit.attempts == 1
    assert expired == [], "the restarted coordinator gave every lease time to check in"
    assert cluster.logs_with_tracebacks() == []
    print(
        f"\ncoordinator SIGKILL: back serving {back_training:.1f} s after the kill in training, "
        f"{back_upload:.1f} s after the kill mid-upload; the upload resumed at byte {held:,} of "
        f"{size:,} ({size - held:,} bytes re-sent, not {size:,}); "
        f"{len(rows)} checkpoints registered once each, 0 leases expired"
    )
