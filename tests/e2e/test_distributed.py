"""End to end with real processes: the quickstart, and agreement between the distributed system
and `tspace train` on the same job and seed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tspace_core.checkpoint import load_checkpoint, unpack
from tspace_core.ensemble import read_manifest

JOB = """
name = "agree"
[states]
count = 3
[units]
partition = "single"
[model]
preset = "tiny"
class_conditional = true
[training]
steps = 6
batch_size = 8
checkpoint_every = 3
seed = 7
[data]
source = "digits"
shards = 2
"""


def run(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def tspace(*args: str) -> list[str]:
    return ["-c", "from tspace_core.cli import main; main()", *args]


def test_quickstart_trains_registers_and_samples(tmp_path: Path) -> None:
    folder = tmp_path / "qs"
    result = run(*tspace("quickstart", "--dir", str(folder), "--steps", "4", "--workers", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "digits:final" in result.stdout
    with Image.open(folder / "grid.png") as grid:
        assert grid.size[0] > 100 and grid.size[1] > 100
    logs = {p.name for p in (folder / "logs").iterdir()}
    assert {"coordinator.log", "worker-0.log", "worker-1.log"} <= logs
    # Both workers joined; units are independent, so any split of the ten units is fine.
    worker_logs = [(folder / "logs" / f"worker-{i}.log").read_text() for i in (0, 1)]
    assert all("joined" in log for log in worker_logs)
    assert sum(log.count("completed") for log in worker_logs) == 10


def _start_coordinator(folder: Path) -> subprocess.Popen[str]:
    assert run("-m", "coordinator", "init", str(folder)).returncode == 0
    return subprocess.Popen(
        [sys.executable, "-m", "coordinator", "serve", str(folder), "--listen", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def fingerprint(ca_file: Path) -> str:
    """The CA's fingerprint as OpenSSL prints it ("sha256 Fingerprint=AB:CD:...")."""
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(ca_file)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().split("=", 1)[1]


