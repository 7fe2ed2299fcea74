"""The ensemble DDIM sampler: walks the latent states, asking each state's owner to predict."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

# predict(x_t, t, class_labels) -> the network output at base timestep t.
Predictor = Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor]


def split_prediction(
    out: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from the network output (DDIM eq. 9; v as in Salimans & Ho 2022)."""
    a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        return (x_t - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * x_t - s * out, a * out + s * x_t
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ddim_sigma(alpha_bar: float, alpha_bar_prev: float, eta: float) -> float:
    """sigma = eta sqrt((1-abar_prev)/(1-abar_t)) sqrt(1 - abar_t/abar_prev) (DDIM eq. 16)."""
    return eta * math.sqrt(
        (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    )


def ddim_sample(
    predict: Predictor,
    timesteps: Sequence[int],
    alphas_cumprod: Sequence[float],
    noise: torch.Tensor,
    *,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    class_labels: torch.Tensor | None = None,
    clip_sample: float | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """DDIM over the given states, from the noisiest to the cleanest, then to x0 (METHODS.md §1).

    `timesteps` are ascending base indices with their alpha-bars; the state after the cleanest
    has alpha-bar 1. `clip_sample` clamps x0_hat to [-c, c] as diffusers' `clip_sample` does.
    """
    x = noise
    for k in reversed(range(len(timesteps))):
        alpha_bar = float(alphas_cumprod[k])
        alpha_bar_prev = float(alphas_cumprod[k - 1]) if k > 0 else 1.0
        out = predict(x, int(timesteps[k]), class_labels)
        x0_hat, eps_hat = split_prediction(out, x, alpha_bar, prediction_type)
        if clip_sample is not None:
            x0_hat = x0_hat.clamp(-clip_sample, clip_sample)
        sigma = ddim_sigma(alpha_bar, alpha_bar_prev, eta)
        direction = math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps_hat
        x = math.sqrt(alpha_bar_prev) * x0_hat + direction
        if sigma > 0:
            # Drawn where the generator lives, so a seed gives the same noise on any device.
            where = generator.device if generator is not None else x.device
            z = torch.randn(x.shape, generator=generator, device=where, dtype=x.dtype)
            x = x + sigma * z.to(x.device)
        if progress is not None:
            progress(1)
    return x


class EnsemblePredictor:
    """Routes each base timestep to the model of the unit that owns it."""

    def __init__(self, owners: Mapping[int, nn.Module]) -> None:
        self.owners = dict(owners)

    @classmethod
    def from_units(cls, units: Iterable[tuple[Sequence[int], nn.Module]]) -> EnsemblePredictor:
        owners: dict[int, nn.Module] = {}
        for states, model in units:
            for t in states:
                if t in owners:
                    raise ValueError(f"state {t} is owned by two units")
                owners[t] = model
        return cls(owners)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: int, class_labels: torch.Tensor | None) -> torch.Tensor:
        model = self.owners.get(t)
        if model is None:
            raise KeyError(f"no unit owns state {t}")
        timestep = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        return model(x, timestep, class_labels=class_labels).sample
