"""TSpacePipeline: a diffusers pipeline sampling an exported ensemble, one UNet2DModel per unit."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, cast

import diffusers
import numpy as np
import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.utils import BaseOutput
from PIL import Image
from torch import nn

from tspace_core.ensemble import Chain
from tspace_core.errors import CheckpointError, SpecError, TspaceError
from tspace_core.fsio import atomic_write_bytes
from tspace_core.images import to_uint8
from tspace_core.jobspec import section_from_dict
from tspace_core.models import PREDICTION_TYPES
from tspace_core.sampling import EnsemblePredictor, ddim_sample
from tspace_core.schedules import ScheduleConfig
from tspace_core.states import MAPPINGS, LatentStates

MANIFEST_NAME = "tspace_ensemble.json"
FORMAT = "tspace-diffusers/1"
OUTPUT_TYPES = ("np", "pil", "pt")
# Unit folders are named by the exporter; anything else (../x, /abs) could leave the folder.
_UNIT_FOLDER = re.compile(r"unit-[0-9]{3,6}")


@dataclass(frozen=True)
class ExportedUnit:
    """One unit of an export: its folder (a UNet2DModel) and the states it owns, with alpha-bars."""

    folder: str
    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]


@dataclass(frozen=True)
class ExportManifest:
    """What `tspace_ensemble.json` records: how to assemble the units into one DDIM chain.

    job, job_hash: the job the ensemble was trained for.
    prediction_type: "epsilon" or "v_prediction", the same for every unit.
    image_shape: (C, H, W) of the samples; num_classes: 0 for an unconditional ensemble.
    mapping: the job's states.mapping; with "naive" the states' alpha-bars are not the base
        schedule's, so `scheduler/` does not reproduce them (the units' alphas_cumprod do).
    schedule: the job's base schedule, from which `scheduler/` was built.
    units: every unit in order; each state is owned by exactly one unit, and the alpha-bars
        here are the ones sampling uses.
    """

    job: str
    job_hash: str
    prediction_type: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mapping: str
    schedule: ScheduleConfig
    units: tuple[ExportedUnit, ...]

    def __post_init__(self) -> None:
        if not all(isinstance(v, str) for v in (self.job, self.job_hash, self.mapping)):
            raise SpecError("job, job_hash and mapping must be strings")
        if self.prediction_type not in PREDICTION_TYPES:
            raise SpecError(f"prediction_type must be one of {PREDICTION_TYPES}")
        if self.mapping not in MAPPINGS:
            raise SpecError(f"mapping must be one of {MAPPINGS}, got {self.mapping!r}")
        shape, classes = self.image_shape, self.num_classes
        if len(shape) != 3 or not _ints(shape, 1) or not _ints((classes,), 0):
            raise SpecError("image_shape must be 3 positive integers, num_classes an integer >= 0")
        if not isinstance(self.schedule, ScheduleConfig):
            raise SpecError("schedule must be a ScheduleConfig")
        if not self.units:
            raise SpecError("units: an ensemble needs at least one unit")
        for unit in self.units:
            _check_unit(unit)
        folders = [u.folder for u in self.units]
        if len(set(folders)) != len(folders):
            raise SpecError("units: two units share a folder")
        _ = self.latent_states  # every state owned once, alpha-bars falling with t

    @property
    def latent_states(self) -> LatentStates:
        """All units' states, ascending, with their alpha-bars."""
        pairs = sorted(
            (t, a) for u in self.units for t, a in zip(u.timesteps, u.alphas_cumprod, strict=True)
        )
        timesteps = [t for t, _ in pairs]
        if len(set(timesteps)) != len(timesteps):
            raise SpecError(f"units: every state must be owned by one unit, got {timesteps}")
        return LatentStates(tuple(timesteps), tuple(a for _, a in pairs))

    @property
    def chain(self) -> Chain:
        return Chain(self.latent_states, self.image_shape, self.num_classes, self.prediction_type)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> ExportManifest:
        """Parse the JSON form; anything malformed is a SpecError or a KeyError/TypeError."""
        if data.get("format") != FORMAT:
            raise SpecError(f"format is not {FORMAT!r}")
        units = tuple(
            ExportedUnit(
                folder=u["folder"],
                timesteps=tuple(u["timesteps"]),
                alphas_cumprod=tuple(float(a) for a in u["alphas_cumprod"]),
            )
            for u in data["units"]
        )
        return cls(
            job=data["job"],
            job_hash=data["job_hash"],
            prediction_type=data["prediction_type"],
            image_shape=tuple(data["image_shape"]),
            num_classes=data["num_classes"],
            mapping=data["mapping"],
            schedule=section_from_dict(ScheduleConfig, data["schedule"], "schedule"),
            units=units,
        )


def _ints(values: tuple[object, ...], low: int) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values)


