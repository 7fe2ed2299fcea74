"""Ensemble manifests: which checkpoint owns which states, and sampling from the assembled chain."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tspace_core.checkpoint import Checkpoint, load_checkpoint, unpack
from tspace_core.errors import CheckpointError, SpecError, TspaceError
from tspace_core.fsio import atomic_write
from tspace_core.images import to_uint8
from tspace_core.models import PREDICTION_TYPES, build_unet
from tspace_core.sampling import EnsemblePredictor, ddim_sample
from tspace_core.states import LatentStates

FORMAT = "tspace-ensemble/1"


@dataclass(frozen=True)
class Member:
    """One unit of an ensemble: its states and the checkpoint (relative path + digest) for them."""

    unit: int
    timesteps: tuple[int, ...]
    checkpoint: str
    sha256: str
    step: int


@dataclass(frozen=True)
class EnsembleManifest:
    """A frozen list of unit -> checkpoint, with what the sampler needs to assemble the chain."""

    name: str
    job: str
    job_hash: str
    prediction_type: str
    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]
    image_shape: tuple[int, int, int]
    num_classes: int
    members: tuple[Member, ...]

    @property
    def latent_states(self) -> LatentStates:
        return LatentStates(self.timesteps, self.alphas_cumprod)


def write_manifest(path: Path, manifest: EnsembleManifest) -> None:
    data = {"format": FORMAT, **asdict(manifest)}
    text = json.dumps(data, indent=2).encode()
    atomic_write(path, lambda f: f.write(text))


def read_manifest(path: Path) -> EnsembleManifest:
    """Parse an ensemble manifest; anything malformed is a CheckpointError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist; point at a folder written by `tspace train`"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable ensemble manifest: {exc}") from None
    try:
        if data.pop("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
        members = tuple(
            Member(**{**m, "timesteps": tuple(m["timesteps"])}) for m in data.pop("members")
        )
        manifest = EnsembleManifest(
            **{
                **data,
                "timesteps": tuple(data["timesteps"]),
                "alphas_cumprod": tuple(data["alphas_cumprod"]),
                "image_shape": tuple(data["image_shape"]),
                "members": members,
            }
        )
        _check_fields(manifest)
    except (KeyError, TypeError, ValueError, AttributeError, SpecError) as exc:
        raise CheckpointError(f"{path} is not a valid ensemble manifest: {exc}") from None
    return manifest


def _ints(values: tuple[object, ...], low: int) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values)


def _check_fields(m: EnsembleManifest) -> None:
    """What JSON cannot promise: field types, and every state owned by exactly one member."""
    if not all(isinstance(v, str) for v in (m.name, m.job, m.job_hash, m.prediction_type)):
        raise ValueError("name, job, job_hash and prediction_type must be strings")
    if m.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {m.prediction_type!r} is not in {PREDICTION_TYPES}")
    if len(m.image_shape) != 3 or not _ints(m.image_shape, 1) or not _ints((m.num_classes,), 0):
        raise ValueError("image_shape must be 3 positive integers, num_classes an integer >= 0")
    LatentStates(m.timesteps, m.alphas_cumprod)  # ascending states, alpha-bars in (0, 1)
    owned: list[int] = []
    for member in m.members:
        if not (
            isinstance(member.checkpoint, str)
            and isinstance(member.sha256, str)
            and _ints((member.unit, member.step, *member.timesteps), 0)
        ):
            raise ValueError(f"member {member.unit!r} has a field of the wrong type")
        owned += member.timesteps
    if sorted(owned) != list(m.timesteps):
        raise ValueError("the members' states must cover the timesteps, each exactly once")


def _member_path(root: Path, member: Member) -> Path:
    path = (root / member.checkpoint).resolve()
    if not path.is_relative_to(root.resolve()) or os.path.isabs(member.checkpoint):
        raise CheckpointError(
            f"unit {member.unit}: checkpoint path {member.checkpoint!r} leaves the ensemble folder"
        )
    return path


