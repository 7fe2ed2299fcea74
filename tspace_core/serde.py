"""The one module that converts between protobuf messages and tspace's dataclasses.

Fields a message does not carry come back as neutral defaults (empty, zero, None); optional
record fields travel as the proto3 default ("" or unset) and come back as None.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from tspace_core.catalogue.records import (
    AliasRecord,
    CheckpointRecord,
    EnsembleMemberRecord,
    EnsembleRecord,
    EventRecord,
    JobRecord,
    ShardRecord,
    TokenRecord,
    UnitRecord,
    WorkerRecord,
)
from tspace_core.proto.tspace.v1 import admin_pb2, common_pb2, worker_pb2


@dataclass(frozen=True)
class Assignment:
    """A leased unit as the worker receives it.

    lease_id: the lease to heartbeat, upload and complete under.
    job, job_hash, spec_json: the job and its resolved spec.
    unit, timesteps: the unit and its latent states (base timestep indices).
    alphas_cumprod: the base schedule's cumulative alphas.
    attempt: which attempt at this unit the lease is, as the catalogue counts them.
    lease_ttl_s: seconds the lease lives without a heartbeat.
    shards: the data the unit trains on, in order.
    resume_from: the checkpoint to resume from, or None to start from scratch.
    """

    lease_id: str
    job: str
    job_hash: str
    spec_json: str
    unit: int
    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]
    attempt: int
    lease_ttl_s: float
    shards: tuple[ShardRecord, ...]
    resume_from: CheckpointRecord | None = None


def _none_if_empty(value: str) -> str | None:
    return value or None


def shard_to_proto(shard: ShardRecord) -> common_pb2.ShardRef:
    return common_pb2.ShardRef(
        name=shard.name, sha256=shard.sha256, size=shard.size, count=shard.count
    )


def shard_from_proto(ref: common_pb2.ShardRef) -> ShardRecord:
    return ShardRecord(name=ref.name, sha256=ref.sha256, size=ref.size, count=ref.count)


def checkpoint_to_proto(ckpt: CheckpointRecord) -> common_pb2.CheckpointRef:
    return common_pb2.CheckpointRef(
        sha256=ckpt.sha256,
        size=ckpt.size,
        step=ckpt.step,
        unit=ckpt.unit,
        job=ckpt.job,
        statement=ckpt.statement,
        signature=ckpt.signature,
        key_id=ckpt.key_id,
        public_key=ckpt.public_key,
        final=ckpt.final,
    )


def checkpoint_from_proto(
    ref: common_pb2.CheckpointRef, *, trusted: bool = True
) -> CheckpointRecord:
    """The wire carries no worker id, time, attempt, metrics or shard list: those are neutral."""
    return CheckpointRecord(
        sha256=ref.sha256,
        size=ref.size,
        job=ref.job,
        unit=ref.unit,
        step=ref.step,
        final=ref.final,
        statement=ref.statement,
        signature=ref.signature,
        worker_id="",
        key_id=ref.key_id,
        public_key=ref.public_key,
        created_at=0.0,
        trusted=trusted,
    )


def checkpoint_info_to_proto(ckpt: CheckpointRecord) -> admin_pb2.CheckpointInfo:
    """Non-finite metrics are stored as null and left out here."""
    return admin_pb2.CheckpointInfo(
        ref=checkpoint_to_proto(ckpt),
        worker_id=ckpt.worker_id,
        trusted=ckpt.trusted,
        discarded=ckpt.discarded,
        created_at=ckpt.created_at,
        attempt=ckpt.attempt,
        metrics={k: float(v) for k, v in ckpt.metrics.items() if v is not None},
    )


def checkpoint_info_from_proto(info: admin_pb2.CheckpointInfo) -> CheckpointRecord:
    """The wire carries no shard list: it comes back empty."""
    return replace(
        checkpoint_from_proto(info.ref, trusted=info.trusted),
        worker_id=info.worker_id,
        discarded=info.discarded,
        created_at=info.created_at,
        attempt=info.attempt,
        metrics=dict(info.metrics),
    )


def token_to_proto(token: TokenRecord) -> admin_pb2.TokenInfo:
    return admin_pb2.TokenInfo(
        token_id=token.token_id,
        site=token.site,
        status=token.status,
        created_at=token.created_at or 0.0,
        expires_at=token.expires_at,
        worker_id=token.worker_id or "",
    )


def token_from_proto(info: admin_pb2.TokenInfo) -> TokenRecord:
    """A creation time of 0 (unknown) comes back as None; the use time is not on the wire."""
    return TokenRecord(
        token_id=info.token_id,
        site=info.site,
        status=info.status,
        created_at=info.created_at or None,
        expires_at=info.expires_at,
        worker_id=_none_if_empty(info.worker_id),
    )


def alias_to_proto(alias: AliasRecord) -> admin_pb2.AliasInfo:
    return admin_pb2.AliasInfo(
        alias=alias.alias, ensemble=alias.ensemble, updated_at=alias.updated_at
    )


def alias_from_proto(info: admin_pb2.AliasInfo) -> AliasRecord:
    return AliasRecord(alias=info.alias, ensemble=info.ensemble, updated_at=info.updated_at)


def unit_status_to_proto(unit: UnitRecord) -> admin_pb2.UnitStatus:
    return admin_pb2.UnitStatus(
        job=unit.job,
        unit=unit.unit,
        timesteps=[int(t) for t in unit.timesteps],
        status=unit.status,
        worker_id=unit.worker_id or "",
        step=unit.step,
        total_steps=unit.total_steps,
        loss=unit.loss,
        images_per_s=unit.images_per_s,
        attempts=unit.attempts,
        last_error=unit.last_error,
        newest_step=unit.newest_step,
        newest_checkpoint_at=unit.newest_checkpoint_at,
    )


def unit_status_from_proto(status: admin_pb2.UnitStatus) -> UnitRecord:
    """The wire carries no lease id: it comes back as None."""
    return UnitRecord(
        job=status.job,
        unit=status.unit,
        timesteps=tuple(status.timesteps),
        status=status.status,
        attempts=status.attempts,
        total_steps=status.total_steps,
        worker_id=_none_if_empty(status.worker_id),
        step=status.step,
        loss=status.loss,
        images_per_s=status.images_per_s,
        last_error=status.last_error,
        newest_step=status.newest_step if status.HasField("newest_step") else None,
        newest_checkpoint_at=(
            status.newest_checkpoint_at if status.HasField("newest_checkpoint_at") else None
        ),
    )


def worker_to_proto(worker: WorkerRecord, now: float) -> admin_pb2.WorkerInfo:
    """`now` is the coordinator's clock, so the age needs no clock agreement with the client."""
    return admin_pb2.WorkerInfo(
        worker_id=worker.worker_id,
        site=worker.site,
        key_id=worker.key_id,
        status=worker.status,
        device=worker.device,
        last_seen_age_s=now - worker.last_seen,
        units_done=worker.units_done,
    )


