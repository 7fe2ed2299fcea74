"""Tests of the `tspace` command, in-process (typer's CliRunner) and as the installed script."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tspace_core.cli import app
from tspace_core.errors import TspaceError
from tspace_core.jobspec import load_job

ROOT = Path(__file__).resolve().parents[3]
DIGITS = ROOT / "examples" / "digits.toml"
RUNNER = CliRunner()

TINY_JOB = """name = "cli-e2e"
[states]
count = 3
[units]
partition = "single"
[model]
preset = "tiny"
class_conditional = true
[training]
steps = 4
batch_size = 8
checkpoint_every = 2
[data]
source = "digits"
"""


def tspace_script() -> str:
    script = Path(sys.executable).parent / "tspace"
    found = str(script) if script.exists() else shutil.which("tspace")
    assert found, "the tspace console script is not installed next to this Python"
    return found


def script_env() -> dict[str, str]:
    # Wide lines so rich never wraps a message; one thread per process on small CI machines.
    return {**os.environ, "COLUMNS": "400", "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}


def start(*args: str | Path, cwd: Path = ROOT) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [tspace_script(), *map(str, args)],
        cwd=cwd,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def tspace(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return finish(start(*args, cwd=cwd))


def assert_clean_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, exactly one "error:" line on stderr naming the problem, and no traceback."""
    context = f"stdout={result.stdout!r} stderr={result.stderr!r}"
    assert result.returncode == 2, context
    assert "Traceback" not in result.stdout + result.stderr, context
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), context
    for needle in needles:
        assert needle in errors[0], context


# ---------------------------------------------------------------------------- job check


def test_job_check_table_in_process() -> None:
    result = RUNNER.invoke(app, ["job", "check", str(DIGITS)])
    assert result.exit_code == 0, result.output
    job = load_job(DIGITS)
    assert job.hash[:16] in result.output
    assert "10 states" in result.output and "10 units" in result.output
    for t in job.latent_states.timesteps:
        assert f" {t} " in result.output
    assert f"{job.latent_states.alpha_bar(999):.4g}" in result.output


