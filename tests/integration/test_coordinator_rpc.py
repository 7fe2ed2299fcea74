"""The coordinator over real gRPC on loopback, backed by a SQLite file and by PostgreSQL: a bad
input gets a clear status and changes nothing; leases, uploads and restarts keep their promises."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from sklearn.datasets import load_digits

from tspace_core import serde
from tspace_core.catalogue import (
    JOB_DONE,
    UNIT_DONE,
    UNIT_FAILED,
    UNIT_LEASED,
    UNIT_PENDING,
    UnitRecord,
)
from tspace_core.proto.tspace.v1 import admin_pb2, worker_pb2
from tspace_core.rpc import ADMIN_HEADER, CHUNK_BYTES, CREDENTIAL_HEADER, collect_stream
from tspace_core.signing import generate_key, public_key_bytes

if TYPE_CHECKING:
    from conftest import CheckpointMaker, Harness, WorkerClient

TIMEOUT_S = 30.0
STEPS = 4  # the tiny job's training.steps
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def refused(
    code: grpc.StatusCode | tuple[grpc.StatusCode, ...], fragment: str, call: Callable[[], Any]
) -> str:
    """Run `call`, expect it to fail with `code` and a message containing `fragment`."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    codes = code if isinstance(code, tuple) else (code,)
    assert err.code() in codes, f"expected {codes}, got {err.code()}: {err.details()}"
    assert fragment in err.details(), f"{fragment!r} not in {err.details()!r}"
    return str(err.details())


def unit(coord: Harness, index: int) -> UnitRecord:
    return next(u for u in coord.catalogue.units() if u.unit == index)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> float:
    """Seconds until `predicate()` held (polled), or an assertion error after `timeout_s`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "condition not reached in time"
        time.sleep(0.05)
    return time.monotonic() - start


def leased(coord: Harness) -> tuple[WorkerClient, serde.Assignment]:
    """The tiny job, a registered worker, and that worker's lease on unit 0."""
    coord.create_job()
    worker = coord.register()
    a = coord.assignment(worker)
    assert a.unit == 0
    return worker, a


def planned(coord: Harness, index: int) -> serde.Assignment:
    """Unit `index` of the tiny job as an assignment describes it, without leasing it."""
    job = coord.catalogue.get_job("tiny")
    timesteps = tuple(json.loads(job.spec_json)["units"][index])
    return serde.Assignment(
        "", job.name, job.job_hash, job.spec_json, index, timesteps, (), 1, 0.0, job.shards
    )


def statuses(coord: Harness) -> dict[int, str]:
    return {u.unit: u.status for u in coord.catalogue.units()}


def register_request(token: str, public_key: bytes) -> worker_pb2.RegisterRequest:
    return worker_pb2.RegisterRequest(token=token, public_key=public_key, device="cpu")


def upload_status(
    coord: Harness, worker: WorkerClient, lease_id: str, sha256: str
) -> worker_pb2.UploadStatusResponse:
    request = worker_pb2.UploadStatusRequest(lease_id=lease_id, sha256=sha256)
    return coord.worker.UploadStatus(request, metadata=worker.metadata, timeout=TIMEOUT_S)


def fetch(coord: Harness, method: str, sha256: str, offset: int, metadata: Any) -> list[Any]:
    request = worker_pb2.FetchRequest(sha256=sha256, offset=offset)
    return list(getattr(coord.worker, method)(request, metadata=metadata, timeout=TIMEOUT_S))


# --- 1. enrolment ---


def test_register_refuses_wrong_and_used_tokens_and_short_keys(coord: Harness) -> None:
    token, key = coord.enroll(), public_key_bytes(generate_key())
    register = coord.worker.Register
    before = coord.snapshot()
    refused(
        UNAUTHENTICATED,
        "unknown join token",
        lambda: register(register_request("not-" + token, key), timeout=TIMEOUT_S),
    )
    refused(
        INVALID_ARGUMENT,
        "public_key must be 32 raw bytes",
        lambda: register(register_request(token, key[:31]), timeout=TIMEOUT_S),
    )
    assert coord.snapshot() == before  # the token is still unused
    worker = register(register_request(token, key), timeout=TIMEOUT_S)
    second_token = coord.enroll("site-b")
    registered = coord.snapshot()
    other_key = public_key_bytes(generate_key())
    refused(
        UNAUTHENTICATED,
        "join token already used",
        lambda: register(register_request(token, other_key), timeout=TIMEOUT_S),
    )
    refused(
        grpc.StatusCode.ALREADY_EXISTS,
        "already registered",
        lambda: register(register_request(second_token, key), timeout=TIMEOUT_S),
    )
    assert coord.snapshot() == registered
    assert [w.worker_id for w in coord.catalogue.list_workers()] == [worker.worker_id]
    # Neither refusal used up the second token.
    assert register(register_request(second_token, other_key), timeout=TIMEOUT_S).site == "site-b"


