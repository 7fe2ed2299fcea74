"""Round trips between the catalogue's records and the wire messages, through real bytes."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import numpy as np
import pytest
from google.protobuf.message import Message

from tspace_core import serde
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

M = TypeVar("M", bound=Message)


def _wire(msg: M) -> M:
    """Serialize and parse, so tests see what the other side of a connection sees."""
    return type(msg).FromString(msg.SerializeToString())


def _shard(i: int = 0) -> ShardRecord:
    return ShardRecord(
        name=f"shard-{i:05d}.safetensors", sha256=f"{i:02x}" * 32, size=1 << 33, count=7
    )


def _checkpoint(**changes: object) -> CheckpointRecord:
    base = CheckpointRecord(
        sha256="ab" * 32,
        size=123_456_789_012,
        job="cifar",
        unit=0,
        step=2**40,
        final=True,
        statement=b'{"sha256":"ab"}\x00\xff',
        signature=bytes(range(64)),
        worker_id="",
        key_id="k-1",
        public_key=bytes(range(32)),
        created_at=0.0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_shard_round_trip() -> None:
    shard = _shard(3)
    assert serde.shard_from_proto(_wire(serde.shard_to_proto(shard))) == shard


def test_checkpoint_round_trip_keeps_wire_fields_and_neutralises_the_rest() -> None:
    ckpt = _checkpoint()
    assert serde.checkpoint_from_proto(_wire(serde.checkpoint_to_proto(ckpt))) == ckpt
    rich = _checkpoint(
        worker_id="w-1",
        created_at=1.7e9,
        attempt=3,
        metrics={"loss": 0.1},
        shards_seen=("a",),
        trusted=False,
    )
    back = serde.checkpoint_from_proto(_wire(serde.checkpoint_to_proto(rich)))
    assert back == ckpt  # off-wire fields come back as the record's neutral defaults


def test_checkpoint_fields_land_on_the_named_proto_fields() -> None:
    ref = serde.checkpoint_to_proto(_checkpoint(unit=4, final=False))
    assert (ref.sha256, ref.size, ref.step, ref.unit, ref.job) == (
        "ab" * 32,
        123_456_789_012,
        2**40,
        4,
        "cifar",
    )
    assert ref.key_id == "k-1" and ref.public_key == bytes(range(32)) and not ref.final


def test_checkpoint_info_round_trip_keeps_what_the_operator_sees() -> None:
    rich = _checkpoint(
        worker_id="w-1",
        created_at=1.7e9 + 0.125,
        attempt=3,
        metrics={"loss": 0.0625, "val_loss": 1e-300, "images": 4096.0},
        shards_seen=("a", "b"),
        trusted=False,
        discarded=True,
    )
    info = _wire(serde.checkpoint_info_to_proto(rich))
    assert (info.trusted, info.discarded, info.ref.sha256) == (False, True, "ab" * 32)
    # The shard list is not on the wire; everything else comes back exactly.
    assert serde.checkpoint_info_from_proto(info) == dataclasses.replace(rich, shards_seen=())
    plain = _checkpoint(worker_id="w-2", created_at=5.0, attempt=1)
    back = serde.checkpoint_info_from_proto(_wire(serde.checkpoint_info_to_proto(plain)))
    assert back == plain and back.trusted and not back.discarded


def test_checkpoint_info_leaves_out_a_metric_that_was_not_finite() -> None:
    # The catalogue stores a non-finite metric as null, i.e. None.
    ckpt = _checkpoint(worker_id="w-1", metrics={"loss": None, "fid": 12.5, "step_s": 2})
    info = _wire(serde.checkpoint_info_to_proto(ckpt))
    assert dict(info.metrics) == {"fid": 12.5, "step_s": 2.0}
    assert serde.checkpoint_info_from_proto(info).metrics == {"fid": 12.5, "step_s": 2.0}


@pytest.mark.parametrize(
    "token",
    [
        TokenRecord("0123456789ab", "lab-a", "unused", 1.7e9, 1.7e9 + 3600),
        TokenRecord("ba9876543210", "lab-b", "used", 1.7e9 + 0.5, 1.7e9 + 60, None, "w-1"),
        # Enrolled before creation times were recorded.
        TokenRecord("ffffffffffff", "lab-c", "expired", None, 1.0),
    ],
)
def test_token_round_trip(token: TokenRecord) -> None:
    msg = _wire(serde.token_to_proto(token))
    assert msg.created_at == (token.created_at or 0.0)
    assert serde.token_from_proto(msg) == token


def test_token_use_time_is_not_on_the_wire() -> None:
    used = TokenRecord("0123456789ab", "lab-a", "used", 10.0, 20.0, used_at=15.0, worker_id="w-1")
    back = serde.token_from_proto(_wire(serde.token_to_proto(used)))
    assert back == dataclasses.replace(used, used_at=None)


def test_alias_round_trip() -> None:
    alias = AliasRecord(alias="production", ensemble="cifar:final-2", updated_at=1.7e9 + 0.75)
    assert serde.alias_from_proto(_wire(serde.alias_to_proto(alias))) == alias


def test_unit_status_round_trip() -> None:
    leased = UnitRecord(
        job="cifar",
        unit=2,
        timesteps=(10, 11, 12),
        status="leased",
        attempts=2,
        total_steps=5000,
        worker_id="w-7",
        step=1234,
        loss=0.0625,
        images_per_s=310.5,
    )
    assert serde.unit_status_from_proto(_wire(serde.unit_status_to_proto(leased))) == leased
    pending = UnitRecord(
        job="cifar", unit=0, timesteps=(0,), status="pending", attempts=0, total_steps=5000
    )
    msg = serde.unit_status_to_proto(pending)
    assert msg.worker_id == ""
    assert serde.unit_status_from_proto(_wire(msg)).worker_id is None


def test_unit_status_keeps_last_error_and_drops_lease_id() -> None:
    unit = UnitRecord(
        job="j",
        unit=1,
        timesteps=(5,),
        status="failed",
        attempts=3,
        total_steps=10,
        last_error="OOM",
        lease_id="l-1",
    )
    msg = _wire(serde.unit_status_to_proto(unit))
    assert msg.last_error == "OOM"
    back = serde.unit_status_from_proto(msg)
    assert back == dataclasses.replace(unit, lease_id=None)


@pytest.mark.parametrize(
    ("newest_step", "newest_at"), [(None, None), (0, 0.0), (0, 1.7e9 + 0.25), (2**40, 1.7e9)]
)
def test_unit_status_keeps_no_checkpoint_apart_from_step_zero(
    newest_step: int | None, newest_at: float | None
) -> None:
    unit = UnitRecord(
        job="j",
        unit=0,
        timesteps=(5,),
        status="pending",
        attempts=1,
        total_steps=10,
        newest_step=newest_step,
        newest_checkpoint_at=newest_at,
    )
    msg = _wire(serde.unit_status_to_proto(unit))
    assert msg.HasField("newest_step") == (newest_step is not None)
    assert msg.HasField("newest_checkpoint_at") == (newest_at is not None)
    assert serde.unit_status_from_proto(msg) == unit


def test_worker_age_is_relative_to_now() -> None:
    worker = WorkerRecord(
        worker_id="w-1",
        site="lab-a",
        public_key=b"\x01" * 32,
        key_id="k-1",
        status="active",
        device="cuda:0",
        hostname="gpu1",
        registered_at=100.0,
        last_seen=1000.0,
        units_done=4,
    )
    info = _wire(serde.worker_to_proto(worker, now=1012.5))
    assert info.last_seen_age_s == 12.5
    back = serde.worker_from_proto(info, now=5012.5)  # another clock: only the age carries over
    assert back.last_seen == 5000.0
    assert back == dataclasses.replace(
        worker, public_key=b"", hostname="", registered_at=0.0, last_seen=5000.0
    )


def test_job_round_trip_keeps_total_steps_and_created_at() -> None:
    job = JobRecord(
        name="cifar",
        job_hash="h" * 64,
        spec_json='{"a": 1}',
        status="active",
        total_steps=5000,
        created_at=1.7e9,
        shards=(_shard(),),
        units=8,
        units_done=3,
        units_failed=1,
    )
    info = _wire(serde.job_to_proto(job))
    assert (info.units, info.units_done, info.units_failed) == (8, 3, 1)
    assert (info.total_steps, info.created_at) == (5000, 1.7e9)
    assert serde.job_from_proto(info) == dataclasses.replace(job, spec_json="", shards=())


@pytest.mark.parametrize(
    "event",
    [
        EventRecord(time=1.7e9, kind="lease", message="leased", job="j", unit=0, worker_id="w"),
        EventRecord(time=1.7e9 + 0.25, kind="enrol", message="site lab-a enrolled"),
        EventRecord(time=2.0, kind="unit", message="done", job="j", unit=7),
    ],
)
def test_event_round_trip_keeps_none_apart_from_unit_zero(event: EventRecord) -> None:
    msg = _wire(serde.event_to_proto(event))
    assert msg.HasField("unit") == (event.unit is not None)
    assert serde.event_from_proto(msg) == event


def _ensemble() -> EnsembleRecord:
    members = (
        EnsembleMemberRecord(unit=0, timesteps=(0, 1), checkpoint=_checkpoint(unit=0)),
        EnsembleMemberRecord(
            unit=1,
            timesteps=(2, 3),
            checkpoint=_checkpoint(unit=1, sha256="cd" * 32, trusted=False),
        ),
    )
    return EnsembleRecord(
        name="cifar-final",
        job="cifar",
        job_hash="h",
        spec_json="{}",
        created_at=0.0,
        members=members,
    )


def test_ensemble_round_trip_with_schedule() -> None:
    ens = _ensemble()
    alphas = np.cumprod(1 - np.linspace(1e-4, 0.02, 4))
    msg = _wire(serde.ensemble_to_proto(ens, np.arange(4), alphas))
    assert [m.trusted for m in msg.members] == [True, False]
    record, timesteps, alphas_cumprod = serde.ensemble_from_proto(msg)
    assert record == ens
    assert timesteps == (0, 1, 2, 3)
    assert alphas_cumprod == tuple(float(a) for a in alphas)  # doubles survive exactly


def test_ensemble_round_trip_keeps_created_at_and_aliases() -> None:
    ens = dataclasses.replace(_ensemble(), created_at=1.7e9 + 0.5, aliases=("live", "prod"))
    msg = _wire(serde.ensemble_to_proto(ens, (), ()))
    assert list(msg.aliases) == ["live", "prod"]
    record, _, _ = serde.ensemble_from_proto(msg)
    assert record == ens


def _assignment(resume_from: CheckpointRecord | None) -> serde.Assignment:
    return serde.Assignment(
        lease_id="l-42",
        job="cifar",
        job_hash="h" * 64,
        spec_json='{"units": 2}',
        unit=1,
        timesteps=(500, 501, 999),
        alphas_cumprod=(0.9999, 0.5, 1e-5),
        attempt=2,
        lease_ttl_s=90.0,
        shards=(_shard(0), _shard(1)),
        resume_from=resume_from,
    )


@pytest.mark.parametrize("resume_from", [None, _checkpoint(unit=1, final=False)])
def test_assignment_round_trip(resume_from: CheckpointRecord | None) -> None:
    assignment = _assignment(resume_from)
    msg = _wire(serde.assignment_to_proto(assignment))
    assert msg.HasField("resume_from") == (resume_from is not None)
    assert serde.assignment_from_proto(msg) == assignment


def test_assignment_inside_acquire_response() -> None:
    response = worker_pb2.AcquireUnitResponse(
        assignment=serde.assignment_to_proto(_assignment(None))
    )
    got = _wire(response)
    assert got.WhichOneof("result") == "assignment"
    assert serde.assignment_from_proto(got.assignment) == _assignment(None)


def test_messages_are_the_generated_types() -> None:
    assert isinstance(serde.shard_to_proto(_shard()), common_pb2.ShardRef)
    assert isinstance(serde.ensemble_to_proto(_ensemble(), (), ()), admin_pb2.Ensemble)


def test_assignment_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        _assignment(None).unit = 3  # type: ignore[misc]