def test_job_check_json_in_process() -> None:
    result = RUNNER.invoke(app, ["job", "check", str(DIGITS), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    job = load_job(DIGITS)
    assert {"latent_states", "alphas_cumprod", "units", "job_hash"} <= set(doc)
    assert doc["latent_states"] == list(range(99, 1000, 100))
    assert doc["alphas_cumprod"] == list(job.latent_states.alphas_cumprod)
    assert doc["units"] == [[t] for t in range(99, 1000, 100)]
    assert doc["job_hash"] == job.hash


def test_job_check_through_the_console_script() -> None:
    table, as_json = start("job", "check", DIGITS), start("job", "check", DIGITS, "--json")
    table_result, json_result = finish(table), finish(as_json)
    assert table_result.returncode == 0, table_result.stderr
    assert load_job(DIGITS).hash[:16] in table_result.stdout and "999" in table_result.stdout
    assert json_result.returncode == 0, json_result.stderr
    doc = json.loads(json_result.stdout)
    assert doc["job_hash"] == load_job(DIGITS).hash
    assert doc["latent_states"] == list(range(99, 1000, 100))
    assert len(doc["alphas_cumprod"]) == len(doc["units"]) == 10


# ---------------------------------------------------------------------------- bad input


def test_user_errors_through_the_console_script(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('name = "x"\n[training]\nbatchsize = 8\n')
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\n[training\nsteps = 3\n')
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    cases = {
        "missing job": (("job", "check", tmp_path / "nope.toml"), ("nope.toml", "does not exist")),
        "unknown key": (("job", "check", unknown), ("training.batchsize", "batch_size")),
        "bad toml": (("job", "check", broken), ("broken.toml", "TOML")),
        "no ensemble": (("sample", empty_run, "--out", tmp_path / "g.png"), ("ensemble.json",)),
        "bad suffix": (("sample", empty_run, "--out", "x.jpg"), ("--out", "x.jpg")),
        "eval, no ensemble": (("eval", empty_run), ("ensemble.json",)),
    }
    # Each run pays for importing torch; run them side by side.
    procs = {name: start(*args) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        result = finish(proc)
        assert_clean_user_error(result, *cases[name][1])
    assert not (tmp_path / "g.png").exists()


def test_typer_usage_errors_exit_2_without_traceback() -> None:
    result = tspace("sample")  # missing argument: typer's own usage error
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr


# ---------------------------------------------------------------------------- data pack


def test_data_pack_writes_shards_and_refuses_a_full_folder(tmp_path: Path) -> None:
    out = tmp_path / "packed"
    result = RUNNER.invoke(app, ["data", "pack", "digits", str(out), "--shards", "3"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3
    assert sum(s["count"] for s in manifest["shards"]) == manifest["count"] == 1797
    for shard in manifest["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    again = tspace("data", "pack", "digits", out, "--shards", "3")
    assert_clean_user_error(again, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing was touched

    forced = RUNNER.invoke(
        app, ["data", "pack", "digits", str(out), "--shards", "2", "--overwrite"]
    )
    assert forced.exit_code == 0, forced.output
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 2


# ---------------------------------------------------------------------------- end to end


def test_train_then_sample_end_to_end(tmp_path: Path) -> None:
    job_file = tmp_path / "job.toml"
    job_file.write_text(TINY_JOB)
    run = tmp_path / "run"
    trained = tspace("train", job_file, "--out", run, "--threads", "1", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    assert "Traceback" not in trained.stdout + trained.stderr

    ensemble = json.loads((run / "ensemble.json").read_text())
    job = load_job(job_file)
    assert ensemble["job_hash"] == job.hash
    assert [m["timesteps"] for m in ensemble["members"]] == [list(u) for u in job.units]
    for unit in range(3):
        checkpoints = sorted(p.name for p in (run / "units" / f"unit-{unit:03d}").iterdir())
        assert checkpoints == ["step-0000002.safetensors", "step-0000004.safetensors"]

    png = tspace(
        "sample", run, "--n", "6", "--threads", "1", "--device", "cpu", "--out", run / "grid.png"
    )
    assert png.returncode == 0, png.stderr
    assert "Traceback" not in png.stdout + png.stderr
    # The npz in-process (torch is already imported here); same command, same seed.
    npz = RUNNER.invoke(
        app, ["sample", str(run), "--n", "6", "--device", "cpu", "--out", str(run / "s.npz")]
    )
    assert npz.exit_code == 0, npz.output

    with Image.open(run / "grid.png") as img:
        assert img.format == "PNG"
        img.load()
        assert min(img.size) >= 32  # tiles are scaled up to at least 32 px
    with np.load(run / "s.npz", allow_pickle=False) as samples:
        images, labels = samples["images"], samples["labels"]
    assert images.dtype == np.uint8 and images.shape == (6, 1, 8, 8)
    assert labels.dtype == np.int64 and labels.shape == (6,)
    assert labels.min() >= 0 and labels.max() <= 9

    # The same run measured: figures printed and written as JSON.
    quality = RUNNER.invoke(
        app, ["eval", str(run), "--n", "16", "--device", "cpu", "--json", str(run / "q.json")]
    )
    assert quality.exit_code == 0, quality.output
    assert "Fréchet distance" in quality.output and "precision" in quality.output
    figures = json.loads((run / "q.json").read_text())
    assert figures["n"] == 16 and sum(figures["class_histogram"]) == 16
    assert figures["fd"] > 0 and 0 <= figures["precision"] <= 1 and 0 <= figures["recall"] <= 1
    assert figures["classifier_accuracy"] > 0.95
    for bad, message in ((["--n", "2"], "--n must be >= 4"), (["--json", "q.txt"], "end in .json")):
        # In process the error surfaces as TspaceError; the console script prints it (see the
        # user-error tests above).
        refused = RUNNER.invoke(app, ["eval", str(run), "--device", "cpu", *bad])
        assert isinstance(refused.exception, TspaceError) and message in str(refused.exception)


@pytest.mark.parametrize("args", [["--help"], ["job", "--help"], ["data", "pack", "--help"]])
def test_help_in_process(args: list[str]) -> None:
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0
    assert "Usage" in result.output
