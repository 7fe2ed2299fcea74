"""The operator's `tspace-coord` commands against a served coordinator (SQLite and PostgreSQL):
jobs, units, workers, join tokens, checkpoints and ensembles; --json says what the catalogue
holds, refusals read as the coordinator's one-line message, and checkpoint verification fails
loudly on a corrupt file."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.config import Endpoint, write_endpoint
from tspace_core import serde
from tspace_core.checkpoint import load_checkpoint, save_checkpoint
from tspace_core.errors import TspaceError
from tspace_core.proto.tspace.v1 import worker_pb2
from tspace_core.rpc import CREDENTIAL_HEADER
from tspace_core.signing import generate_key, key_id, public_key_bytes

if TYPE_CHECKING:
    from conftest import CheckpointMaker, Harness, WorkerClient

REPO = Path(__file__).resolve().parents[2]
STEPS = 4  # the tiny job's training.steps
TIMEOUT_S = 30.0
# Wide enough that no table cell is cut; no colour codes in what the tests read.
ENV = {"COLUMNS": "400", "NO_COLOR": "1"}
RUNNER = CliRunner(env=ENV)
JOB_KEYS = {
    "name",
    "job_hash",
    "status",
    "total_steps",
    "created_at",
    "units",
    "units_done",
    "units_failed",
}
UNIT_KEYS = {
    "job",
    "unit",
    "timesteps",
    "status",
    "attempts",
    "total_steps",
    "last_error",
    "worker_id",
    "step",
    "loss",
    "images_per_s",
    "newest_step",
    "newest_checkpoint_at",
}


# --- running the CLI ---


def serving(coord: Harness) -> Path:
    """The coordinator folder with the endpoint `serve` would have written (plaintext)."""
    assert coord.coordinator is not None
    write_endpoint(coord.folder, Endpoint(coord.coordinator.address))
    return coord.folder


def cli(coord: Harness, *args: str, code: int = 0) -> Result:
    """`tspace-coord ARGS --dir FOLDER` in-process; expect exit `code`."""
    result = RUNNER.invoke(app, [*args, "--dir", str(coord.folder)])
    context = f"stdout={result.stdout!r} stderr={result.stderr!r} exception={result.exception!r}"
    assert result.exit_code == code, context
    return result


def cli_json(coord: Harness, *args: str, code: int = 0) -> Any:
    return json.loads(cli(coord, *args, "--json", code=code).stdout)


def refused(coord: Harness, *args: str, fragment: str) -> str:
    """Run the command; expect a TspaceError (what `main` prints as "error: ...", exit 2)
    whose message holds `fragment`, and no output on stdout."""
    result = RUNNER.invoke(app, [*args, "--dir", str(coord.folder)])
    assert isinstance(result.exception, TspaceError), (result.stdout, result.exception)
    message = str(result.exception)
    assert fragment in message, message
    assert "\n" not in message and result.stdout == "", (message, result.stdout)
    return message


def script(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m coordinator ARGS` as its own process."""
    return subprocess.run(
        [sys.executable, "-m", "coordinator", *args],
        cwd=REPO,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    """Exit 2, a single "error: ..." line on stderr holding `fragment`, no traceback."""
    context = f"rc={result.returncode} stdout={result.stdout!r} stderr={result.stderr!r}"
    assert result.returncode == 2, context
    assert "Traceback" not in result.stdout + result.stderr, context
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), context
    assert fragment in lines[0], context


# --- a trained job: every unit done, two checkpoints each with a recorded loss ---

# loss by (unit, step): unit 0 was best at step 2, the others at their final step 4.
LOSSES = {(0, 2): 0.2, (0, 4): 0.5, (1, 2): 0.6, (1, 4): 0.3, (2, 2): 0.7, (2, 4): 0.4}


@dataclass
class Trained:
    worker: WorkerClient
    digests: dict[tuple[int, int], str]  # (unit, step) -> sha256


