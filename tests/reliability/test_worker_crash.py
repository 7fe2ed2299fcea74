"""A worker killed with SIGKILL mid-unit: its lease expires, another worker resumes from the
newest verified checkpoint, the unit completes, and the steps trained twice are fewer than one
checkpoint interval. And a worker lost between its final upload and its completion report."""

from __future__ import annotations

import re
import time
from typing import Any

from cluster import Cluster, audit, wait_until

from tspace_core import serde
from tspace_core.data import load_dataset
from tspace_core.proto.tspace.v1 import admin_pb2, worker_pb2
from tspace_core.runner import make_trainer, model_config_for, save_unit_checkpoint
from worker.agent import UnitRun, WorkerOptions, resolve_assignment
from worker.client import Session
from worker.identity import join

LEASE_TTL_S = 3.0
INTERVAL = 100
STEPS = 400
JOB = f"""
name = "crash"
[states]
count = 1
[units]
partition = "single"
[model]
preset = "tiny"
[training]
steps = {STEPS}
batch_size = 8
checkpoint_every = {INTERVAL}
[data]
source = "digits"
"""


def _registered_steps(cluster: Cluster) -> list[int]:
    with cluster.catalogue() as catalogue:
        return sorted(c.step for c in catalogue.list_checkpoints(job="crash") if c.in_use)


def _written_steps(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"checkpoint at step (\d+) written", log)]


def test_a_killed_worker_loses_less_than_one_checkpoint_interval(cluster: Cluster) -> None:
    cluster.create_job(JOB)
    cluster.start_worker("a")
    # Kill just after a checkpoint past the first registers, while the unit is mid-way.
    wait_until(lambda: _registered_steps(cluster), 180, "a checkpoint from site a")
    seen = len(_registered_steps(cluster))
    wait_until(lambda: len(_registered_steps(cluster)) > seen, 120, "one more checkpoint")
    with cluster.catalogue() as catalogue:
        (before,) = catalogue.units("crash")
    cluster.kill_worker("a")
    killed_at = time.monotonic()
    assert before.status == "leased" and before.step < STEPS, "the unit must still be training"
    newest = _registered_steps(cluster)[-1]
    written = _written_steps(cluster.worker_log("a"))
    outbox = cluster.root / "sites" / "a" / "outbox"
    unsent = [int(p.stem.split("-")[1]) for p in outbox.glob("*/step-*.safetensors")]
    # Site a was at step k with newest written checkpoint w <= k < w + INTERVAL (it writes one
    # at every multiple of INTERVAL). What it had written was registered, so resuming from the
    # newest registered checkpoint redoes k - newest < INTERVAL steps.
    assert max(written + unsent) == newest, (written, unsent, newest)
    # The step site a last reported in a heartbeat is a lower bound on k.
    redone = (max(before.step - newest, 0), INTERVAL - 1)

    cluster.start_worker("b")
    assert cluster.wait_workers(240)["b"] == 0, cluster.worker_log("b")
    log_b = cluster.worker_log("b")
    resumed = re.findall(r"unit 0 resumes from step (\d+)", log_b)
    assert resumed == [str(newest)], log_b
    recovered_s = time.monotonic() - killed_at

    result = audit(cluster, "crash")
    assert result.problems == []
    with cluster.catalogue() as catalogue:
        events = [e for e in catalogue.events(limit=1000) if e.kind == "lease_expired"]
        (unit,) = catalogue.units("crash")
    assert len(events) == 1 and "unit requeued" in events[0].message
    assert unit.status == "done" and unit.attempts == 2
    assert cluster.logs_with_tracebacks() == []
    print(
        f"\nworker SIGKILL: resumed from step {newest}; steps redone in [{redone[0]}, {redone[1]}] "
        f"(checkpoint interval {INTERVAL}); unit done {recovered_s:.1f} s after the kill "
        f"(lease TTL {cluster.lease_ttl_s} s)"
    )


def test_a_unit_whose_completion_was_lost_is_completed_without_training(
    cluster: Cluster, tiny_job: Any
) -> None:
    """A site uploads its unit's final checkpoint and is gone before CompleteUnit gets through
    (a link cut, a crash). The next worker to lease the unit reports it done from that
    checkpoint instead of leasing, training nothing and giving it up until attempts run out."""
    cluster.create_job(tiny_job("lost", 1))
    token = cluster.admin("Enroll", admin_pb2.EnrollRequest(site="gone")).token
    ca = (cluster.folder / "tls" / "ca.crt").read_bytes()
    state = cluster.root / "sites" / "gone"
    identity, key, security = join(state, cluster.address, token, "cpu", ca)
    session = Session(cluster.address, identity.credential, security)
    try:
        response = session.call("AcquireUnit", worker_pb2.AcquireUnitRequest())
        a = serde.assignment_from_proto(response.assignment)
        job, _ = resolve_assignment(a)
        data = load_dataset(job.spec.data)
        config = model_config_for(job, data)
        trainer = make_trainer(job, a.unit, data, config, "cpu")
        while trainer.step < job.spec.training.steps:
            trainer.train_step()
        path = cluster.root / "final.safetensors"
        save_unit_checkpoint(trainer, job, a.unit, data, config, path)
        upload = UnitRun(session, identity, key, a, WorkerOptions(state))._signed(
            path, trainer.step, final=True
        )
        args = (a.lease_id, path, upload.sha256, upload.statement, upload.signature)
        assert session.upload(*args) is not None
    finally:
        session.close()  # ... and the site is gone: no CompleteUnit, no more heartbeats

    cluster.start_worker("b")
    assert cluster.wait_workers(120)["b"] == 0
    log = cluster.worker_log("b")
    assert "its final checkpoint is registered; completing it" in log, log
    assert "unit 0 completed" in log and "checkpoint at step" not in log, log
    with cluster.catalogue() as catalogue:
        (unit,) = catalogue.units("lost")
        ensemble = catalogue.get_ensemble("lost:final")
    assert unit.status == "done" and unit.attempts == 2
    assert [m.checkpoint.sha256 for m in ensemble.members] == [upload.sha256]
    assert audit(cluster, "lost").problems == []