def _wait_address(folder: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (folder / "address").exists() and (folder / "address").read_text().strip():
            return (folder / "address").read_text().strip()
        time.sleep(0.1)
    raise AssertionError("the coordinator did not start")


def test_distributed_training_equals_tspace_train(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    local = run(*tspace("train", str(job), "--out", str(tmp_path / "local"), "--threads", "1"))
    assert local.returncode == 0, local.stderr

    # Site 0 holds the data already, packed the same way: it trains from its own copy.
    site_data = tmp_path / "site-data"
    packed = run(*tspace("data", "pack", "digits", str(site_data), "--shards", "2"))
    assert packed.returncode == 0, packed.stderr
    coord = tmp_path / "coord"
    server = _start_coordinator(coord)
    workers = []
    try:
        address = _wait_address(coord)
        admin = ["-m", "coordinator"]
        created = run(*admin, "jobs", "create", str(job), "--dir", str(coord))
        assert created.returncode == 0, created.stderr
        for i in range(2):
            token = run(
                *admin, "tokens", "create", "--site", f"s{i}", "--dir", str(coord)
            ).stdout.strip()
            local = ["--data", str(site_data)] if i == 0 else []
            # One site is handed the CA file, the other only its fingerprint.
            ca_file = coord / "tls" / "ca.crt"
            pin = ["--ca", str(ca_file)] if i == 0 else ["--ca-fingerprint", fingerprint(ca_file)]
            args = ["join", "--coordinator", address, "--token", token, "--threads", "1", *pin]
            log = (tmp_path / f"worker-{i}.log").open("w")
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "worker",
                        *args,
                        "--state-dir",
                        str(tmp_path / f"w{i}"),
                        *local,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        for i, w in enumerate(workers):
            assert w.wait(timeout=300) == 0, (tmp_path / f"worker-{i}.log").read_text()
        grid = tmp_path / "remote.npz"
        sampled = run(
            *tspace(
                "sample",
                "--ensemble",
                "agree:final",
                "--coordinator",
                address,
                "--credential",
                str(coord / "admin.credential"),
                "--ca",
                str(coord / "tls" / "ca.crt"),
                "--n",
                "4",
                "--out",
                str(grid),
            ),
            env=None,
        )
        assert sampled.returncode == 0, sampled.stderr
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        server.terminate()
        server.wait(timeout=30)

    manifest = read_manifest(tmp_path / "local" / "ensemble.json")
    from tspace_core.blobs import BlobStore
    from tspace_core.catalogue import Catalogue

    catalogue = Catalogue(f"sqlite:///{coord / 'catalogue.db'}")
    try:
        remote = {m.unit: m.checkpoint for m in catalogue.get_ensemble("agree:final").members}
    finally:
        catalogue.close()
    blobs = BlobStore(coord / "blobs")
    assert sorted(remote) == [m.unit for m in manifest.members]
    for member in manifest.members:
        mine = load_checkpoint(tmp_path / "local" / member.checkpoint)
        theirs = load_checkpoint(blobs.path(remote[member.unit].sha256))
        assert theirs.meta["step"] == mine.meta["step"] == 6
        assert theirs.meta["shards_seen"] == ["shard-00000.safetensors", "shard-00001.safetensors"]
        for prefix in ("model", "ema"):
            a, b = unpack(mine.tensors, prefix), unpack(theirs.tensors, prefix)
            assert a.keys() == b.keys()
            worst = max(float((a[k] - b[k]).abs().max()) for k in a)
            assert worst < 1e-5, (member.unit, prefix, worst)
    site0 = (tmp_path / "worker-0.log").read_text()
    if "leased unit" in site0:  # site 0 took part: its data came from its own disk
        assert "using local shard" in site0
        fetched = tmp_path / "w0" / "blobs"
        assert not fetched.exists() or not any(fetched.iterdir())
    assert not torch.equal(
        unpack(
            load_checkpoint(tmp_path / "local" / manifest.members[0].checkpoint).tensors, "model"
        )["conv_in.weight"],
        unpack(
            load_checkpoint(tmp_path / "local" / manifest.members[1].checkpoint).tensors, "model"
        )["conv_in.weight"],
    ), "units must be trained independently, not share weights"

    # The same ensemble straight from the catalogue and blob store; then every member must
    # verify: a corrupted blob and a revoked signer are refused, naming the unit.
    url = f"sqlite:///{coord / 'catalogue.db'}"
    sample = (
        "sample",
        "--ensemble",
        "agree:final",
        "--catalogue",
        url,
        "--store",
        str(coord / "blobs"),
        "--n",
        "4",
        "--out",
        str(tmp_path / "cat.png"),
    )
    assert run(*tspace(*sample)).returncode == 0
    victim = blobs.path(remote[1].sha256)
    original = victim.read_bytes()
    victim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    corrupt = run(*tspace(*sample))
    assert corrupt.returncode == 2 and "unit 1" in corrupt.stderr and "corrupt" in corrupt.stderr
    victim.write_bytes(original)
    catalogue = Catalogue(url)
    try:
        catalogue.revoke_worker(remote[2].worker_id, time.time())
    finally:
        catalogue.close()
    revoked = run(*tspace(*sample))
    signed = sorted(u for u, ckpt in remote.items() if ckpt.worker_id == remote[2].worker_id)
    named = f"unit{'s' if len(signed) > 1 else ''} {', '.join(map(str, signed))}:"
    assert revoked.returncode == 2 and named in revoked.stderr and "revoked" in revoked.stderr
    assert "Traceback" not in corrupt.stderr + revoked.stderr


@pytest.mark.parametrize(
    "args", [["sample", "--ensemble", "x:final"], ["quickstart", "--workers", "0"]]
)
def test_bad_sampling_and_quickstart_arguments_are_clear(args: list[str], tmp_path: Path) -> None:
    result = run(*tspace(*args), cwd=tmp_path)
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr


def test_worker_waits_for_an_unreachable_coordinator(tmp_path: Path) -> None:
    """A worker started before its coordinator keeps retrying, then joins and trains."""
    import socket

    coord = tmp_path / "coord"
    assert run("-m", "coordinator", "init", str(coord)).returncode == 0
    server = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "serve", str(coord), "--listen", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    job = tmp_path / "job.toml"
    job.write_text(JOB.replace("steps = 6", "steps = 2").replace("count = 3", "count = 2"))
    try:
        address = _wait_address(coord)
        assert (
            run("-m", "coordinator", "jobs", "create", str(job), "--dir", str(coord)).returncode
            == 0
        )
        token = run(
            "-m", "coordinator", "tokens", "create", "--site", "late", "--dir", str(coord)
        ).stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
    port = int(address.rsplit(":", 1)[1])
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "join",
            "--coordinator",
            address,
            "--token",
            token.strip(),
            "--ca",
            str(coord / "tls" / "ca.crt"),
            "--threads",
            "1",
            "--state-dir",
            str(tmp_path / "w"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while "unreachable" not in (tmp_path / "worker.log").read_text():
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.2)
        with socket.socket() as probe:  # the port is still free: nobody else took it meanwhile
            probe.bind(("127.0.0.1", port))
        server = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "serve", str(coord), "--listen", address],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert worker.wait(timeout=180) == 0, (tmp_path / "worker.log").read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
        server.terminate()
        server.wait(timeout=30)
    assert (tmp_path / "worker.log").read_text().count("completed") == 2