def with_loss(checkpoints: CheckpointMaker, a: serde.Assignment, step: int, loss: float) -> Path:
    """A genuine checkpoint of the unit at `step` whose metadata records `loss`."""
    path = checkpoints.path(a, step)
    out = path.with_name(f"{path.stem}-loss{loss}.safetensors")
    if not out.exists():
        ckpt = load_checkpoint(path)
        save_checkpoint(out, ckpt.tensors, {**ckpt.meta, "metrics": {"loss": loss}})
    return out


def train_tiny(coord: Harness, checkpoints: CheckpointMaker) -> Trained:
    coord.create_job()
    worker = coord.register()
    digests = {}
    for _ in range(3):
        a = coord.assignment(worker)
        for step in (2, STEPS):
            path = with_loss(checkpoints, a, step, LOSSES[(a.unit, step)])
            response = coord.upload_file(worker, a, path, step, final=step == STEPS)
            digests[(a.unit, step)] = response.checkpoint.sha256
        coord.complete(worker, a, digests[(a.unit, STEPS)])
    return Trained(worker, digests)


# --- jobs and units ---


def test_jobs_pause_resume_cancel_and_units_retry(coord: Harness, tmp_path: Path) -> None:
    coord.restart(max_attempts=1)  # one failed lease fails its unit
    serving(coord)
    spec = tmp_path / "digits.toml"
    spec.write_text(coord.job_toml("digits"))
    created = cli(coord, "jobs", "create", str(spec)).stdout
    assert created.startswith("job digits created: 3 units of 4 steps"), created

    (listed,) = cli_json(coord, "jobs", "list")
    assert set(listed) == JOB_KEYS
    (job,) = coord.catalogue.list_jobs()
    assert listed == {k: getattr(job, k) for k in JOB_KEYS}
    assert (listed["status"], listed["units"], listed["units_done"]) == ("active", 3, 0)
    assert cli_json(coord, "jobs", "create", str(spec)) == listed  # the same spec: the same job
    table = cli(coord, "jobs", "list").stdout
    assert "digits" in table and "0/3" in table and job.job_hash[:12] in table

    worker = coord.register()
    first, _second = coord.assignment(worker), coord.assignment(worker)
    shown = cli_json(coord, "jobs", "show", "digits")
    assert set(shown) == {"job", "spec", "shards", "units", "ensembles"}
    assert shown["job"] == listed
    assert (shown["spec"]["name"], shown["spec"]["job_hash"]) == ("digits", job.job_hash)
    assert shown["spec"]["units"] == [list(u["timesteps"]) for u in shown["units"]]
    assert [s["sha256"] for s in shown["shards"]] == [s.sha256 for s in job.shards]
    assert [u["status"] for u in shown["units"]] == ["leased", "leased", "pending"]
    assert {u["worker_id"] for u in shown["units"][:2]} == {worker.worker_id}
    assert all(set(u) == UNIT_KEYS for u in shown["units"]) and shown["ensembles"] == []
    human = cli(coord, "jobs", "show", "digits").stdout
    images = sum(s.count for s in job.shards)
    assert f"{len(job.shards)} ({images} images" in human and worker.worker_id in human

    paused = cli(coord, "jobs", "pause", "digits").stdout.strip()
    assert paused == (
        "job digits paused: 2 running units stopped; `tspace-coord jobs resume digits` continues it"
    )
    units = cli_json(coord, "units", "list", "--job", "digits")
    assert [u["status"] for u in units] == ["pending"] * 3
    assert coord.heartbeat(worker, first.lease_id).cancel
    assert coord.acquire(worker).WhichOneof("result") == "no_work"
    refused(coord, "jobs", "pause", "digits", fragment="job 'digits' is already paused")
    resumed = cli(coord, "jobs", "resume", "digits").stdout.strip()
    assert resumed == "job digits resumed: 3 of 3 units left to train"
    refused(coord, "jobs", "resume", "digits", fragment="active, not paused")
    refused(coord, "jobs", "show", "nope", fragment="no job named 'nope'")
    refused(coord, "units", "list", "--job", "nope", fragment="no job named 'nope'")

    # A unit out of attempts: listed as failed with its error cut short, then retried.
    lease = coord.assignment(worker)
    error = "CUDA out of memory while training " + "x" * 200
    coord.worker.FailUnit(
        worker_pb2.FailUnitRequest(lease_id=lease.lease_id, error=error),
        metadata=worker.metadata,
        timeout=TIMEOUT_S,
    )
    (failed,) = cli_json(coord, "units", "list", "--status", "failed")
    assert (failed["unit"], failed["last_error"], failed["attempts"]) == (lease.unit, error, 1)
    row = cli(coord, "units", "list", "--status", "failed").stdout
    assert "CUDA out of memory" in row and "…" in row and error not in row
    assert cli_json(coord, "units", "list", "--status", "done") == []
    refused(coord, "units", "list", "--status", "broken", fragment="use one of pending")
    retried = cli(coord, "units", "retry", "digits", str(lease.unit)).stdout
    assert f"unit {lease.unit} of digits is pending again with fresh attempts" in retried
    assert coord.catalogue.units("digits")[lease.unit].attempts == 0
    refused(coord, "units", "retry", "digits", str(lease.unit), fragment="is pending, not failed")
    refused(coord, "units", "retry", "digits", "7", fragment="has no unit 7")

    coord.assignment(worker)
    cancelled = cli(coord, "jobs", "cancel", "digits").stdout.strip()
    assert cancelled == "job digits cancelled: 1 running unit stopped; cancelling is final"
    assert cli_json(coord, "jobs", "list")[0]["status"] == "cancelled"
    refused(coord, "jobs", "cancel", "digits", fragment="already cancelled")
    refused(coord, "jobs", "resume", "digits", fragment="cancelled, which is final")