def worker_from_proto(info: admin_pb2.WorkerInfo, now: float) -> WorkerRecord:
    """last_seen is `now` (the client's clock) minus the age; key, host and time are neutral."""
    return WorkerRecord(
        worker_id=info.worker_id,
        site=info.site,
        public_key=b"",
        key_id=info.key_id,
        status=info.status,
        device=info.device,
        hostname="",
        registered_at=0.0,
        last_seen=now - info.last_seen_age_s,
        units_done=info.units_done,
    )


def job_to_proto(job: JobRecord) -> admin_pb2.JobInfo:
    return admin_pb2.JobInfo(
        name=job.name,
        job_hash=job.job_hash,
        status=job.status,
        units=job.units,
        units_done=job.units_done,
        units_failed=job.units_failed,
        total_steps=job.total_steps,
        created_at=job.created_at,
    )


def job_from_proto(info: admin_pb2.JobInfo) -> JobRecord:
    """The wire carries no spec or shards: those are neutral."""
    return JobRecord(
        name=info.name,
        job_hash=info.job_hash,
        spec_json="",
        status=info.status,
        total_steps=info.total_steps,
        created_at=info.created_at,
        units=info.units,
        units_done=info.units_done,
        units_failed=info.units_failed,
    )


def event_to_proto(event: EventRecord) -> admin_pb2.Event:
    msg = admin_pb2.Event(
        time=event.time,
        kind=event.kind,
        job=event.job or "",
        worker_id=event.worker_id or "",
        message=event.message,
    )
    if event.unit is not None:  # unit 0 is a unit, so "no unit" is the unset optional
        msg.unit = event.unit
    return msg


