"""diffusers UNet2DModel presets and the `[model]` section of a job."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from diffusers import UNet2DModel
from torch import nn

from tspace_core.errors import SpecError

PREDICTION_TYPES = ("epsilon", "v_prediction")

# Block layouts. `base` is the DDPM CIFAR-10 U-Net (about 35.7M parameters at 32x32).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
    },
    "small": {
        "block_out_channels": (64, 128, 128),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
    },
    "base": {
        "block_out_channels": (128, 256, 256, 256),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
    },
}

# Set from the data, never from the spec: a mismatch would only fail later, inside training.
_DERIVED_KWARGS = ("sample_size", "in_channels", "out_channels", "num_class_embeds")
# diffusers only warns about (and ignores) keys it does not know, so a typo would go unnoticed.
_UNET_KWARGS = tuple(p for p in inspect.signature(UNet2DModel.__init__).parameters if p != "self")


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser of every unit of a job.

    preset: one of PRESETS ("tiny" for tests and CPUs, "small", "base").
    prediction_type: what the network predicts: "epsilon" (the noise) or "v_prediction".
    class_conditional: feed the dataset's labels through a class embedding.
    kwargs: raw `UNet2DModel` keyword arguments laid over the preset (e.g. block_out_channels).
    """

    preset: str = "tiny"
    prediction_type: str = "epsilon"
    class_conditional: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise SpecError(f"preset: {self.preset!r} is not a preset; use one of {list(PRESETS)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise SpecError(
                f"prediction_type: {self.prediction_type!r} is not allowed; "
                f"use one of {list(PREDICTION_TYPES)}"
            )
        derived = sorted(set(self.kwargs) & set(_DERIVED_KWARGS))
        if derived:
            raise SpecError(f"kwargs: {derived} are set from the data and cannot be given")
        for key in self.kwargs:
            if key not in _UNET_KWARGS:
                close = difflib.get_close_matches(key, _UNET_KWARGS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SpecError(f"kwargs: {key!r} is not a UNet2DModel argument{hint}")


def unet_config(
    cfg: ModelConfig, sample_size: int, in_channels: int, num_classes: int
) -> dict[str, Any]:
    """The full `UNet2DModel` config for `cfg` on images of the given shape."""
    kwargs: dict[str, Any] = {**PRESETS[cfg.preset], **cfg.kwargs}
    channels = kwargs["block_out_channels"]
    if (
        not isinstance(channels, list | tuple)
        or not channels
        or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)
    ):
        raise SpecError(
            f"model.kwargs.block_out_channels: use a list of positive integers, got {channels!r}"
        )
    levels = len(channels) - 1
    if sample_size % (2**levels):
        raise SpecError(
            f"model: images of side {sample_size} cannot pass {levels} downsamplings of preset "
            f"{cfg.preset!r}; resize the data (data.resize) to a multiple of {2**levels}"
        )
    if cfg.class_conditional and num_classes < 1:
        raise SpecError("model.class_conditional: the dataset has no labels")
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return {
        **kwargs,
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_class_embeds": num_classes if cfg.class_conditional else None,
    }


def build_unet(config: dict[str, Any], seed: int | None = None) -> nn.Module:
    """A fresh `UNet2DModel`; with a seed its initial weights do not depend on the global RNG."""
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return cast(nn.Module, UNet2DModel.from_config(config))
    except Exception as exc:
        # diffusers fails in many ways on bad kwargs (norm_num_groups = 0 divides by zero, an
        # unknown time_embedding_type leaves a local unbound): all mean the config is unusable.
        raise SpecError(f"model: UNet2DModel rejected the configuration: {exc}") from exc


def check_forward(config: dict[str, Any]) -> None:
    """Build the model and run one tiny forward pass, so a bad config fails before training."""
    model = build_unet(config, seed=0)
    side, channels = config["sample_size"], config["in_channels"]
    labels = torch.zeros(1, dtype=torch.long) if config.get("num_class_embeds") else None
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, side, side), torch.tensor([0]), class_labels=labels)
    except Exception as exc:  # any failure here means the configuration cannot train
        raise SpecError(
            f"model: this UNet2DModel configuration fails on a forward pass: {exc}"
        ) from None


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