def test_checkpoints_units_and_ensembles_of_a_trained_job(
    coord: Harness, checkpoints: CheckpointMaker
) -> None:
    serving(coord)
    trained = train_tiny(coord, checkpoints)
    d = trained.digests
    refused(coord, "jobs", "cancel", "tiny", fragment="job 'tiny' is done")
    refused(coord, "units", "retry", "tiny", "1", fragment="unit 1 of 'tiny' is done, not failed")
    # Refusals through the script: one line, exit 2.
    assert_one_line_error(
        script("jobs", "pause", "tiny", "--dir", str(coord.folder)), "job 'tiny' is done"
    )

    # checkpoints list
    listed = cli_json(coord, "checkpoints", "list")
    assert {(c["unit"], c["step"]): c["sha256"] for c in listed} == d
    for c in listed:
        assert c["metrics"] == {"loss": LOSSES[(c["unit"], c["step"])]}
        assert (c["worker_id"], c["key_id"]) == (trained.worker.worker_id, trained.worker.key_id)
        assert (c["trusted"], c["discarded"], c["final"]) == (True, False, c["step"] == STEPS)
        assert c["public_key"] == public_key_bytes(trained.worker.key).hex()
        assert json.loads(bytes.fromhex(c["statement"]))["sha256"] == c["sha256"]
    one = cli_json(coord, "checkpoints", "list", "--job", "tiny", "--unit", "1")
    assert sorted(c["step"] for c in one) == [2, STEPS] and {c["unit"] for c in one} == {1}
    table = cli(coord, "checkpoints", "list").stdout
    assert all(sha[:12] in table for sha in d.values()) and "loss=0.2" in table
    refused(coord, "checkpoints", "list", "--job", "nope", fragment="no job named 'nope'")

    # ensembles: the final one, one by best:loss, one with a unit picked by hand
    (final,) = cli_json(coord, "ensembles", "list")
    assert final["name"] == "tiny:final" and final["aliases"] == []
    assert {m["unit"]: m["checkpoint"]["sha256"] for m in final["members"]} == {
        u: d[(u, STEPS)] for u in range(3)
    }
    best = cli(coord, "ensembles", "register", "best", "--job", "tiny", "--select", "best:loss")
    assert best.stdout.strip() == "ensemble best registered: 3 members of job tiny (best:loss)"
    shown = cli_json(coord, "ensembles", "show", "best")
    assert {m["unit"]: m["checkpoint"]["sha256"] for m in shown["members"]} == {
        0: d[(0, 2)],
        1: d[(1, STEPS)],
        2: d[(2, STEPS)],
    }
    assert len(shown["alphas_cumprod"]) == len(shown["timesteps"]) > 0
    pick = f"1={d[(1, 2)][:10]}"
    cli(coord, "ensembles", "register", "picked", "--job", "tiny", "--checkpoint", pick)
    picked = cli_json(coord, "ensembles", "show", "picked")
    assert {m["unit"]: m["checkpoint"]["sha256"] for m in picked["members"]} == {
        0: d[(0, STEPS)],
        1: d[(1, 2)],
        2: d[(2, STEPS)],
    }
    for bad in ("3=", "x=abcdef12", "1"):
        refused(
            coord,
            "ensembles",
            "register",
            "e",
            "--job",
            "tiny",
            "--checkpoint",
            bad,
            fragment="use UNIT=DIGEST",
        )
    refused(
        coord,
        "ensembles",
        "register",
        "e",
        "--job",
        "tiny",
        "--select",
        "worst",
        fragment="unknown selection 'worst'",
    )
    refused(
        coord,
        "ensembles",
        "register",
        "best",
        "--job",
        "tiny",
        fragment="an ensemble named 'best' already exists",
    )

    aliased = cli(coord, "ensembles", "alias", "production", "best").stdout.strip()
    assert aliased == "alias production now names ensemble best"
    by_alias = cli_json(coord, "ensembles", "show", "production")
    assert (by_alias["name"], by_alias["aliases"]) == ("best", ["production"])
    human = cli(coord, "ensembles", "show", "production").stdout
    assert "best" in human and "production" in human and d[(0, 2)][:12] in human
    assert trained.worker.key_id in human
    listed_ensembles = {e["name"]: e["aliases"] for e in cli_json(coord, "ensembles", "list")}
    assert listed_ensembles == {"tiny:final": [], "best": ["production"], "picked": []}
    cli(coord, "ensembles", "alias", "production", "picked")
    assert cli_json(coord, "ensembles", "show", "production")["name"] == "picked"
    assert "production" in cli(coord, "ensembles", "list").stdout
    refused(coord, "ensembles", "show", "nope", fragment="no ensemble or alias named 'nope'")
    refused(coord, "ensembles", "alias", "prod", "nope", fragment="nope")

    # reset unit 0 to its step-2 checkpoint: pending again, its final one discarded
    reset = cli(coord, "units", "reset", "tiny", "0", "--checkpoint", d[(0, 2)][:12]).stdout
    assert reset.strip() == (
        f"unit 0 of tiny reset to step 2 ({d[(0, 2)][:12]}): pending, 1 later checkpoint discarded"
    )
    (pending,) = cli_json(coord, "units", "list", "--status", "pending")
    assert (pending["unit"], pending["newest_step"], pending["attempts"]) == (0, 2, 0)
    assert "step 2," in cli(coord, "units", "list", "--status", "pending").stdout
    assert cli_json(coord, "jobs", "list")[0]["status"] == "active"
    unit0 = {
        c["step"]: c["discarded"] for c in cli_json(coord, "checkpoints", "list", "--unit", "0")
    }
    assert unit0 == {2: False, STEPS: True}
    refused(
        coord,
        "units",
        "reset",
        "tiny",
        "0",
        "--checkpoint",
        d[(1, 2)],
        fragment="belongs to tiny unit 1",
    )
    refused(
        coord,
        "units",
        "reset",
        "tiny",
        "1",
        "--checkpoint",
        "0000000000",
        fragment="no checkpoint with digest 0000000000",
    )

    # verify: every checkpoint passes; then one stored file is corrupted
    verified = cli(coord, "checkpoints", "verify")
    lines = verified.stdout.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("ok ") for line in lines), lines
    assert "6 checkpoints verified: 6 ok, 0 failed" in verified.stderr
    (one_verdict,) = cli_json(coord, "checkpoints", "verify", d[(2, STEPS)][:12])
    assert one_verdict["ok"] and one_verdict["problems"] == []
    assert one_verdict["checkpoint"]["sha256"] == d[(2, STEPS)]
    assert len(cli_json(coord, "checkpoints", "verify", "--job", "tiny", "--unit", "1")) == 2
    refused(coord, "checkpoints", "verify", "abcdef12", "--job", "tiny", fragment="not both")

    blob = coord.blobs / "objects" / d[(2, STEPS)][:2] / d[(2, STEPS)]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert hashlib.sha256(data).hexdigest() != d[(2, STEPS)]
    result = script("checkpoints", "verify", "--dir", str(coord.folder))
    context = f"stdout={result.stdout!r} stderr={result.stderr!r}"
    assert result.returncode == 1 and "Traceback" not in result.stderr, context
    lines = result.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith("FAILED")]
    assert len(lines) == 6 and len(failed) == 1, context
    assert d[(2, STEPS)][:12] in failed[0] and "the file is corrupt" in failed[0], context
    assert "1 failed" in result.stderr, context
    verdicts = cli_json(coord, "checkpoints", "verify", "--unit", "2", code=1)
    assert {v["checkpoint"]["step"]: v["ok"] for v in verdicts} == {2: True, STEPS: False}
    assert [v["index"] for v in verdicts] == [1, 2] and {v["total"] for v in verdicts} == {2}