def event_from_proto(msg: admin_pb2.Event) -> EventRecord:
    return EventRecord(
        time=msg.time,
        kind=msg.kind,
        message=msg.message,
        job=_none_if_empty(msg.job),
        unit=msg.unit if msg.HasField("unit") else None,
        worker_id=_none_if_empty(msg.worker_id),
    )


def ensemble_to_proto(
    ensemble: EnsembleRecord, timesteps: Iterable[int], alphas_cumprod: Iterable[float]
) -> admin_pb2.Ensemble:
    """`timesteps` and `alphas_cumprod` are the job's base schedule, which the record omits."""
    members = [
        admin_pb2.EnsembleMember(
            unit=m.unit,
            timesteps=[int(t) for t in m.timesteps],
            checkpoint=checkpoint_to_proto(m.checkpoint),
            trusted=m.checkpoint.trusted,
        )
        for m in ensemble.members
    ]
    return admin_pb2.Ensemble(
        name=ensemble.name,
        job=ensemble.job,
        job_hash=ensemble.job_hash,
        spec_json=ensemble.spec_json,
        timesteps=[int(t) for t in timesteps],
        alphas_cumprod=[float(a) for a in alphas_cumprod],
        members=members,
        created_at=ensemble.created_at,
        aliases=list(ensemble.aliases),
    )


def ensemble_from_proto(
    msg: admin_pb2.Ensemble,
) -> tuple[EnsembleRecord, tuple[int, ...], tuple[float, ...]]:
    """Return (record, timesteps, alphas_cumprod); members carry no worker id, time or metrics."""
    members = tuple(
        EnsembleMemberRecord(
            unit=m.unit,
            timesteps=tuple(m.timesteps),
            checkpoint=checkpoint_from_proto(m.checkpoint, trusted=m.trusted),
        )
        for m in msg.members
    )
    record = EnsembleRecord(
        name=msg.name,
        job=msg.job,
        job_hash=msg.job_hash,
        spec_json=msg.spec_json,
        created_at=msg.created_at,
        members=members,
        aliases=tuple(msg.aliases),
    )
    return record, tuple(msg.timesteps), tuple(msg.alphas_cumprod)


def assignment_to_proto(assignment: Assignment) -> worker_pb2.Assignment:
    msg = worker_pb2.Assignment(
        lease_id=assignment.lease_id,
        job=assignment.job,
        job_hash=assignment.job_hash,
        spec_json=assignment.spec_json,
        unit=assignment.unit,
        timesteps=[int(t) for t in assignment.timesteps],
        alphas_cumprod=[float(a) for a in assignment.alphas_cumprod],
        attempt=assignment.attempt,
        lease_ttl_s=assignment.lease_ttl_s,
        shards=[shard_to_proto(s) for s in assignment.shards],
    )
    if assignment.resume_from is not None:
        msg.resume_from.CopyFrom(checkpoint_to_proto(assignment.resume_from))
    return msg


def assignment_from_proto(msg: worker_pb2.Assignment) -> Assignment:
    resume = checkpoint_from_proto(msg.resume_from) if msg.HasField("resume_from") else None
    return Assignment(
        lease_id=msg.lease_id,
        job=msg.job,
        job_hash=msg.job_hash,
        spec_json=msg.spec_json,
        unit=msg.unit,
        timesteps=tuple(msg.timesteps),
        alphas_cumprod=tuple(msg.alphas_cumprod),
        attempt=msg.attempt,
        lease_ttl_s=msg.lease_ttl_s,
        shards=tuple(shard_from_proto(s) for s in msg.shards),
        resume_from=resume,
    )
