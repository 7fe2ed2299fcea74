"""Export a verified ensemble as a diffusers folder that `TSpacePipeline.from_pretrained` loads."""

from __future__ import annotations

import math
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler

from tspace_core.ensemble import Chain
from tspace_core.errors import CheckpointError, SpecError, TspaceError
from tspace_core.fsio import fsync_dir
from tspace_core.jobspec import Job, resolve, spec_from_dict
from tspace_core.pipeline import MANIFEST_NAME, ExportedUnit, ExportManifest, TSpacePipeline
from tspace_core.sampling import EnsemblePredictor
from tspace_core.schedules import BASE_SCHEDULES, ScheduleConfig, alphas_cumprod_of

# The chain's alpha-bars were recorded by the trainer; the job, resolved here, must agree.
ALPHA_RTOL = 1e-6


def export_diffusers(
    predictor: EnsemblePredictor,
    chain: Chain,
    job: Job,
    out_dir: Path,
    *,
    overwrite: bool = False,
) -> ExportManifest:
    """Write the ensemble to `out_dir`: unit-NNN/ (UNet2DModel), scheduler/ (DDIMScheduler),
    tspace_ensemble.json and model_index.json.

    `predictor` and `chain` come from verified members (`tspace sample`'s loaders); `job` is
    the resolved job they were trained for. The folder appears whole or not at all: it is
    written as a hidden sibling and renamed. A non-empty `out_dir` is refused unless
    `overwrite`, and even then only when it holds an earlier export.
    """
    check_export_target(out_dir, overwrite)
    manifest = export_manifest(chain, job)
    units = unit_models(predictor, job)
    scheduler = ddim_scheduler(job.spec.schedule, chain.prediction_type, job.spec.states.spacing)
    pipeline = TSpacePipeline(units, scheduler, manifest)
    _write_folder(out_dir, pipeline.save_pretrained, overwrite)
    return manifest


def export_manifest(chain: Chain, job: Job) -> ExportManifest:
    """The manifest of `chain`, after checking that it is the ensemble of `job`."""
    states = chain.states
    recorded = job.latent_states
    same = states.timesteps == recorded.timesteps and all(
        math.isclose(a, b, rel_tol=ALPHA_RTOL)
        for a, b in zip(states.alphas_cumprod, recorded.alphas_cumprod, strict=True)
    )
    if not same:
        raise CheckpointError(
            f"the ensemble's states {states.timesteps} or their alpha-bars differ from those of "
            f"job {job.spec.name!r} ({recorded.timesteps}); the ensemble and its job disagree"
        )
    if chain.prediction_type != job.spec.model.prediction_type:
        raise CheckpointError(
            f"the ensemble predicts {chain.prediction_type!r}, its job "
            f"{job.spec.model.prediction_type!r}; the ensemble and its job disagree"
        )
    units = tuple(
        ExportedUnit(
            folder=f"unit-{i:03d}",
            timesteps=tuple(unit),
            alphas_cumprod=tuple(states.alpha_bar(t) for t in unit),
        )
        for i, unit in enumerate(job.units)
    )
    return ExportManifest(
        job=job.spec.name,
        job_hash=job.hash,
        prediction_type=chain.prediction_type,
        image_shape=chain.image_shape,
        num_classes=chain.num_classes,
        mapping=job.spec.states.mapping,
        schedule=job.spec.schedule,
        units=units,
    )


def unit_models(predictor: EnsemblePredictor, job: Job) -> list[UNet2DModel]:
    """The UNet of each of the job's units, which must own exactly that unit's states."""
    if set(predictor.owners) != set(job.latent_states.timesteps):
        raise CheckpointError(
            f"the ensemble owns states {sorted(predictor.owners)}, its job has "
            f"{job.latent_states.timesteps}; the ensemble and its job disagree"
        )
    models = []
    for i, unit in enumerate(job.units):
        model = predictor.owners[unit[0]]
        if any(predictor.owners[t] is not model for t in unit):
            raise CheckpointError(f"unit {i}: its states {unit} are not owned by one model")
        if not isinstance(model, UNet2DModel):
            raise TypeError(f"unit {i}: a {type(model).__name__}, not a UNet2DModel")
        models.append(model)
    return models


def ddim_scheduler(
    schedule: ScheduleConfig, prediction_type: str, spacing: str = "trailing"
) -> DDIMScheduler:
    """A DDIMScheduler with the base schedule's alphas_cumprod, ending at alpha-bar 1.

    Named schedules are diffusers' own; a TV/SNR schedule is given as `trained_betas`.
    With the states' spacing, `set_timesteps(S)` yields the S states of the job.
    """
    common: dict[str, Any] = {
        "num_train_timesteps": schedule.num_train_timesteps,
        "prediction_type": prediction_type,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": spacing
        if spacing in ("leading", "trailing", "linspace")
        else "trailing",
    }
    if schedule.kind in BASE_SCHEDULES:
        return DDIMScheduler(
            beta_schedule=schedule.kind,
            beta_start=schedule.beta_start,
            beta_end=schedule.beta_end,
            **common,
        )
    abar = alphas_cumprod_of(schedule)
    # beta_t = 1 - abar_t / abar_{t-1}, inverting abar_t = prod_{s<=t} (1 - beta_s) (DDPM eq. 4).
    previous = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    betas = (1.0 - abar / previous).tolist()
    return DDIMScheduler(trained_betas=betas, **common)


def job_from_json(doc: Any, where: str) -> Job:
    """The Job of a resolved-job document (`job.json`, a catalogue's spec_json), hash checked."""
    try:
        job = resolve(spec_from_dict(doc["spec"]))
        recorded = doc["job_hash"]
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where} is not a resolved tspace job (missing {exc})") from None
    except SpecError as exc:
        raise CheckpointError(f"{where}: the recorded job does not validate: {exc}") from None
    if job.hash != recorded:
        raise CheckpointError(
            f"{where}: the recorded job hash {str(recorded)[:12]} is not that of its spec "
            f"({job.hash[:12]}); the record was altered"
        )
    return job


def check_export_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless `overwrite` and it holds an earlier export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TspaceError(f"{out_dir} is a file; choose a folder for the export")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise TspaceError(
            f"{out_dir} is not empty; choose a new folder, or pass --overwrite to replace an "
            "earlier export"
        )
    if not (out_dir / MANIFEST_NAME).is_file():
        raise TspaceError(
            f"{out_dir} is not empty and holds no tspace export; --overwrite only replaces an "
            "earlier export, so choose another folder"
        )


def _write_folder(out_dir: Path, write: Callable[[Path], object], overwrite: bool) -> None:
    """Run `write(folder)` on a hidden sibling, then rename it to `out_dir`."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(8)}.tmp")
    try:
        write(tmp)
        _fsync_tree(tmp)
        check_export_target(out_dir, overwrite)  # again: the folder may have changed meanwhile
        _replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)


def _replace_folder(new: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(new, out_dir)
        return
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        os.rename(new, out_dir)
        return
    # Two renames: out_dir briefly does not exist, but is never a mix of old and new files.
    old = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(8)}.old")
    os.rename(out_dir, old)
    try:
        os.rename(new, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root`, so the rename publishes durable contents."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))