def test_register_refuses_an_expired_token(coord: Harness) -> None:
    token = coord.enroll(ttl_s=0.05)
    time.sleep(0.2)
    before = coord.snapshot()
    key = public_key_bytes(generate_key())
    refused(
        UNAUTHENTICATED,
        "join token expired",
        lambda: coord.worker.Register(register_request(token, key), timeout=TIMEOUT_S),
    )
    assert coord.snapshot() == before
    assert coord.catalogue.list_workers() == []


# --- 2. credentials ---


def invoke(stub: Any, method: str, request: Any, metadata: Any) -> Any:
    """Call any method of `stub` with `request`, draining a streamed response."""
    if method == "UploadCheckpoint":
        request = iter([request])
    response = getattr(stub, method)(request, metadata=metadata, timeout=TIMEOUT_S)
    return list(response) if method in ("FetchShard", "FetchCheckpoint", "Status") else response


def test_worker_calls_need_a_registered_credential(coord: Harness) -> None:
    coord.create_job()
    worker = coord.register()
    admin_credential = coord.admin_metadata[0][1]
    shard = coord.catalogue.get_job("tiny").shards[0].sha256
    calls = {
        "AcquireUnit": worker_pb2.AcquireUnitRequest(),
        "Heartbeat": worker_pb2.HeartbeatRequest(lease_id="l-0"),
        "UploadStatus": worker_pb2.UploadStatusRequest(lease_id="l-0"),
        "UploadCheckpoint": worker_pb2.UploadChunk(data=b"x"),
        "CompleteUnit": worker_pb2.CompleteUnitRequest(lease_id="l-0"),
        "FailUnit": worker_pb2.FailUnitRequest(lease_id="l-0"),
        "FetchShard": worker_pb2.FetchRequest(sha256=shard),
    }
    wrong = {
        "no credential": ((), "no worker credential"),
        "a bogus credential": (((CREDENTIAL_HEADER, "bogus"),), "unknown worker credential"),
        "the admin credential": (((CREDENTIAL_HEADER, admin_credential),), "unknown worker"),
        "a worker credential as the admin's": (((ADMIN_HEADER, worker.credential),), "no worker"),
    }
    before = coord.snapshot()
    for method, request in calls.items():
        for what, (metadata, fragment) in wrong.items():
            if method == "FetchShard" and metadata and metadata[0][0] == ADMIN_HEADER:
                fragment = "admin credential is wrong"  # the admin may fetch too
            call = functools.partial(invoke, coord.worker, method, request, metadata)
            try:
                refused(UNAUTHENTICATED, fragment, call)
            except AssertionError as exc:
                raise AssertionError(f"{method} with {what}: {exc}") from None
    assert coord.snapshot() == before
    assert set(statuses(coord).values()) == {UNIT_PENDING}


