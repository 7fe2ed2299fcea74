"""Tests for tspace_core.runner: the single-process job trainer, its outputs and its resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tspace_core.checkpoint import load_checkpoint, read_meta
from tspace_core.ensemble import read_manifest
from tspace_core.errors import SpecError, TspaceError
from tspace_core.jobspec import Job, resolve, spec_from_dict
from tspace_core.runner import UnitProgress, check_out_dir, train_job

STEPS = 4


def _job(partition: str = "single", **training: Any) -> Job:
    raw = {
        "name": "tiny-digits",
        "states": {"count": 3},
        "units": {"partition": partition},
        "model": {"preset": "tiny", "class_conditional": True},
        "training": {"steps": STEPS, "batch_size": 8, "checkpoint_every": 2, **training},
        "data": {"source": "digits"},
    }
    return resolve(spec_from_dict(raw))


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under root: (size, mtime_ns, sha256)."""
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _final_tensors(root: Path, unit: int) -> dict[str, torch.Tensor]:
    path = root / "units" / f"unit-{unit:03d}" / f"step-{STEPS:07d}.safetensors"
    return load_checkpoint(path).tensors


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished, uninterrupted run of the tiny job; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_job(_job(), out)
    return out


def test_train_job_writes_job_checkpoints_and_manifest(tmp_path: Path) -> None:
    job = _job()
    progress: list[UnitProgress] = []
    done: list[int] = []
    out = tmp_path / "run"
    manifest = train_job(
        job, out, report=progress.append, on_unit_done=lambda m: done.append(m.unit)
    )

    recorded = json.loads((out / "job.json").read_text())
    assert recorded["job_hash"] == job.hash and recorded["name"] == "tiny-digits"
    assert recorded["units"] == [[332], [666], [999]]
    assert done == [0, 1, 2]
    assert [(p.unit, p.step) for p in progress] == [(u, s) for u in range(3) for s in (1, 2, 3, 4)]
    assert all(p.total == STEPS and p.loss > 0 for p in progress)

    for unit in range(3):
        names = sorted(p.name for p in (out / "units" / f"unit-{unit:03d}").iterdir())
        assert names == ["step-0000002.safetensors", "step-0000004.safetensors"]

    assert read_manifest(out / "ensemble.json") == manifest
    assert manifest.job_hash == job.hash and manifest.name == "tiny-digits:final"
    assert manifest.timesteps == (332, 666, 999)
    assert manifest.alphas_cumprod == job.latent_states.alphas_cumprod
    assert manifest.image_shape == (1, 8, 8) and manifest.num_classes == 10
    assert [m.unit for m in manifest.members] == [0, 1, 2]
    for member in manifest.members:
        path = out / member.checkpoint
        assert member.checkpoint == f"units/unit-{member.unit:03d}/step-0000004.safetensors"
        assert member.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert member.step == STEPS and member.timesteps == job.units[member.unit]
        meta = read_meta(path)
        assert meta["job"] == "tiny-digits" and meta["job_hash"] == job.hash
        assert meta["unit"] == member.unit and meta["states"] == list(member.timesteps)
        assert meta["step"] == STEPS and meta["total_steps"] == STEPS
        assert meta["shards_seen"] == []
        assert set(meta["metrics"]) == {"loss"} and meta["metrics"]["loss"] > 0
        assert meta["unet_config"]["num_class_embeds"] == 10
        assert meta["unet_config"]["sample_size"] == 8
        assert meta["alphas_cumprod"] == list(job.unit_alphas_cumprod(member.unit))
    periodic = read_meta(out / "units" / "unit-001" / "step-0000002.safetensors")
    assert periodic["step"] == 2


def test_units_are_trained_independently(reference: Path) -> None:
    a, b = _final_tensors(reference, 0), _final_tensors(reference, 1)
    assert not torch.equal(a["model.conv_in.weight"], b["model.conv_in.weight"])


def test_rerun_on_a_finished_folder_retrains_nothing(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = _snapshot(out)
    progress: list[UnitProgress] = []
    manifest = train_job(_job(), out, report=progress.append)
    assert progress == []
    after = _snapshot(out)
    checkpoints = [k for k in before if k.endswith(".safetensors")]
    assert len(checkpoints) == 6
    assert all(after[k] == before[k] for k in checkpoints)
    assert manifest == read_manifest(reference / "ensemble.json")
    assert after["ensemble.json"][2] == before["ensemble.json"][2]


def test_interrupted_run_resumes_to_the_uninterrupted_weights(
    reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    # Unit 1 stopped after its periodic checkpoint; unit 2 never started; no manifest yet.
    (out / "units" / "unit-001" / f"step-{STEPS:07d}.safetensors").unlink()
    shutil.rmtree(out / "units" / "unit-002")
    (out / "ensemble.json").unlink()
    unit0 = _snapshot(out / "units" / "unit-000")
    progress: list[UnitProgress] = []
    manifest = train_job(_job(), out, report=progress.append)

    assert [(p.unit, p.step) for p in progress] == [(1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]
    assert _snapshot(out / "units" / "unit-000") == unit0
    for unit in range(3):
        want, got = _final_tensors(reference, unit), _final_tensors(out, unit)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), f"unit {unit} differs"
    for member in manifest.members:
        assert member.sha256 == hashlib.sha256((out / member.checkpoint).read_bytes()).hexdigest()


def test_a_folder_of_another_job_is_refused_untouched(tmp_path: Path) -> None:
    out = tmp_path / "run"
    check_out_dir(_job(seed=1), out)
    before = _snapshot(out)
    with pytest.raises(TspaceError, match="another job"):
        train_job(_job(), out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["job.json"]


def test_a_foreign_folder_is_refused_untouched(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(TspaceError, match="not empty"):
        train_job(_job(), out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_an_unreadable_job_file_is_refused_untouched(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "job.json").write_text("{not json")
    before = _snapshot(out)
    with pytest.raises(TspaceError, match="unreadable"):
        train_job(_job(), out)
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    ("partition", "units"),
    [("joint", [(332, 666, 999)]), ("stages:2", [(332, 666), (999,)])],
)
def test_grouped_partitions_train_one_member_per_unit(
    tmp_path: Path, partition: str, units: list[tuple[int, ...]]
) -> None:
    out = tmp_path / "run"
    manifest = train_job(_job(partition, steps=2, checkpoint_every=0), out)
    assert [m.timesteps for m in manifest.members] == units
    assert manifest.timesteps == (332, 666, 999)
    for member in manifest.members:
        meta = read_meta(out / member.checkpoint)
        assert meta["states"] == list(member.timesteps) and meta["step"] == 2
    folders = sorted(p.name for p in (out / "units").iterdir())
    assert folders == [f"unit-{i:03d}" for i in range(len(units))]


def test_held_out_images_give_every_checkpoint_a_validation_loss(tmp_path: Path) -> None:
    job = _job(validation_images=50)
    train_job(job, tmp_path / "run")
    for unit in range(3):
        folder = tmp_path / "run" / "units" / f"unit-{unit:03d}"
        metrics = [read_meta(folder / name)["metrics"] for name in sorted(os.listdir(folder))]
        assert [set(m) for m in metrics] == [{"loss", "val_loss"}] * 2
        assert all(0 < m["val_loss"] < 10 for m in metrics)


def test_a_held_out_set_as_large_as_the_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="hold out fewer"):
        train_job(_job(validation_images=5000), tmp_path / "run")