# --- workers and join tokens ---


def test_tokens_and_workers(coord: Harness, checkpoints: CheckpointMaker) -> None:
    serving(coord)
    created = cli(coord, "tokens", "create", "--site", "lab-a")
    token = created.stdout.strip()
    assert created.stdout == token + "\n" and len(token) >= 40  # the token alone on stdout
    token_id = hashlib.sha256(token.encode()).hexdigest()[:12]
    assert f"join token {token_id} for site lab-a; expires in 1d0h" in created.stderr
    other = cli_json(coord, "tokens", "create", "--site", "lab-b", "--expires", "90m")
    assert set(other) == {
        "token",
        "token_id",
        "site",
        "expires_in_s",
        "address",
        "ca_fingerprint",
        "enrol_address",
    }
    # This coordinator serves plaintext: no CA to pin, no registration port.
    assert other["address"] == coord.coordinator.address
    assert other["ca_fingerprint"] is None and other["enrol_address"] is None
    assert (other["site"], other["expires_in_s"]) == ("lab-b", 5400.0)
    assert other["token_id"] == hashlib.sha256(other["token"].encode()).hexdigest()[:12]
    for bad in ("5x", "0", "-3h", "1.5.2d"):
        refused(
            coord,
            "tokens",
            "create",
            "--site",
            "s",
            "--expires",
            bad,
            fragment="is not a duration",
        )
    refused(coord, "tokens", "create", "--site", "no site", fragment="site 'no site'")
    tokens = {t["site"]: t for t in cli_json(coord, "tokens", "list")}
    assert set(tokens) == {"lab-a", "lab-b"}
    assert {t["status"] for t in tokens.values()} == {"unused"}
    assert tokens["lab-a"]["token_id"] == token_id
    lab_b = tokens["lab-b"]
    assert lab_b["expires_at"] - lab_b["created_at"] == pytest.approx(5400.0)

    # A worker joins with the token the command printed.
    key = generate_key()
    registered = coord.worker.Register(
        worker_pb2.RegisterRequest(
            token=token, public_key=public_key_bytes(key), device="cpu", hostname="gpu-host-7"
        ),
        timeout=TIMEOUT_S,
    )
    worker_id = registered.worker_id
    tokens = {t["site"]: t for t in cli_json(coord, "tokens", "list")}
    assert (tokens["lab-a"]["status"], tokens["lab-a"]["worker_id"]) == ("used", worker_id)
    refused(coord, "tokens", "revoke", token_id, fragment=f"already used by worker {worker_id}")
    revoked = cli(coord, "tokens", "revoke", other["token_id"][:8]).stdout.strip()
    assert revoked == f"join token {other['token_id']} for site lab-b revoked"
    assert "revoked" in cli(coord, "tokens", "list").stdout
    refused(coord, "tokens", "revoke", other["token_id"], fragment="already revoked")
    refused(coord, "tokens", "revoke", "abcdef", fragment="no join token abcdef")

    coord.create_job()
    acquired = coord.worker.AcquireUnit(
        worker_pb2.AcquireUnitRequest(),
        metadata=((CREDENTIAL_HEADER, registered.credential),),
        timeout=TIMEOUT_S,
    )
    leased_unit = acquired.assignment.unit
    (listed,) = cli_json(coord, "workers", "list")
    assert (listed["worker_id"], listed["site"], listed["status"]) == (worker_id, "lab-a", "active")
    assert listed["key_id"] == key_id(public_key_bytes(key)) and 0 <= listed["last_seen_age_s"] < 60
    assert "public_key" not in listed  # not on the wire in a list
    shown = cli_json(coord, "workers", "show", worker_id)
    assert shown["public_key"] == public_key_bytes(key).hex()
    assert (shown["hostname"], shown["checkpoints"]) == ("gpu-host-7", 0)
    assert [(u["job"], u["unit"]) for u in shown["leased"]] == [("tiny", leased_unit)]
    human = cli(coord, "workers", "show", worker_id).stdout
    assert public_key_bytes(key).hex() in human and "gpu-host-7" in human

    # It completes the unit it holds with a final checkpoint it signed, and takes another.
    client = SimpleNamespace(
        worker_id=worker_id,
        key=key,
        key_id=key_id(public_key_bytes(key)),
        metadata=((CREDENTIAL_HEADER, registered.credential),),
    )
    done = serde.assignment_from_proto(acquired.assignment)
    final = coord.upload_file(client, done, checkpoints.path(done, STEPS), STEPS, final=True)
    coord.complete(client, done, final.checkpoint.sha256)
    running = coord.assignment(client)
    assert coord.catalogue.units("tiny")[done.unit].status == "done"

    # Revoking it requeues both: the one it was training and the one it completed.
    revoke = cli(coord, "workers", "revoke", worker_id).stdout.strip()
    requeued = ", ".join(f"tiny/{u}" for u in sorted((done.unit, running.unit)))
    assert revoke == (
        f"worker {worker_id} revoked: its credential is refused, 1 checkpoint it signed no "
        f"longer trusted; 2 units back to pending to train again: {requeued}"
    )
    units = coord.catalogue.units("tiny")
    assert [(units[u].status, units[u].attempts) for u in (done.unit, running.unit)] == [
        ("pending", 0),
        ("pending", 0),
    ]
    assert not coord.catalogue.get_checkpoint(final.checkpoint.sha256).trusted
    event = coord.catalogue.events(limit=1)[0]
    assert event.kind == "worker_revoked" and "1 resting on checkpoints it signed" in event.message
    assert "revoked" in cli(coord, "workers", "list").stdout
    refused(coord, "workers", "revoke", worker_id, fragment="is already revoked")
    refused(coord, "workers", "show", "nope", fragment="no worker 'nope'")


# --- no coordinator ---


def test_an_unreachable_coordinator_is_one_clear_line(tmp_path: Path) -> None:
    folder = tmp_path / "coord"
    folder.mkdir()
    (folder / "admin.credential").write_text("secret\n")
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    write_endpoint(folder, Endpoint(f"127.0.0.1:{port}"))
    for args in (["jobs", "list"], ["checkpoints", "verify"], ["tokens", "create", "--site", "a"]):
        result = script(*args, "--dir", str(folder))
        assert_one_line_error(result, f"the coordinator at 127.0.0.1:{port} is unreachable")
        assert result.stdout == ""
    (folder / "endpoint.json").unlink()
    assert_one_line_error(
        script("units", "list", "--dir", str(folder)), "no running coordinator found"
    )