def test_admin_calls_need_the_admin_credential(coord: Harness) -> None:
    worker = coord.register()
    calls = {
        "CreateJob": admin_pb2.CreateJobRequest(spec_toml=coord.job_toml()),
        "ListJobs": admin_pb2.ListJobsRequest(),
        "Enroll": admin_pb2.EnrollRequest(site="intruder"),
        "ListWorkers": admin_pb2.ListWorkersRequest(),
        "GetEnsemble": admin_pb2.GetEnsembleRequest(name="tiny:final"),
        "ListEnsembles": admin_pb2.ListEnsemblesRequest(),
        "Status": admin_pb2.StatusRequest(),
    }
    wrong = {
        "no credential": ((), UNAUTHENTICATED, "admin credential missing"),
        "a wrong admin credential": (
            ((ADMIN_HEADER, "not-the-admin"),),
            UNAUTHENTICATED,
            "admin credential is wrong",
        ),
        "a worker credential as the admin's": (
            ((ADMIN_HEADER, worker.credential),),
            UNAUTHENTICATED,
            "admin credential is wrong",
        ),
        "a worker's own metadata": (
            worker.metadata,
            grpc.StatusCode.PERMISSION_DENIED,
            "a worker credential cannot call admin methods",
        ),
    }
    before = coord.snapshot()
    for method, request in calls.items():
        for what, (metadata, code, fragment) in wrong.items():
            call = functools.partial(invoke, coord.admin, method, request, metadata)
            try:
                refused(code, fragment, call)
            except AssertionError as exc:
                raise AssertionError(f"{method} with {what}: {exc}") from None
    assert coord.snapshot() == before
    assert coord.catalogue.list_jobs() == []


# --- 3. leasing every unit to the end ---


def test_assignment_carries_the_units_states_and_verifiable_shards(coord: Harness) -> None:
    job = coord.create_job()
    worker = coord.register()
    response = coord.acquire(worker)
    a = serde.assignment_from_proto(response.assignment)
    assert not response.assignment.HasField("resume_from")
    assert (a.job, a.job_hash, a.attempt) == ("tiny", job.job_hash, 1)
    assert a.lease_ttl_s == coord.config.lease_ttl_s
    record = unit(coord, a.unit)
    assert (record.status, record.lease_id, record.worker_id) == (
        UNIT_LEASED,
        a.lease_id,
        worker.worker_id,
    )
    assert a.timesteps == record.timesteps
    # Oracle: diffusers' "trailing" spacing of 3 states and its linear betas (1e-4..0.02, T=1000).
    assert set(json.loads(a.spec_json)["latent_states"]) == {999, 666, 332}
    assert len(a.timesteps) == 1 and a.timesteps[0] in (999, 666, 332)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    oracle = np.cumprod(1.0 - betas)[list(a.timesteps)]
    np.testing.assert_allclose(a.alphas_cumprod, oracle, rtol=1e-5)

    assert a.shards == coord.catalogue.get_job("tiny").shards
    assert sum(s.count for s in a.shards) == load_digits().images.shape[0]
    for shard in a.shards:
        chunks = fetch(coord, "FetchShard", shard.sha256, 0, worker.metadata)
        data = collect_stream(chunks, expected_size=shard.size)  # checks the chunk offsets too
        assert hashlib.sha256(data).hexdigest() == shard.sha256
        middle = shard.size // 2
        tail = fetch(coord, "FetchShard", shard.sha256, middle, worker.metadata)
        assert collect_stream(tail, expected_size=shard.size, offset=middle) == data[middle:]
    refused(
        NOT_FOUND,
        "no shard",
        lambda: fetch(coord, "FetchShard", "0" * 64, 0, worker.metadata),
    )


