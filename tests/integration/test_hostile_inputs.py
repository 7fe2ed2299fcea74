"""What a peer with a valid credential may still try: names that would be paths, numbers out of
range, uploads too large for the job's model, bytes that shadow another unit's checkpoint, and
statements replayed by another worker. Each is refused with a clear status and changes nothing.
Also: the checkpoint of a revoked worker, retrained byte for byte by another, is vouched for by
the new signer instead of being refused."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from coordinator import limits
from tspace_core import serde
from tspace_core.catalogue.records import ShardRecord
from tspace_core.errors import TspaceError
from tspace_core.proto.tspace.v1 import admin_pb2, worker_pb2
from worker.agent import check_names

if TYPE_CHECKING:
    from conftest import CheckpointMaker, Harness, WorkerClient

TIMEOUT_S = 30.0

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
TRAVERSAL = "../../../../etc/passwd"


def refused(code: grpc.StatusCode, fragment: str, call: Callable[[], Any]) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    assert fragment in err.details(), f"{fragment!r} not in {err.details()!r}"


def leased(coord: Harness) -> tuple[WorkerClient, serde.Assignment]:
    coord.create_job()
    worker = coord.register()
    return worker, coord.assignment(worker)


def test_names_that_would_be_paths_are_refused(coord: Harness) -> None:
    worker, a = leased(coord)
    before = coord.snapshot()
    w, admin = worker.metadata, coord.admin_metadata
    calls: list[tuple[str, Callable[[], Any]]] = [
        (
            "sha256 must be 64",
            lambda: list(
                coord.worker.FetchShard(
                    worker_pb2.FetchRequest(sha256=TRAVERSAL), metadata=w, timeout=TIMEOUT_S
                )
            ),
        ),
        (
            "sha256 must be 64",
            lambda: list(
                coord.worker.FetchCheckpoint(
                    worker_pb2.FetchRequest(sha256=TRAVERSAL), metadata=admin, timeout=TIMEOUT_S
                )
            ),
        ),
        (
            "lease_id is not a lease id",
            lambda: coord.worker.Heartbeat(
                worker_pb2.HeartbeatRequest(lease_id=TRAVERSAL), metadata=w, timeout=TIMEOUT_S
            ),
        ),
        (
            "lease_id is not a lease id",
            lambda: coord.worker.UploadStatus(
                worker_pb2.UploadStatusRequest(lease_id=TRAVERSAL, sha256="0" * 64),
                metadata=w,
                timeout=TIMEOUT_S,
            ),
        ),
        (
            "sha256 must be 64",
            lambda: coord.worker.CompleteUnit(
                worker_pb2.CompleteUnitRequest(lease_id=a.lease_id, sha256=TRAVERSAL),
                metadata=w,
                timeout=TIMEOUT_S,
            ),
        ),
        (
            "site",
            lambda: coord.admin.Enroll(
                admin_pb2.EnrollRequest(site=TRAVERSAL), metadata=admin, timeout=TIMEOUT_S
            ),
        ),
        (
            "alias",
            lambda: coord.admin.SetAlias(
                admin_pb2.SetAliasRequest(alias="../best", ensemble="tiny:final"),
                metadata=admin,
                timeout=TIMEOUT_S,
            ),
        ),
    ]
    for fragment, call in calls:
        refused(INVALID, fragment, call)
    assert coord.snapshot() == before


def test_numbers_out_of_range_are_refused_and_a_diverged_loss_is_kept(coord: Harness) -> None:
    worker, a = leased(coord)
    before = coord.snapshot()
    bad = [
        ({"step": -1}, "step is -1"),
        ({"step": 2**31}, "step is 2147483648"),
        ({"images_per_s": math.nan}, "images_per_s is nan"),
        ({"images_per_s": math.inf}, "images_per_s is inf"),
        ({"images_per_s": -5.0}, "images_per_s is -5.0"),
    ]
    for fields, fragment in bad:
        request = worker_pb2.HeartbeatRequest(lease_id=a.lease_id, **fields)
        refused(
            INVALID,
            fragment,
            lambda request=request: coord.worker.Heartbeat(
                request, metadata=worker.metadata, timeout=TIMEOUT_S
            ),
        )
    refused(
        INVALID,
        "offset is",
        lambda: list(
            coord.worker.FetchShard(
                worker_pb2.FetchRequest(sha256=a.shards[0].sha256, offset=-7),
                metadata=worker.metadata,
                timeout=TIMEOUT_S,
            )
        ),
    )
    assert coord.snapshot() == before
    # A diverged run reports NaN: the heartbeat still keeps the lease, and the loss reads inf.
    request = worker_pb2.HeartbeatRequest(lease_id=a.lease_id, step=1, loss=math.nan)
    assert not coord.worker.Heartbeat(request, metadata=worker.metadata, timeout=TIMEOUT_S).cancel
    assert coord.catalogue.get_lease(a.lease_id).loss == math.inf


def test_registration_fields_are_checked_before_the_token_is_spent(coord: Harness) -> None:
    from tspace_core.signing import generate_key, public_key_bytes

    token = coord.enroll()
    key = public_key_bytes(generate_key())
    before = coord.snapshot()
    bad = [
        ({"token": token, "device": "cpu\x1b[31m"}, "device must be"),
        ({"token": token, "hostname": "h" * 300}, "hostname must be"),
        ({"token": token + "/../x"}, "join token is malformed"),
        ({"token": token, "csr": b"x" * 10_000}, "csr is too large"),
    ]
    for fields, fragment in bad:
        request = worker_pb2.RegisterRequest(public_key=key, **fields)
        refused(
            INVALID,
            fragment,
            lambda request=request: coord.worker.Register(request, timeout=TIMEOUT_S),
        )
    assert coord.snapshot() == before
    ok = worker_pb2.RegisterRequest(token=token, public_key=key, device="cpu", hostname="h")
    assert coord.worker.Register(ok, timeout=TIMEOUT_S).worker_id


def test_an_upload_larger_than_the_jobs_model_allows_is_refused(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    data = checkpoints.path(a, 2).read_bytes()
    limit = limits.checkpoint_limit(coord.catalogue.get_job("tiny").spec_json)
    # The bound is about the model: a real checkpoint fits well inside it, a 64 MiB one cannot.
    assert len(data) < limit < coord.config.max_checkpoint_bytes
    assert limit < 64 * 2**20
    before = coord.snapshot()
    header = coord.signed_header(a, worker, data, 2, size=limit + 1)
    refused(
        INVALID,
        f"more than a checkpoint of job tiny's model can be ({limit} bytes)",
        lambda: coord.upload(worker, header, []),
    )
    assert coord.snapshot() == before


def test_bytes_of_another_units_checkpoint_cannot_be_registered_again(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    data = checkpoints.path(a, 2).read_bytes()
    coord.upload(worker, coord.signed_header(a, worker, data, 2), coord.chunks(data))
    other = coord.register("site-b")
    b = coord.assignment(other)
    assert b.unit == 1
    before = coord.snapshot()
    # B signs unit 0's bytes as its own unit 1: the digest names unit 0 already.
    header = coord.signed_header(b, other, data, 2)
    refused(INVALID, "not what the statement says", lambda: coord.upload(other, header, []))
    refused(
        INVALID,
        "not what the statement says",
        lambda: coord.upload(other, header, coord.chunks(data)),
    )
    assert coord.snapshot() == before
    record = coord.catalogue.get_checkpoint(hashlib.sha256(data).hexdigest())
    assert (record.unit, record.worker_id) == (0, worker.worker_id)


def test_a_statement_signed_for_one_lease_is_useless_to_another_worker(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    data = checkpoints.path(a, 2).read_bytes()
    header = coord.signed_header(a, worker, data, 2)
    other = coord.register("site-b")
    before = coord.snapshot()
    # Replayed verbatim by another worker (who holds no such lease) ...
    refused(grpc.StatusCode.NOT_FOUND, "no lease", lambda: coord.upload(other, header, []))
    # ... or re-pointed at the other worker's own lease: the statement names A's key and lease.
    b = coord.assignment(other)
    header.lease_id = b.lease_id
    refused(DENIED, "statement", lambda: coord.upload(other, header, coord.chunks(data)))
    assert {k: v for k, v in coord.snapshot().items() if k != "tables"} == {
        k: v for k, v in before.items() if k != "tables"
    }
    assert coord.catalogue.list_checkpoints("tiny") == []


def test_a_revoked_signers_checkpoint_is_vouched_for_by_the_retrainer(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    worker, a = leased(coord)
    data = checkpoints.path(a, 2).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    coord.upload(worker, coord.signed_header(a, worker, data, 2), coord.chunks(data))
    coord.admin.RevokeWorker(
        admin_pb2.RevokeWorkerRequest(worker_id=worker.worker_id),
        metadata=coord.admin_metadata,
        timeout=TIMEOUT_S,
    )
    refused(DENIED, "revoked", lambda: coord.acquire(worker))
    assert not coord.catalogue.get_checkpoint(digest).trusted
    retrainer = coord.register("site-b")
    b = coord.assignment(retrainer)
    assert b.unit == 0 and b.resume_from is None  # the untrusted checkpoint is no resume point
    status = coord.worker.UploadStatus(
        worker_pb2.UploadStatusRequest(lease_id=b.lease_id, sha256=digest),
        metadata=retrainer.metadata,
        timeout=TIMEOUT_S,
    )
    assert (status.complete, status.offset) == (False, len(data))
    header = coord.signed_header(b, retrainer, data, 2, offset=len(data))
    refused(INVALID, "send the header alone", lambda: coord.upload(retrainer, header, [b"x"]))
    response = coord.upload(retrainer, header, [])
    assert not response.already_registered
    record = coord.catalogue.get_checkpoint(digest)
    assert record.trusted and record.worker_id == retrainer.worker_id
    assert coord.catalogue.newest_checkpoint("tiny", 0).sha256 == digest


def test_a_worker_refuses_names_from_the_coordinator_that_would_be_paths() -> None:
    shard = ShardRecord("shard-00000.safetensors", "a" * 64, 10, 5)
    good = serde.Assignment(
        "l-0123456789abcdef", "tiny", "b" * 64, "{}", 0, (1,), (0.5,), 1, 30.0, (shard,)
    )
    manifest = {"shards": [{"file": shard.name}]}
    check_names(good, manifest)
    bad_shard = ShardRecord("../../.bashrc", "a" * 64, 10, 5)
    cases = [
        (dataclasses.replace(good, lease_id="../outbox"), manifest),
        (dataclasses.replace(good, shards=(bad_shard,)), manifest),
        (dataclasses.replace(good, job_hash="../x"), manifest),
        (good, {"shards": [{"file": "../../evil"}]}),
        (good, {"files": []}),
    ]
    for assignment, man in cases:
        with pytest.raises(TspaceError, match="coordinator sent"):
            check_names(assignment, man)


def test_admin_requests_with_unstorable_text_or_endless_intervals_are_refused(
    coord: Harness,
) -> None:
    coord.create_job()
    before = coord.snapshot()
    admin = coord.admin_metadata
    # PostgreSQL cannot store or even compare NUL characters: refused on every database alike.
    refused(
        INVALID,
        "must not contain NUL",
        lambda: coord.admin.ListUnits(
            admin_pb2.ListUnitsRequest(job="tiny\x00"), metadata=admin, timeout=TIMEOUT_S
        ),
    )
    for interval in (1e9, math.inf, math.nan, -1.0):
        refused(
            INVALID,
            "interval_s must be in [0, 3600]",
            lambda interval=interval: list(
                coord.admin.Status(
                    admin_pb2.StatusRequest(interval_s=interval), metadata=admin, timeout=5
                )
            ),
        )
    assert coord.snapshot() == before


def test_a_refused_job_leaves_no_shards_and_an_image_bomb_is_refused(
    coord: Harness, tmp_path: Path
) -> None:
    from PIL import Image

    coord.create_job()
    before = coord.snapshot()
    # The same name with another spec is refused after its data was packed: the shards go.
    other = coord.job_toml().replace("[data]", "[data]\nshards = 3")
    refused(
        grpc.StatusCode.ALREADY_EXISTS,
        "tiny",
        lambda: coord.admin.CreateJob(
            admin_pb2.CreateJobRequest(spec_toml=other),
            metadata=coord.admin_metadata,
            timeout=120,
        ),
    )
    assert coord.snapshot() == before
    # An image whose header claims ten billion pixels is refused, not decoded.
    folder = tmp_path / "bomb"
    folder.mkdir()
    for i in range(2):
        Image.new("L", (8, 8)).save(folder / f"ok{i}.png")
    png = (folder / "ok0.png").read_bytes()
    at = png.index(b"IHDR")  # width, height, then 5 more bytes; its CRC must still match
    ihdr = (100_000).to_bytes(4, "big") * 2 + png[at + 12 : at + 17]
    crc = zlib.crc32(b"IHDR" + ihdr).to_bytes(4, "big")
    (folder / "bomb.png").write_bytes(png[: at + 4] + ihdr + crc + png[at + 21 :])
    spec = coord.job_toml("bomb").replace('source = "digits"', f'source = "{folder}"')
    refused(
        INVALID,
        "could be decompression bomb",
        lambda: coord.admin.CreateJob(
            admin_pb2.CreateJobRequest(spec_toml=spec),
            metadata=coord.admin_metadata,
            timeout=120,
        ),
    )
    assert coord.snapshot() == before