def _check_unit(unit: ExportedUnit) -> None:
    if not isinstance(unit.folder, str) or not _UNIT_FOLDER.fullmatch(unit.folder):
        raise SpecError(f"units: folder {unit.folder!r} is not a unit folder name (unit-NNN)")
    if not unit.timesteps or not _ints(unit.timesteps, 0):
        raise SpecError(f"units: {unit.folder} needs timesteps, integers >= 0")
    if len(unit.alphas_cumprod) != len(unit.timesteps):
        raise SpecError(f"units: {unit.folder} needs one alpha-bar per timestep")


def read_export_manifest(path: Path) -> ExportManifest:
    """Read `tspace_ensemble.json`; a missing or malformed one is a CheckpointError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ExportManifest.from_json(data)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist; point at a folder written by `tspace export`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SpecError) as exc:
        raise CheckpointError(f"{path} is not a valid tspace ensemble manifest: {exc}") from None


class UnitList(nn.ModuleList):
    """The units' UNets; `device` and `dtype` let DiffusionPipeline's `to()`/`device` use it."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


@dataclass
class TSpacePipelineOutput(BaseOutput):
    """images: a list of PIL images, an N x H x W x C array in [0, 1], or an N x C x H x W
    tensor in [0, 1]; class_labels: the label of each sample, None if unconditional."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    class_labels: torch.Tensor | None


class TSpacePipeline(DiffusionPipeline):
    """DDIM over the latent states of a T-space ensemble, each state denoised by its unit's UNet.

    diffusers' own loader maps each component to an `__init__` parameter and skips any other
    (a variable number of UNets cannot be expressed), so this class writes and reads its folder
    itself: `save_pretrained` and `from_pretrained` handle the layout `tspace export` writes
    (unit-NNN/, scheduler/, tspace_ensemble.json, model_index.json), local folders only.
    Sampling uses the manifest's alpha-bars, never a schedule recomputed from `scheduler`.
    """

    def __init__(
        self, units: Sequence[UNet2DModel], scheduler: DDIMScheduler, manifest: ExportManifest
    ) -> None:
        super().__init__()
        if len(units) != len(manifest.units):
            raise ValueError(f"{len(units)} UNets for {len(manifest.units)} units")
        self.register_modules(scheduler=scheduler)
        # Named like the __init__ argument: DiffusionPipeline.to() finds modules by those names.
        self.units = UnitList(units)
        self.manifest = manifest

    @property
    def components(self) -> dict[str, Any]:
        """The `__init__` arguments: `TSpacePipeline(**pipe.components)` rebuilds the pipeline."""
        return {"units": list(self.units), "scheduler": self.scheduler, "manifest": self.manifest}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write the units, the scheduler, the manifest and model_index.json into a folder."""
        default = (safe_serialization, variant, max_shard_size, push_to_hub, use_flashpack)
        if default != (True, None, None, False, False) or kwargs:
            raise ValueError("TSpacePipeline.save_pretrained writes safetensors to a local folder")
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        for entry, unet in zip(self.manifest.units, self.units, strict=True):
            cast(UNet2DModel, unet).save_pretrained(root / entry.folder, safe_serialization=True)
        self.scheduler.save_pretrained(root / "scheduler")
        atomic_write_bytes(root / MANIFEST_NAME, _json_bytes(self.manifest.to_json()))
        index = {
            "_class_name": type(self).__name__,
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "DDIMScheduler"],
            **{u.folder: ["diffusers", "UNet2DModel"] for u in self.manifest.units},
        }
        atomic_write_bytes(root / "model_index.json", _json_bytes(index))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> Self:
        """Load a folder written by `tspace export` or `save_pretrained` (safetensors only)."""
        if kwargs:
            raise TypeError(
                f"TSpacePipeline.from_pretrained takes a local folder only, not {sorted(kwargs)}; "
                "move the pipeline with .to(device) after loading"
            )
        root = Path(pretrained_model_name_or_path)
        if not root.is_dir():
            raise CheckpointError(f"{root} is not a folder written by `tspace export`")
        _check_index(root / "model_index.json", cls.__name__)
        manifest = read_export_manifest(root / MANIFEST_NAME)
        units = [_load_unet(root / unit.folder, manifest) for unit in manifest.units]
        try:
            scheduler = DDIMScheduler.from_pretrained(root, subfolder="scheduler")
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"{root / 'scheduler'}: the scheduler does not load: {exc}"
            ) from None
        return cls(units, scheduler, manifest)

    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | int | None = None,
        eta: float = 0.0,
        num_inference_steps: int | None = None,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        clip_sample: bool = True,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> TSpacePipelineOutput | tuple[Any, torch.Tensor | None]:
        """Sample `batch_size` images exactly as `tspace sample` does for the same seed.

        generator: a CPU generator (or an int seed) that draws the initial noise and, with
            eta > 0, the noise of every step; `torch.Generator().manual_seed(s)` or `s` gives
            the samples of `tspace sample --seed s`. None seeds one from torch's global RNG.
        num_inference_steps: sample on this many of the states (None: all of them).
        class_labels: None cycles 0, 1, ..., num_classes - 1 as `tspace sample` does; an int
            labels every sample; a sequence gives one label per sample.
        clip_sample: clamp the predicted x0 to [-1, 1] at every step.
        output_type: "np" (N x H x W x C in [0, 1]), "pil" (PIL images with the pixels of
            `tspace sample`) or "pt" (N x C x H x W in [0, 1]).
        """
        if output_type not in OUTPUT_TYPES:
            raise TspaceError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TspaceError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not eta >= 0:
            raise TspaceError(f"eta must be >= 0, got {eta!r}")
        chain = self.manifest.chain
        states = chain.states
        if num_inference_steps is not None:
            states = states.subset(num_inference_steps)
        cpu = _cpu_generator(generator)
        # The noise is drawn on the CPU, then moved: the convention of sample_chain.
        noise = torch.randn((batch_size, *chain.image_shape), generator=cpu).to(self.device)
        labels = _class_labels(class_labels, batch_size, chain.num_classes)
        predictor = EnsemblePredictor.from_units(
            zip((u.timesteps for u in self.manifest.units), self.units, strict=True)
        )
        with self.progress_bar(total=len(states)) as bar:
            x0 = ddim_sample(
                predictor,
                states.timesteps,
                states.alphas_cumprod,
                noise,
                eta=eta,
                prediction_type=chain.prediction_type,
                class_labels=labels.to(self.device) if labels is not None else None,
                clip_sample=1.0 if clip_sample else None,
                generator=cpu,
                progress=bar.update,
            )
        images = _to_output(x0.cpu(), output_type)
        if not return_dict:
            return images, labels
        return TSpacePipelineOutput(images=images, class_labels=labels)


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, indent=2).encode()


