"""Tests for tspace_core.export and tspace_core.pipeline: export, reload, sample like the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from typer.testing import CliRunner

from tspace_core import ensemble
from tspace_core.checkpoint import load_checkpoint, unpack
from tspace_core.cli import app
from tspace_core.ensemble import (
    Chain,
    SampleOptions,
    load_ensemble,
    load_member,
    read_manifest,
    sample_chain,
)
from tspace_core.errors import CheckpointError, TspaceError
from tspace_core.export import ddim_scheduler, export_diffusers, job_from_json
from tspace_core.images import to_uint8
from tspace_core.jobspec import Job, resolve, spec_from_dict
from tspace_core.pipeline import MANIFEST_NAME, TSpacePipeline, read_export_manifest
from tspace_core.runner import train_job
from tspace_core.schedules import ScheduleConfig, alphas_cumprod_of

STATES = (332, 666, 999)
RUNNER = CliRunner()
RAW = {
    "name": "tiny-export",
    "states": {"count": len(STATES)},
    "units": {"partition": "single"},
    "model": {"preset": "tiny", "class_conditional": True},
    "training": {"steps": 2, "batch_size": 8},
    "data": {"source": "digits"},
}


@pytest.fixture(scope="module")
def job() -> Job:
    return resolve(spec_from_dict(RAW))


@pytest.fixture(scope="module")
def run(job: Job, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    train_job(job, out)
    return out


@pytest.fixture(scope="module")
def exported(run: Path) -> Path:
    """The run exported through the CLI, as a user would."""
    out = run.parent / "diffusers"
    result = RUNNER.invoke(app, ["export", str(run), "--format", "diffusers", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def pipe(exported: Path) -> TSpacePipeline:
    loaded = TSpacePipeline.from_pretrained(exported)  # a fresh pipeline, from disk only
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def loaded(run: Path) -> tuple[Any, Chain]:
    """The verified predictor and chain `tspace sample RUN` builds."""
    manifest = read_manifest(run / "ensemble.json")
    chain = Chain(
        manifest.latent_states, manifest.image_shape, manifest.num_classes, manifest.prediction_type
    )
    return load_ensemble(run, manifest), chain


def _tspace_sample(
    loaded: tuple[Any, Chain], opts: SampleOptions, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What `tspace sample` computes: uint8 images, the float x0 they are rounded from, labels."""
    floats: list[torch.Tensor] = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        floats.append(x)
        return to_uint8(x)

    with monkeypatch.context() as m:
        m.setattr(ensemble, "to_uint8", recording)
        images, labels = sample_chain(*loaded, opts)
    return images, floats[0], labels


# ------------------------------------------------------------------------ sampling


@pytest.mark.parametrize(
    ("steps", "eta", "label"), [(None, 0.0, None), (2, 0.0, None), (None, 1.0, None), (2, 0.0, 3)]
)
def test_the_pipeline_samples_exactly_what_tspace_sample_does(
    loaded: tuple[Any, Chain],
    pipe: TSpacePipeline,
    monkeypatch: pytest.MonkeyPatch,
    steps: int | None,
    eta: float,
    label: int | None,
) -> None:
    opts = SampleOptions(n=12, seed=0, eta=eta, steps=steps, label=label)
    expected, x0, labels = _tspace_sample(loaded, opts, monkeypatch)
    args: dict[str, Any] = {"eta": eta, "num_inference_steps": steps, "class_labels": label}
    pil = pipe(batch_size=12, generator=torch.Generator().manual_seed(0), output_type="pil", **args)
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in pil.images]))
    assert pixels.dtype == torch.uint8
    assert int((pixels.int() - expected[:, 0].int()).abs().max()) == 0
    assert labels is not None and torch.equal(pil.class_labels, labels)

    floats = pipe(batch_size=12, generator=0, output_type="np", **args).images
    reference = ((x0.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert floats.shape == (12, 8, 8, 1)
    assert float(np.abs(floats - reference).max()) < 1e-5


def test_the_seed_and_the_labels_change_the_samples(pipe: TSpacePipeline) -> None:
    first = pipe(batch_size=4, generator=0, output_type="pt").images
    assert first.shape == (4, 1, 8, 8) and 0 <= float(first.min()) <= float(first.max()) <= 1
    assert not torch.equal(first, pipe(batch_size=4, generator=1, output_type="pt").images)
    relabelled = pipe(batch_size=4, generator=0, class_labels=[4, 4, 4, 4], output_type="pt")
    assert relabelled.class_labels.tolist() == [4] * 4
    assert not torch.equal(first, relabelled.images)


def test_pipeline_arguments_are_checked(pipe: TSpacePipeline) -> None:
    with pytest.raises(TspaceError, match="output_type"):
        pipe(batch_size=2, generator=0, output_type="latent")
    with pytest.raises(TspaceError, match="class_labels"):
        pipe(batch_size=2, generator=0, class_labels=10)
    with pytest.raises(TspaceError, match="one label per sample"):
        pipe(batch_size=2, generator=0, class_labels=[1, 2, 3])
    with pytest.raises(TspaceError, match="steps"):
        pipe(batch_size=2, generator=0, num_inference_steps=4)


# ------------------------------------------------------------------------ the folder


def test_each_unit_folder_is_the_checkpoints_ema_unet(run: Path, exported: Path) -> None:
    manifest = read_manifest(run / "ensemble.json")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 3, 7, 9])
    for i, member in enumerate(manifest.members):
        unet = UNet2DModel.from_pretrained(exported / f"unit-{i:03d}", use_safetensors=True)
        reference = load_member(run, member)
        tensors = load_checkpoint(run / member.checkpoint).tensors
        ema, raw = unpack(tensors, "ema"), unpack(tensors, "model")
        weights = unet.state_dict()
        assert all(torch.equal(weights[k], ema[k]) for k in ema)
        assert not all(torch.equal(weights[k], raw[k]) for k in raw)  # EMA, not the raw weights
        t = torch.full((4,), member.timesteps[0])
        with torch.no_grad():
            got = unet(x, t, class_labels=labels).sample
            want = reference(x, t, class_labels=labels).sample
        assert torch.equal(got, want)


