"""The worker's loop: acquire a unit, get its data and resume point, train, upload, complete."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tspace_core import serde
from tspace_core.catalogue.records import CheckpointRecord
from tspace_core.checkpoint import load_checkpoint
from tspace_core.data import ImageDataset, load_shards
from tspace_core.errors import TspaceError
from tspace_core.fsio import atomic_write_bytes, sha256_file
from tspace_core.jobspec import Job, resolve, spec_from_dict
from tspace_core.proto.tspace.v1 import worker_pb2
from tspace_core.runner import make_trainer, model_config_for, save_unit_checkpoint
from tspace_core.signing import Statement, sign, verify
from worker.background import Heartbeat, Progress, Upload, Uploader
from worker.client import Session, wait_for_coordinator
from worker.identity import Identity

log = logging.getLogger("tspace.worker")


@dataclass(frozen=True)
class WorkerOptions:
    """How this worker trains: device, CPU threads, local data, where it keeps state."""

    state_dir: Path
    device: str = "cpu"
    data_dir: Path | None = None
    keep_alive: bool = False


@dataclass
class UnitReport:
    """What a display shows about the unit being trained."""

    job: str
    unit: int
    total: int
    step: int = 0
    loss: float = 0.0
    images_per_s: float = 0.0


Display = Callable[[UnitReport], None]


def local_shards(data_dir: Path | None) -> dict[str, Path]:
    """Shard files a site already holds, by digest, so its data need not move."""
    if data_dir is None:
        return {}
    return {sha256_file(p): p for p in sorted(data_dir.rglob("*.safetensors")) if p.is_file()}


def prepare_dataset(
    session: Session,
    a: serde.Assignment,
    manifest: dict,
    opts: WorkerOptions,
    local: dict[str, Path],
) -> ImageDataset:
    """The unit's data: local shards with matching digests, the rest fetched; digests checked."""
    folder = opts.state_dir / "datasets" / a.job_hash[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for shard in a.shards:
        target = folder / shard.name
        if target.exists():
            continue
        source = local.get(shard.sha256)
        if source is not None:
            log.info("using local shard %s", source)
            target.symlink_to(source.resolve())
        else:
            cached = opts.state_dir / "blobs" / shard.sha256
            session.fetch("FetchShard", shard.sha256, shard.size, cached)
            target.symlink_to(cached.resolve())
    atomic_write_bytes(folder / "manifest.json", json.dumps(manifest).encode())
    return load_shards(folder / "manifest.json")


def fetch_resume_point(
    session: Session, record: CheckpointRecord, job: str, unit: int, opts: WorkerOptions
) -> Path:
    """Download the unit's newest checkpoint and trust it only once digest and signature check.

    When the coordinator finds its own copy corrupt, CorruptOnCoordinator is raised; it has
    then cancelled this lease without counting the attempt, and the unit's next lease resumes
    from an older good checkpoint."""
    statement = Statement.from_bytes(record.statement)
    verify(record.public_key, record.statement, record.signature)
    if (statement.sha256, statement.job, statement.unit) != (record.sha256, job, unit):
        raise TspaceError(f"resume checkpoint {record.sha256[:12]} is not for this unit")
    path = opts.state_dir / "blobs" / record.sha256
    return session.fetch("FetchCheckpoint", record.sha256, record.size, path)


# What the coordinator sends becomes file names here: only plain names and digests pass.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
DIGEST = re.compile(r"[0-9a-f]{64}")


def check_names(a: serde.Assignment, manifest: Any) -> None:
    """Refuse an assignment whose lease id, shard names or digests could name a path outside
    this worker's folders; the manifest may name only the assignment's shards."""
    names = [a.lease_id, *(s.name for s in a.shards)]
    digests = [a.job_hash, *(s.sha256 for s in a.shards)]
    if a.resume_from is not None:
        digests.append(a.resume_from.sha256)
    bad = [n for n in names if not SAFE_NAME.fullmatch(n) or ".." in n]
    bad += [d for d in digests if not DIGEST.fullmatch(d)]
    try:
        files = {entry["file"] for entry in manifest["shards"]}
    except (KeyError, TypeError):
        raise TspaceError("the coordinator sent a dataset manifest without shards") from None
    bad += sorted(str(f) for f in files - {s.name for s in a.shards})
    if bad:
        shown = ", ".join(repr(b[:80]) for b in bad[:3])
        raise TspaceError(f"the coordinator sent unusable names or digests ({shown}); refusing")


def resolve_assignment(a: serde.Assignment) -> tuple[Job, dict]:
    try:
        resolved = json.loads(a.spec_json)
        job = resolve(spec_from_dict(resolved["spec"]))
        manifest = resolved["dataset"]
    except (ValueError, KeyError, TypeError):
        raise TspaceError("the coordinator sent a job this worker cannot read") from None
    if job.hash != a.job_hash or tuple(job.units[a.unit]) != tuple(a.timesteps):
        raise TspaceError("the job sent by the coordinator does not match its hash")
    return job, manifest


class UnitRun:
    """One leased unit, from data to the final upload."""

    def __init__(
        self,
        session: Session,
        identity: Identity,
        key: Ed25519PrivateKey,
        a: serde.Assignment,
        opts: WorkerOptions,
    ) -> None:
        self.session, self.identity, self.key, self.a, self.opts = session, identity, key, a, opts
        self.outbox = opts.state_dir / "outbox" / a.lease_id

    def _signed(self, path: Path, step: int, final: bool) -> Upload:
        sha256 = sha256_file(path)
        statement = Statement(
            job=self.a.job,
            job_hash=self.a.job_hash,
            unit=self.a.unit,
            attempt=self.a.attempt,
            step=step,
            final=final,
            sha256=sha256,
            size=path.stat().st_size,
            key_id=self.identity.key_id,
            time=time.time(),
        ).to_bytes()
        return Upload(path, sha256, statement, sign(self.key, statement), final)

    def run(self, local: dict[str, Path], display: Display | None) -> bool:
        """Train the unit; True when it completed, False when the lease was lost."""
        a = self.a
        if a.resume_from is not None and a.resume_from.final:
            # The unit's final checkpoint is registered but its completion never arrived (the
            # link or the worker went down in between): nothing is left to train, only to report.
            log.info("unit %d: its final checkpoint is registered; completing it", a.unit)
            request = worker_pb2.CompleteUnitRequest(
                lease_id=a.lease_id, sha256=a.resume_from.sha256
            )
            self.session.call("CompleteUnit", request)
            return True
        job, manifest = resolve_assignment(a)
        check_names(a, manifest)  # before any of them names a file
        data = prepare_dataset(self.session, a, manifest, self.opts, local)
        config = model_config_for(job, data)
        trainer = make_trainer(job, a.unit, data, config, self.opts.device)
        if a.resume_from is not None:
            path = fetch_resume_point(self.session, a.resume_from, a.job, a.unit, self.opts)
            ckpt = load_checkpoint(path)
            trainer.load_checkpoint_state(ckpt.tensors, ckpt.meta)
            log.info("unit %d resumes from step %d", a.unit, trainer.step)
        progress = Progress(step=trainer.step)
        heartbeat = Heartbeat(self.session, a.lease_id, max(a.lease_ttl_s / 3, 0.2), progress)
        uploader = Uploader(self.session, a.lease_id)
        heartbeat.start()
        uploader.start()
        try:
            final = self._train(job, trainer, data, config, progress, heartbeat, uploader, display)
        finally:
            heartbeat.stop()
            uploader.finish()
        if uploader.error is not None:
            raise uploader.error
        if final is None or uploader.lease_lost.is_set():
            return False
        self.session.call(
            "CompleteUnit", worker_pb2.CompleteUnitRequest(lease_id=a.lease_id, sha256=final)
        )
        shutil.rmtree(self.outbox, ignore_errors=True)  # the coordinator holds it all now
        return True

    def _train(self, job, trainer, data, config, progress, heartbeat, uploader, display):
        cfg, a = job.spec.training, self.a
        report = UnitReport(a.job, a.unit, cfg.steps, trainer.step)
        self.outbox.mkdir(parents=True, exist_ok=True)
        while trainer.step < cfg.steps:
            if heartbeat.cancelled.is_set() or uploader.lease_lost.is_set():
                return None
            if uploader.error is not None:
                raise uploader.error
            started = time.perf_counter()
            loss = trainer.train_step()
            rate = cfg.batch_size / max(time.perf_counter() - started, 1e-9)
            report.step, report.loss = trainer.step, loss
            report.images_per_s = (
                rate if not report.images_per_s else (0.9 * report.images_per_s + 0.1 * rate)
            )
            progress.step, progress.loss = trainer.step, loss
            progress.images_per_s = report.images_per_s
            if display is not None:
                display(report)
            last = trainer.step == cfg.steps
            if last or (cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0):
                path = self.outbox / f"step-{trainer.step:07d}.safetensors"
                save_unit_checkpoint(trainer, job, a.unit, data, config, path)
                upload = self._signed(path, trainer.step, last)
                uploader.put(upload)
                log.info("unit %d: checkpoint at step %d written", a.unit, trainer.step)
                if last:
                    return upload.sha256
        return None


def work_loop(
    session: Session,
    identity: Identity,
    key: Ed25519PrivateKey,
    opts: WorkerOptions,
    display: Display | None = None,
    on_idle: Callable[[float], None] = time.sleep,
) -> int:
    """Lease and train units until the coordinator has nothing left; the exit status."""
    local = local_shards(opts.data_dir)
    while True:
        response = wait_for_coordinator(
            lambda: session.call("AcquireUnit", worker_pb2.AcquireUnitRequest()), "acquire"
        )
        if response.WhichOneof("result") == "no_work":
            if response.no_work.finished and not opts.keep_alive:
                log.info("no work left; exiting")
                return 0
            on_idle(response.no_work.retry_after_s or 5.0)
            continue
        assignment = serde.assignment_from_proto(response.assignment)
        log.info(
            "leased unit %d of %s (attempt %d)", assignment.unit, assignment.job, assignment.attempt
        )
        try:
            done = UnitRun(session, identity, key, assignment, opts).run(local, display)
            log.info(
                "unit %d %s", assignment.unit, "completed" if done else "given up (lease lost)"
            )
        except (TspaceError, RuntimeError, OSError, ValueError, grpc.RpcError) as exc:
            # A refusal of this unit's upload or completion ends this unit, not the worker.
            error = error_text(exc)
            log.error("unit %d failed: %s", assignment.unit, error)
            with contextlib.suppress(grpc.RpcError):
                session.call(
                    "FailUnit",
                    worker_pb2.FailUnitRequest(lease_id=assignment.lease_id, error=error),
                )


def error_text(exc: BaseException) -> str:
    """What a failure report says: the coordinator's own words for a refusal, printable only
    (the coordinator refuses control characters), at most 1000 characters."""
    if isinstance(exc, grpc.Call):
        text = f"{exc.code().name}: {exc.details()}"
    else:
        text = str(exc) or type(exc).__name__
    return "".join(c if c.isprintable() or c == "\n" else " " for c in text)[:1000]


def device_description(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device