def _check_index(path: Path, class_name: str) -> None:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is missing or unreadable: {exc}") from None
    if not isinstance(index, dict) or index.get("_class_name") != class_name:
        raise CheckpointError(f"{path} does not describe a {class_name}; use `tspace export`")


def _load_unet(folder: Path, manifest: ExportManifest) -> UNet2DModel:
    """A unit's UNet from safetensors (never a pickled .bin), checked against the manifest."""
    try:
        unet = UNet2DModel.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: the UNet does not load: {exc}") from None
    channels, height, width = manifest.image_shape
    config = unet.config
    got = (config.sample_size, config.sample_size, config.in_channels, config.out_channels)
    if (
        got != (height, width, channels, channels)
        or (config.num_class_embeds or 0) != manifest.num_classes
    ):
        raise CheckpointError(
            f"{folder}: the UNet is for {config.in_channels}x{config.sample_size}x"
            f"{config.sample_size} images and {config.num_class_embeds} classes, the manifest "
            f"says {manifest.image_shape} and {manifest.num_classes}"
        )
    return unet.eval()


def _cpu_generator(generator: torch.Generator | int | None) -> torch.Generator:
    if generator is None:
        generator = int(torch.randint(2**62, ()).item())
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    if generator.device.type != "cpu":
        raise TspaceError(
            "generator must be a CPU torch.Generator: the noise is drawn on the CPU so that a "
            "seed gives the same samples on any device"
        )
    return generator


def _class_labels(
    given: int | Sequence[int] | torch.Tensor | None, n: int, num_classes: int
) -> torch.Tensor | None:
    """The labels of sample_chain: None cycles through the classes, an int labels every sample."""
    if num_classes == 0:
        if given is not None:
            raise TspaceError("class_labels: this ensemble is not class-conditional")
        return None
    if given is None:
        return torch.arange(n) % num_classes
    if isinstance(given, int):
        labels = torch.full((n,), given, dtype=torch.long)
    else:
        labels = torch.as_tensor(given).to(torch.long).flatten()
        if labels.shape != (n,):
            raise TspaceError(f"class_labels: give one label per sample ({n}), got {len(labels)}")
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise TspaceError(f"class_labels: every label must be in 0..{num_classes - 1}")
    return labels


def _to_output(x0: torch.Tensor, output_type: str) -> list[Image.Image] | np.ndarray | torch.Tensor:
    if output_type == "pil":
        # Through to_uint8 so the pixels are exactly those `tspace sample` writes.
        pixels = to_uint8(x0).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
    images = (x0.clamp(-1.0, 1.0) + 1.0) / 2.0
    return images if output_type == "pt" else images.permute(0, 2, 3, 1).numpy()