def test_the_scheduler_has_the_manifests_alpha_bars(run: Path, exported: Path, job: Job) -> None:
    scheduler = DDIMScheduler.from_pretrained(exported, subfolder="scheduler")
    manifest = read_export_manifest(exported / MANIFEST_NAME)
    for unit in manifest.units:
        at_states = [float(scheduler.alphas_cumprod[t]) for t in unit.timesteps]
        assert at_states == list(unit.alphas_cumprod)
    assert manifest.latent_states == read_manifest(run / "ensemble.json").latent_states
    assert scheduler.config.prediction_type == "epsilon"
    scheduler.set_timesteps(len(STATES))  # the job's spacing: DDIM's steps are the states
    assert sorted(scheduler.timesteps.tolist()) == list(STATES)
    assert manifest.schedule == job.spec.schedule
    assert (manifest.job, manifest.job_hash, manifest.num_classes) == ("tiny-export", job.hash, 10)
    assert [u.folder for u in manifest.units] == ["unit-000", "unit-001", "unit-002"]
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "TSpacePipeline" and index["unit-002"][1] == "UNet2DModel"


def test_a_tv_snr_schedule_becomes_trained_betas() -> None:
    schedule = ScheduleConfig(kind="tv_snr", num_train_timesteps=200)
    scheduler = ddim_scheduler(schedule, "v_prediction")
    expected = alphas_cumprod_of(schedule)
    relative = (scheduler.alphas_cumprod.double() - expected).abs() / expected
    assert float(relative.max()) < 1e-5  # float32 cumprod of the recovered betas


def test_the_job_record_must_match_its_hash(run: Path) -> None:
    doc = json.loads((run / "job.json").read_text())
    assert job_from_json(doc, "job.json").hash == doc["job_hash"]
    doc["spec"]["training"]["steps"] = 3
    with pytest.raises(CheckpointError, match="hash"):
        job_from_json(doc, "job.json")


# ------------------------------------------------------------------------ writing safely


def test_a_non_empty_folder_is_refused(loaded: tuple[Any, Chain], job: Job, tmp_path: Path) -> None:
    predictor, chain = loaded
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TspaceError, match="not empty"):
        export_diffusers(predictor, chain, job, out)
    with pytest.raises(TspaceError, match="holds no tspace export"):
        export_diffusers(predictor, chain, job, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_an_earlier_export(
    loaded: tuple[Any, Chain], job: Job, tmp_path: Path
) -> None:
    predictor, chain = loaded
    out = tmp_path / "out"
    export_diffusers(predictor, chain, job, out)
    (out / "stale.txt").write_text("old")
    export_diffusers(predictor, chain, job, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / MANIFEST_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary siblings


def test_a_failure_leaves_no_half_folder(
    loaded: tuple[Any, Chain], job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor, chain = loaded
    save = TSpacePipeline.save_pretrained

    def fail_halfway(self: TSpacePipeline, folder: Path) -> None:
        save(self, folder)
        raise OSError("disk full")

    monkeypatch.setattr(TSpacePipeline, "save_pretrained", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        export_diffusers(predictor, chain, job, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ reading safely


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["units"][0].update(folder="../run"),
        lambda d: d["units"][1].update(timesteps=[332]),
        lambda d: d["units"][0].update(alphas_cumprod=[]),
        lambda d: d.update(prediction_type="sample"),
        lambda d: d.update(format="tspace-diffusers/0"),
        lambda d: d["schedule"].update(kind="cosine"),
    ],
)
def test_a_tampered_manifest_is_refused(exported: Path, tmp_path: Path, change: Any) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    change(data)
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="not a valid tspace ensemble manifest"):
        TSpacePipeline.from_pretrained(copy)


class _Trap:
    """Unpickling this creates `marker`: proof that something unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_pickled_unit_weights_are_never_loaded(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    (copy / "unit-001" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"trap": _Trap(marker)}, copy / "unit-001" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unit-001"):
        TSpacePipeline.from_pretrained(copy)
    assert not marker.exists()


# ------------------------------------------------------------------------ the command


def test_a_format_other_than_diffusers_is_refused(run: Path, tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["export", str(run), "--format", "onnx", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--format" in result.output and "diffusers" in result.output
    assert not (tmp_path / "o").exists()