def load_member(root: Path, member: Member, device: torch.device | str = "cpu") -> nn.Module:
    """The unit's model with its EMA weights, after its digest matches the manifest."""
    ckpt = load_checkpoint(_member_path(root, member))
    if ckpt.sha256 != member.sha256:
        raise CheckpointError(
            f"unit {member.unit}: {member.checkpoint} has digest {ckpt.sha256[:16]}..., the "
            f"manifest expects {member.sha256[:16]}...; the file was changed or corrupted"
        )
    return model_from_checkpoint(ckpt, member.unit, member.timesteps, device)


def model_from_checkpoint(
    ckpt: Checkpoint, unit: int, timesteps: tuple[int, ...], device: torch.device | str = "cpu"
) -> nn.Module:
    """The EMA model a verified checkpoint holds, for the states it was trained on."""
    if tuple(ckpt.meta.get("states", ())) != timesteps:
        raise CheckpointError(
            f"unit {unit}: {ckpt.path.name} was trained on states "
            f"{ckpt.meta.get('states')}, not {list(timesteps)}"
        )
    try:
        model = build_unet(ckpt.meta["unet_config"])
        model.load_state_dict({**unpack(ckpt.tensors, "model"), **unpack(ckpt.tensors, "ema")})
    except (KeyError, RuntimeError, TspaceError) as exc:
        raise CheckpointError(f"unit {unit}: weights do not load: {exc}") from None
    return model.to(device).eval()


def load_ensemble(
    root: Path, manifest: EnsembleManifest, device: torch.device | str = "cpu"
) -> EnsemblePredictor:
    """Every member's model, each verified against the manifest, routed by state."""
    return EnsemblePredictor.from_units(
        (m.timesteps, load_member(root, m, device)) for m in manifest.members
    )


@dataclass(frozen=True)
class SampleOptions:
    """How to sample: count, seed, DDIM eta, steps (None = every state), class label, clipping."""

    n: int = 64
    seed: int = 0
    eta: float = 0.0
    steps: int | None = None
    label: int | None = None
    clip_sample: float | None = 1.0


@dataclass(frozen=True)
class Chain:
    """What sampling needs besides the models: the states and the shape of the outputs."""

    states: LatentStates
    image_shape: tuple[int, int, int]
    num_classes: int
    prediction_type: str


def sample_chain(
    predictor: EnsemblePredictor,
    chain: Chain,
    opts: SampleOptions,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample the assembled chain: uint8 images (N x C x H x W), and labels if conditional."""
    states = chain.states if opts.steps is None else chain.states.subset(opts.steps)
    generator = torch.Generator().manual_seed(opts.seed)
    noise = torch.randn((opts.n, *chain.image_shape), generator=generator).to(device)
    labels = _labels(chain.num_classes, opts)
    x0 = ddim_sample(
        predictor,
        states.timesteps,
        states.alphas_cumprod,
        noise,
        eta=opts.eta,
        prediction_type=chain.prediction_type,
        class_labels=labels.to(device) if labels is not None else None,
        clip_sample=opts.clip_sample,
        generator=generator,
        progress=progress,
    )
    return to_uint8(x0.cpu()), labels


def sample_ensemble(
    root: Path,
    opts: SampleOptions,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample the ensemble `tspace train` wrote to `root`."""
    manifest = read_manifest(root / "ensemble.json")
    predictor = load_ensemble(root, manifest, device)
    chain = Chain(
        manifest.latent_states, manifest.image_shape, manifest.num_classes, manifest.prediction_type
    )
    return sample_chain(predictor, chain, opts, device, progress)


def _labels(num_classes: int, opts: SampleOptions) -> torch.Tensor | None:
    if num_classes == 0:
        if opts.label is not None:
            raise TspaceError("--label: this ensemble is not class-conditional")
        return None
    if opts.label is not None:
        if not 0 <= opts.label < num_classes:
            raise TspaceError(f"--label: {opts.label} is out of range 0..{num_classes - 1}")
        return torch.full((opts.n,), opts.label, dtype=torch.long)
    return torch.arange(opts.n) % num_classes