def test_every_unit_completed_gives_the_final_ensemble(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    coord.create_job()
    worker = coord.register()
    assignments = [coord.assignment(worker) for _ in range(3)]
    assert sorted(a.unit for a in assignments) == [0, 1, 2]
    assert {a.attempt for a in assignments} == {1}
    idle = coord.acquire(worker)
    assert idle.WhichOneof("result") == "no_work"
    assert not idle.no_work.finished and idle.no_work.retry_after_s > 0

    finals: dict[int, str] = {}
    ensembles = []
    for a in assignments:
        path = checkpoints.path(a, STEPS)
        response = coord.upload_file(worker, a, path, STEPS, final=True)
        assert not response.already_registered
        assert response.checkpoint.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (response.checkpoint.unit, response.checkpoint.final) == (a.unit, True)
        finals[a.unit] = response.checkpoint.sha256
        ensembles.append(coord.complete(worker, a, response.checkpoint.sha256))
    assert ensembles == ["", "", "tiny:final"]

    done = coord.acquire(worker)
    assert done.WhichOneof("result") == "no_work" and done.no_work.finished
    ensemble = coord.admin.GetEnsemble(
        admin_pb2.GetEnsembleRequest(name="tiny:final"),
        metadata=coord.admin_metadata,
        timeout=TIMEOUT_S,
    )
    assert ensemble.job == "tiny"
    assert {m.unit: m.checkpoint.sha256 for m in ensemble.members} == finals
    assert all(m.trusted and m.checkpoint.final for m in ensemble.members)
    by_unit = {a.unit: a.timesteps for a in assignments}
    assert {m.unit: tuple(m.timesteps) for m in ensemble.members} == by_unit
    (job,) = coord.catalogue.list_jobs()
    assert (job.status, job.units_done) == (JOB_DONE, 3)
    assert {u.status for u in coord.catalogue.units()} == {UNIT_DONE}
    for sha256 in finals.values():
        data = collect_stream(fetch(coord, "FetchCheckpoint", sha256, 0, worker.metadata))
        assert hashlib.sha256(data).hexdigest() == sha256
    assert set(finals.values()) <= coord.objects()
    assert coord.partials() == []


# --- 4. uploads that must be refused ---


def test_upload_needs_a_lease_the_worker_holds(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    owner, a = leased(coord)
    intruder = coord.register("site-b")
    data = checkpoints.path(a, 2).read_bytes()
    before = coord.snapshot()
    stolen = coord.signed_header(a, intruder, data, 2)
    refused(
        NOT_FOUND,
        "no lease",
        lambda: coord.upload(intruder, stolen, coord.chunks(data)),
    )
    unknown = coord.signed_header(a, owner, data, 2)
    unknown.lease_id = "l-0000000000000000"
    refused(NOT_FOUND, "no lease", lambda: coord.upload(owner, unknown, coord.chunks(data)))
    refused(
        NOT_FOUND,
        "no lease",
        lambda: upload_status(coord, intruder, a.lease_id, stolen.sha256),
    )
    assert coord.snapshot() == before
    assert unit(coord, 0).lease_id == a.lease_id


def test_upload_statement_must_match_the_lease(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    data = checkpoints.path(a, 2).read_bytes()
    before = coord.snapshot()
    mismatches: dict[str, Any] = {
        "unit": 1,
        "attempt": 2,
        "job_hash": "0" * 64,
        "job": "another-job",
        "key_id": "0123456789abcdef",
    }
    for name, value in mismatches.items():
        header = coord.signed_header(a, worker, data, 2, **{name: value})
        refused(
            PERMISSION_DENIED,
            f"statement {name} is {value!r}",
            lambda: coord.upload(worker, header, coord.chunks(data)),  # noqa: B023
        )
    # A statement about other bytes than the header announces.
    header = coord.signed_header(a, worker, data, 2, sha256="f" * 64)
    header.sha256 = hashlib.sha256(data).hexdigest()
    refused(
        PERMISSION_DENIED,
        "statement sha256",
        lambda: coord.upload(worker, header, coord.chunks(data)),
    )
    assert coord.snapshot() == before


def test_only_the_last_steps_checkpoint_may_be_final(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    early = checkpoints.path(a, 2).read_bytes()
    last = checkpoints.path(a, 4).read_bytes()
    before = coord.snapshot()
    for data, step, final in ((early, 2, True), (last, 4, False)):
        header = coord.signed_header(a, worker, data, step, final)
        refused(
            INVALID_ARGUMENT,
            "only the checkpoint at the last step is final",
            lambda: coord.upload(worker, header, coord.chunks(data)),  # noqa: B023
        )
    assert coord.snapshot() == before


def test_fetch_refuses_a_negative_offset(coord: Harness) -> None:
    worker, a = leased(coord)
    request = worker_pb2.FetchRequest(sha256=a.shards[0].sha256, offset=-1)
    refused(
        INVALID_ARGUMENT,
        "offset is -1",
        lambda: list(coord.worker.FetchShard(request, metadata=worker.metadata, timeout=10)),
    )


def test_upload_signature_must_be_the_workers_own(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    other = coord.register("site-b")
    data = checkpoints.path(a, 2).read_bytes()
    before = coord.snapshot()
    forged = coord.signed_header(a, worker, data, 2, signer=other.key)
    refused(
        PERMISSION_DENIED,
        "signature does not verify",
        lambda: coord.upload(worker, forged, coord.chunks(data)),
    )
    flipped = coord.signed_header(a, worker, data, 2)
    signature = bytearray(flipped.signature)
    signature[10] ^= 0x01
    flipped.signature = bytes(signature)
    refused(
        PERMISSION_DENIED,
        "signature does not verify",
        lambda: coord.upload(worker, flipped, coord.chunks(data)),
    )
    # Another worker's own, valid statement, sent on this worker's lease.
    theirs = coord.signed_header(a, other, data, 2)
    refused(
        PERMISSION_DENIED,
        "statement key_id",
        lambda: coord.upload(worker, theirs, coord.chunks(data)),
    )
    assert coord.snapshot() == before


def test_upload_whose_bytes_differ_from_the_digest_stores_nothing(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    data = checkpoints.path(a, 2).read_bytes()
    header = coord.signed_header(a, worker, data, 2)
    altered = bytearray(data)
    altered[len(data) // 2] ^= 0xFF
    before = coord.snapshot()
    refused(
        (grpc.StatusCode.DATA_LOSS, INVALID_ARGUMENT),
        "digest",
        lambda: coord.upload(worker, header, coord.chunks(bytes(altered))),
    )
    assert coord.snapshot() == before  # no object and no partial upload left
    assert coord.catalogue.list_checkpoints() == []


def test_upload_of_a_signed_file_that_is_no_valid_checkpoint_stores_nothing(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    before = coord.snapshot()
    junk = os.urandom(3000)
    refused(
        INVALID_ARGUMENT,
        "not a tspace checkpoint",
        lambda: coord.upload(worker, coord.signed_header(a, worker, junk, 2), [junk]),
    )
    # Genuine checkpoint bytes of another unit, signed as this unit's.
    other_unit = checkpoints.path(a, 2, unit=1).read_bytes()
    refused(
        INVALID_ARGUMENT,
        "differs from the signed statement",
        lambda: coord.upload(
            worker, coord.signed_header(a, worker, other_unit, 2), coord.chunks(other_unit)
        ),
    )
    # The bytes of the job's own data shard: refused, and the shard must survive.
    shard = a.shards[0]
    shard_bytes = collect_stream(fetch(coord, "FetchShard", shard.sha256, 0, worker.metadata))
    refused(
        INVALID_ARGUMENT,
        "not a tspace checkpoint",
        lambda: coord.upload(
            worker, coord.signed_header(a, worker, shard_bytes, 2), coord.chunks(shard_bytes)
        ),
    )
    assert coord.snapshot() == before
    again = collect_stream(fetch(coord, "FetchShard", shard.sha256, 0, worker.metadata))
    assert hashlib.sha256(again).hexdigest() == shard.sha256


def test_upload_stream_shape_and_bounds_are_checked(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    data = checkpoints.path(a, 2).read_bytes()
    before = coord.snapshot()
    limit = coord.config.max_checkpoint_bytes
    huge = coord.signed_header(a, worker, data, 2, size=limit + 1)
    refused(INVALID_ARGUMENT, f"not in 1..{limit}", lambda: coord.upload(worker, huge, []))
    refused(
        INVALID_ARGUMENT,
        "must start with its header",
        lambda: coord.upload(worker, None, coord.chunks(data)),
    )
    refused(INVALID_ARGUMENT, "must start with its header", lambda: coord.upload(worker, None, []))
    beyond = coord.signed_header(a, worker, data, 2, offset=len(data) + 1)
    refused(INVALID_ARGUMENT, "out of range", lambda: coord.upload(worker, beyond, []))
    oversized_chunk = coord.signed_header(a, worker, data, 2)
    refused(
        INVALID_ARGUMENT,
        "chunks of <= 1 MiB",
        lambda: coord.upload(worker, oversized_chunk, [data[: 2 * CHUNK_BYTES]]),
    )
    small = os.urandom(1000)
    short_header = coord.signed_header(a, worker, small[:-1], 2)
    refused(INVALID_ARGUMENT, "limit", lambda: coord.upload(worker, short_header, [small]))
    assert coord.snapshot() == before


# --- 5. interrupted uploads resume ---


def test_truncated_upload_resumes_from_the_received_offset(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    data = checkpoints.path(a, 2).read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    assert len(data) > 3 * CHUNK_BYTES
    header = coord.signed_header(a, worker, data, 2)
    sent = 2 * CHUNK_BYTES
    refused(
        FAILED_PRECONDITION,
        f"upload incomplete: {sent} of {len(data)} bytes; resume from offset {sent}",
        lambda: coord.upload(worker, header, coord.chunks(data[:sent])),
    )
    assert coord.catalogue.list_checkpoints() == []
    assert sha256 not in coord.objects()
    status = upload_status(coord, worker, a.lease_id, sha256)
    assert (status.offset, status.complete) == (sent, False)

    interrupted = coord.snapshot()
    wrong = coord.signed_header(a, worker, data, 2, offset=CHUNK_BYTES)
    refused(
        FAILED_PRECONDITION,
        f"does not match the {sent} bytes held",
        lambda: coord.upload(worker, wrong, coord.chunks(data, CHUNK_BYTES)),
    )
    assert coord.snapshot() == interrupted

    resume = coord.signed_header(a, worker, data, 2, offset=sent)
    response = coord.upload(worker, resume, coord.chunks(data, sent))
    ref = response.checkpoint
    assert not response.already_registered
    assert (ref.sha256, ref.size, ref.step, ref.unit, ref.job, ref.final) == (
        sha256,
        len(data),
        2,
        0,
        "tiny",
        False,
    )
    assert (ref.key_id, ref.public_key) == (worker.key_id, public_key_bytes(worker.key))
    assert [c.sha256 for c in coord.catalogue.list_checkpoints()] == [sha256]
    assert sha256 in coord.objects() and coord.partials() == []
    stored = coord.blobs / "objects" / sha256[:2] / sha256
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha256
    assert upload_status(coord, worker, a.lease_id, sha256).complete

    registered = coord.snapshot()
    again = coord.upload_file(worker, a, checkpoints.path(a, 2), 2)
    assert again.already_registered and again.checkpoint.sha256 == sha256
    assert coord.snapshot() == registered
    assert len(coord.catalogue.list_checkpoints()) == 1


def test_partial_uploads_of_ended_leases_and_crash_leftovers_are_removed(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    data = checkpoints.path(a, 2).read_bytes()
    header = coord.signed_header(a, worker, data, 2)
    with pytest.raises(grpc.RpcError):
        coord.upload(worker, header, coord.chunks(data[:CHUNK_BYTES]))
    assert [p.name for p in coord.partials()] == [f"{a.lease_id}.{header.sha256}.part"]
    time.sleep(coord.config.lease_check_interval_s + 0.5)
    assert len(coord.partials()) == 1  # the lease is active: the upload may still resume
    request = worker_pb2.FailUnitRequest(lease_id=a.lease_id, error="preempted")
    coord.worker.FailUnit(request, metadata=worker.metadata, timeout=TIMEOUT_S)
    # Keyed by a lease that ended, nobody can resume it: the reaper drops it.
    wait_until(lambda: coord.partials() == [], coord.config.lease_check_interval_s + 5)
    # A temporary file a crash left behind goes when the coordinator starts again.
    leftover = coord.blobs / "uploads" / "0123abcd.tmp"
    leftover.write_bytes(b"half a checkpoint")
    coord.restart()
    assert not leftover.exists()


# --- 6. completing a unit ---


def test_complete_unit_needs_the_units_final_checkpoint(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    b = coord.assignment(worker)
    partial = coord.upload_file(worker, a, checkpoints.path(a, 2), 2).checkpoint.sha256
    others = coord.upload_file(worker, b, checkpoints.path(b, STEPS), STEPS, final=True)
    before = coord.snapshot()
    refused(FAILED_PRECONDITION, "is not final", lambda: coord.complete(worker, a, partial))
    refused(NOT_FOUND, "no checkpoint", lambda: coord.complete(worker, a, "0" * 64))
    refused(
        INVALID_ARGUMENT,
        f"not to tiny unit {a.unit}",
        lambda: coord.complete(worker, a, others.checkpoint.sha256),
    )
    assert coord.snapshot() == before
    assert (unit(coord, a.unit).status, unit(coord, a.unit).lease_id) == (UNIT_LEASED, a.lease_id)

    final = coord.upload_file(worker, a, checkpoints.path(a, STEPS), STEPS, final=True)
    assert coord.complete(worker, a, final.checkpoint.sha256) == ""
    assert unit(coord, a.unit).status == UNIT_DONE
    refused(
        FAILED_PRECONDITION,
        "is completed",
        lambda: coord.complete(worker, a, final.checkpoint.sha256),
    )


# --- 7. lease expiry ---


def test_expired_leases_requeue_the_unit_then_fail_it(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    coord.create_job()
    worker = coord.register()
    path = checkpoints.path(planned(coord, 0), 2)  # made before a 1 s lease starts ticking
    coord.restart(lease_ttl_s=1.0, max_attempts=2)
    first = coord.assignment(worker)
    leased_at = time.time()
    assert first.unit == 0
    sha256 = coord.upload_file(worker, first, path, 2).checkpoint.sha256
    rest = [coord.assignment(worker) for _ in range(2)]
    assert set(statuses(coord).values()) == {UNIT_LEASED}

    def only_unit_0_leased() -> bool:
        assert not coord.heartbeat(worker, first.lease_id).cancel
        return statuses(coord) == {0: UNIT_LEASED, 1: UNIT_PENDING, 2: UNIT_PENDING}

    # Heartbeats keep unit 0's lease past its first expiry while the others run out.
    wait_until(only_unit_0_leased, timeout_s=5.0)
    assert time.time() > leased_at + 1.0
    wait_until(lambda: statuses(coord)[0] == UNIT_PENDING, timeout_s=5.0)
    record = unit(coord, 0)
    assert (record.attempts, record.last_error, record.lease_id) == (1, "lease expired", None)
    assert coord.heartbeat(worker, first.lease_id).cancel
    refused(FAILED_PRECONDITION, "expired", lambda: coord.upload_file(worker, first, path, 2))

    successor = coord.register("site-b")
    second = coord.assignment(successor)
    assert (second.unit, second.attempt) == (0, 2)
    assert second.resume_from is not None
    assert (second.resume_from.sha256, second.resume_from.step) == (sha256, 2)
    for previous in rest:
        again = coord.assignment(successor)
        assert (again.unit, again.attempt, again.resume_from) == (previous.unit, 2, None)

    wait_until(lambda: set(statuses(coord).values()) == {UNIT_FAILED}, timeout_s=5.0)
    assert all((u.attempts, u.last_error) == (2, "lease expired") for u in coord.catalogue.units())
    assert coord.heartbeat(successor, second.lease_id).cancel
    (job,) = coord.catalogue.list_jobs()
    assert job.units_failed == 3
    over = coord.acquire(successor)
    assert over.WhichOneof("result") == "no_work" and over.no_work.finished


# --- 8. health ---


def test_health_service_reports_serving(coord: Harness) -> None:
    response = coord.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


# --- 9. restart ---


def test_restart_keeps_credentials_leases_and_checkpoints(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    sha256 = coord.upload_file(worker, a, checkpoints.path(a, 2), 2).checkpoint.sha256
    expiry = ("leases", "expires_at")
    before, lease = coord.snapshot(moving=(expiry,)), coord.catalogue.get_lease(a.lease_id)
    old_address = coord.coordinator.address if coord.coordinator else ""

    restarted = time.time()
    coord.restart()
    assert coord.coordinator is not None and coord.coordinator.address != old_address
    assert coord.snapshot(moving=(expiry,)) == before
    # The restarted coordinator gives the lease at least one TTL from its start to check in.
    grace = restarted + coord.config.lease_ttl_s
    assert coord.catalogue.get_lease(a.lease_id).expires_at >= max(lease.expires_at, grace)
    health = coord.health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert not coord.heartbeat(worker, a.lease_id).cancel
    assert upload_status(coord, worker, a.lease_id, sha256).complete
    assert coord.assignment(worker).unit == 1

    final = coord.upload_file(worker, a, checkpoints.path(a, STEPS), STEPS, final=True)
    assert coord.complete(worker, a, final.checkpoint.sha256) == ""
    workers = coord.admin.ListWorkers(
        admin_pb2.ListWorkersRequest(), metadata=coord.admin_metadata, timeout=TIMEOUT_S
    )
    assert [(w.worker_id, w.units_done) for w in workers.workers] == [(worker.worker_id, 1)]
