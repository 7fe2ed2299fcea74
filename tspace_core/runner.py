"""`tspace train`: every unit of a job in one process, one after another, resumable."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tspace_core.checkpoint import load_checkpoint, save_checkpoint
from tspace_core.data import ImageDataset, load_dataset
from tspace_core.ensemble import EnsembleManifest, Member, write_manifest
from tspace_core.errors import SpecError, TspaceError
from tspace_core.fsio import atomic_write
from tspace_core.jobspec import Job
from tspace_core.models import build_unet, check_forward, unet_config
from tspace_core.training import UnitTrainer, unit_seed


@dataclass(frozen=True)
class UnitProgress:
    """What a progress display needs after each step of a unit."""

    unit: int
    step: int
    total: int
    loss: float
    images_per_s: float


Reporter = Callable[[UnitProgress], None]


def unit_dir(out_dir: Path, unit: int) -> Path:
    return out_dir / "units" / f"unit-{unit:03d}"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}.safetensors"


def _newest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step-*.safetensors"))
    return found[-1] if found else None


def model_config_for(job: Job, data: ImageDataset) -> dict[str, Any]:
    channels, height, width = data.shape
    if height != width:
        raise SpecError(f"data: images are {height}x{width}; use square images or data.resize")
    return unet_config(job.spec.model, height, channels, data.num_classes)


def make_trainer(
    job: Job, unit: int, data: ImageDataset, config: dict[str, Any], device: str
) -> UnitTrainer:
    """The trainer of `unit`, freshly initialised from the job's seed."""
    seed = unit_seed(job.spec.training.seed, unit)
    conditional = job.spec.model.class_conditional
    train, held_out = split_validation(
        data, job.spec.training.validation_images, job.spec.training.seed
    )
    return UnitTrainer(
        build_unet(config, seed=seed),
        job.units[unit],
        job.unit_alphas_cumprod(unit),
        data.images[train],
        job.spec.training,
        labels=data.labels[train] if conditional and data.labels is not None else None,
        prediction_type=job.spec.model.prediction_type,
        seed=seed,
        device=device,
        validation=(
            None
            if held_out is None
            else (
                data.images[held_out],
                data.labels[held_out] if conditional and data.labels is not None else None,
            )
        ),
    )


def split_validation(
    data: ImageDataset, count: int, seed: int
) -> tuple[torch.Tensor | slice, torch.Tensor | None]:
    """(training index, held-out index or None): `count` images chosen by `seed`, the same for
    every unit of a job; with count 0 every image trains."""
    if count == 0:
        return slice(None), None
    if count >= len(data):
        raise SpecError(
            f"training.validation_images is {count}, but the data has {len(data)} images; "
            "hold out fewer so some are left to train on"
        )
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return order[count:].sort().values, order[:count].sort().values


def save_unit_checkpoint(
    trainer: UnitTrainer,
    job: Job,
    unit: int,
    data: ImageDataset,
    config: dict[str, Any],
    path: Path,
) -> str:
    tensors, state = trainer.checkpoint_state()
    meta = {
        "job": job.spec.name,
        "job_hash": job.hash,
        "unit": unit,
        "states": list(job.units[unit]),
        "alphas_cumprod": list(job.unit_alphas_cumprod(unit)),
        "prediction_type": job.spec.model.prediction_type,
        "unet_config": config,
        "shards_seen": list(data.shards),
        "metrics": trainer.metrics(),
        "total_steps": job.spec.training.steps,
        **state,
    }
    return save_checkpoint(path, tensors, meta)


def train_unit(
    job: Job,
    unit: int,
    data: ImageDataset,
    out_dir: Path,
    *,
    device: str = "cpu",
    report: Reporter | None = None,
) -> Member:
    """Train one unit to the job's step count, resuming from its newest checkpoint."""
    config = model_config_for(job, data)
    trainer = make_trainer(job, unit, data, config, device)
    folder = unit_dir(out_dir, unit)
    folder.mkdir(parents=True, exist_ok=True)
    newest = _newest_checkpoint(folder)
    if newest is not None:
        ckpt = load_checkpoint(newest)
        trainer.load_checkpoint_state(ckpt.tensors, ckpt.meta)
    cfg = job.spec.training
    digest, path = None, newest
    while trainer.step < cfg.steps:
        started = time.perf_counter()
        loss = trainer.train_step()
        rate = cfg.batch_size / max(time.perf_counter() - started, 1e-9)
        if report is not None:
            report(UnitProgress(unit, trainer.step, cfg.steps, loss, rate))
        every = cfg.checkpoint_every
        if trainer.step == cfg.steps or (every and trainer.step % every == 0):
            path = folder / checkpoint_name(trainer.step)
            digest = save_unit_checkpoint(trainer, job, unit, data, config, path)
    assert path is not None
    if digest is None:  # already finished before this run: take the digest from the file
        digest = load_checkpoint(path).sha256
    return Member(unit, job.units[unit], str(path.relative_to(out_dir)), digest, trainer.step)


def check_out_dir(job: Job, out_dir: Path) -> None:
    """Refuse to mix two jobs in one folder; record the resolved job in a new one."""
    job_file = out_dir / "job.json"
    if job_file.exists():
        try:
            recorded = json.loads(job_file.read_text())["job_hash"]
        except (OSError, ValueError, KeyError):
            raise TspaceError(f"{job_file} is unreadable; choose an empty --out folder") from None
        if recorded != job.hash:
            raise TspaceError(
                f"{out_dir} holds another job (hash {recorded[:12]}, this one {job.hash[:12]}); "
                "choose another --out folder, or delete it to start over"
            )
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TspaceError(f"{out_dir} is not empty and holds no tspace job; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(job.to_json(), indent=2).encode()
    atomic_write(job_file, lambda f: f.write(text))


def train_job(
    job: Job,
    out_dir: Path,
    *,
    device: str = "cpu",
    report: Reporter | None = None,
    on_unit_done: Callable[[Member], None] | None = None,
) -> EnsembleManifest:
    """Train every unit in order and register the ensemble `<job>:final` in `out_dir`."""
    data = load_dataset(job.spec.data, job.base_dir)
    check_forward(model_config_for(job, data))  # fail before any work on a bad model
    check_out_dir(job, out_dir)
    members = []
    for unit in range(len(job.units)):
        member = train_unit(job, unit, data, out_dir, device=device, report=report)
        members.append(member)
        if on_unit_done is not None:
            on_unit_done(member)
    manifest = EnsembleManifest(
        name=f"{job.spec.name}:final",
        job=job.spec.name,
        job_hash=job.hash,
        prediction_type=job.spec.model.prediction_type,
        timesteps=job.latent_states.timesteps,
        alphas_cumprod=job.latent_states.alphas_cumprod,
        image_shape=data.shape,
        num_classes=data.num_classes if job.spec.model.class_conditional else 0,
        members=tuple(members),
    )
    write_manifest(out_dir / "ensemble.json", manifest)
    return manifest


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
