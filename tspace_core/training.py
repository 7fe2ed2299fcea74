"""The unit trainer: one denoiser trained on the latent states of one unit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tspace_core.checkpoint import (
    flatten_optimizer_state,
    flatten_rng,
    pack_training_state,
    restore_rng,
    unflatten_optimizer_state,
    unpack,
)
from tspace_core.errors import CheckpointError, SpecError
from tspace_core.immiscible import ASSIGNMENTS, assign_noise

MIXED_PRECISION = ("no", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """How each unit is trained.

    steps: optimiser steps per unit.
    batch_size: images per step.
    lr: AdamW peak learning rate, reached linearly over `warmup_steps`.
    weight_decay: AdamW weight decay.
    grad_clip: max global gradient norm; 0 disables clipping.
    ema_decay: EMA decay of the sampling weights (warmed up as min(decay, (1+n)/(10+n)));
        0 makes the EMA weights equal to the trained weights.
    seed: seeds weights, data order, timesteps and noise; each unit derives its own.
    assignment: immiscible noise assignment: "none", "assignment" or "knn".
    knn_k: candidate noises per image for "knn".
    checkpoint_every: write a resumable checkpoint every this many steps; 0 writes only the last.
    mixed_precision: "bf16" autocast on CUDA ("no" disables); CPUs always train in float32.
    compile: wrap the model in torch.compile.
    validation_images: hold this many images out of training (a choice seeded by `seed`, the
        same for every unit); each checkpoint then records metric "val_loss": the EMA weights'
        loss on them at every state of the unit, with noise fixed once per unit. 0 disables.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    assignment: str = "none"
    knn_k: int = 4
    checkpoint_every: int = 0
    mixed_precision: str = "bf16"
    compile: bool = False
    validation_images: int = 0

    def __post_init__(self) -> None:
        _positive(steps=self.steps, batch_size=self.batch_size, knn_k=self.knn_k)
        _non_negative(
            validation_images=self.validation_images,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            checkpoint_every=self.checkpoint_every,
            seed=self.seed,
        )
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay"):
            if not math.isfinite(getattr(self, name)):
                raise SpecError(f"{name}: {getattr(self, name)} is not a finite number")
        if not 0 < self.lr < 1:
            raise SpecError(f"lr: {self.lr} is out of range; use 0 < lr < 1")
        if not 0 <= self.ema_decay < 1:
            raise SpecError(f"ema_decay: {self.ema_decay} is out of range; use 0 <= ema_decay < 1")
        if self.assignment not in ASSIGNMENTS:
            raise SpecError(
                f"assignment: {self.assignment!r} is not allowed; use one of {list(ASSIGNMENTS)}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise SpecError(
                f"mixed_precision: {self.mixed_precision!r} is not allowed; "
                f"use one of {list(MIXED_PRECISION)}"
            )


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise SpecError(f"{name}: {value} is out of range; use an integer >= 1")


def _non_negative(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise SpecError(f"{name}: {value} is out of range; use a value >= 0")


def unit_seed(seed: int, unit_index: int) -> int:
    """A seed of its own for each unit, so units are independent yet reproducible."""
    return (seed * 1_000_003 + unit_index * 7_919 + 1) % (2**63)


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
    a = alpha_bar.view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, eq. in §4)."""
    a = alpha_bar.view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * noise - (1 - a).sqrt() * x0


class UnitTrainer:
    """Trains `model` on a unit's states, drawing t uniformly from them with base alpha-bars.

    Everything that determines the next step (weights, EMA, optimiser, step, RNG) is in
    `state_tensors()`, so training to n in one go equals training to k, saving, loading and
    continuing to n.
    """

    def __init__(
        self,
        model: nn.Module,
        timesteps: Sequence[int],
        alphas_cumprod: Sequence[float],
        images: torch.Tensor,
        cfg: TrainConfig,
        *,
        labels: torch.Tensor | None = None,
        prediction_type: str = "epsilon",
        seed: int = 0,
        device: torch.device | str = "cpu",
        validation: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> None:
        """`validation`: held-out (uint8 images, labels) whose loss `metrics` reports."""
        if len(timesteps) != len(alphas_cumprod) or not timesteps:
            raise SpecError("a unit needs at least one state, each with its alpha-bar")
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device).train()
        self.prediction_type = prediction_type
        self.timesteps = torch.tensor(list(timesteps), dtype=torch.long)
        self.alphas_cumprod = torch.tensor(list(alphas_cumprod), dtype=torch.float32)
        # Data in [-1, 1] on the device; the index draws stay on the CPU generator.
        self.images = images.to(self.device, torch.float32) / 127.5 - 1
        self.labels = labels.to(self.device) if labels is not None else None
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.ema = {k: v.detach().clone() for k, v in self._float_state().items()}
        self.step = 0
        self.loss_ema: float | None = None
        self._forward = torch.compile(self.model) if cfg.compile else self.model
        self.validation = None
        if validation is not None and len(validation[0]):
            val_images, val_labels = validation
            self.validation = (
                val_images.to(self.device, torch.float32) / 127.5 - 1,
                val_labels.to(self.device) if val_labels is not None else None,
            )
        self.validation_seed = seed + 1  # apart from the training draws, same every evaluation

    def _float_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.device.type == "cuda" and self.cfg.mixed_precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        n, b, g = self.images.shape[0], self.cfg.batch_size, self.generator
        index = torch.randint(n, (b,), generator=g)
        state = torch.randint(len(self.timesteps), (b,), generator=g)
        noise = torch.randn((b, *self.images.shape[1:]), generator=g)
        x0 = self.images[index.to(self.device)]
        if self.cfg.assignment != "none":
            # On the CPU with the trainer's generator, so the pairing is reproducible anywhere.
            noise = assign_noise(
                x0.cpu(), noise, self.cfg.assignment, k=self.cfg.knn_k, generator=g
            )
        noise = noise.to(self.device)
        labels = self.labels[index.to(self.device)] if self.labels is not None else None
        return x0, noise, state, labels

    def lr_at(self, step: int) -> float:
        warmup = self.cfg.warmup_steps
        return self.cfg.lr * min(1.0, (step + 1) / warmup) if warmup else self.cfg.lr

    def train_step(self) -> float:
        """One optimiser step; returns the batch loss."""
        x0, noise, state, labels = self._batch()
        t = self.timesteps[state].to(self.device)
        alpha_bar = self.alphas_cumprod[state].to(self.device)
        x_t = q_sample(x0, noise, alpha_bar)
        target = noise if self.prediction_type == "epsilon" else v_target(x0, noise, alpha_bar)
        with self._autocast():
            pred = self._forward(x_t, t, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.step()
        self.step += 1
        self._update_ema()
        value = float(loss.detach())
        self.loss_ema = value if self.loss_ema is None else 0.98 * self.loss_ema + 0.02 * value
        return value

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        current = self._float_state()
        for name, shadow in self.ema.items():
            shadow.lerp_(current[name], 1 - decay)

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with EMA weights in place of the trained ones."""
        return {**self.model.state_dict(), **self.ema}

    def metrics(self) -> dict[str, float]:
        """ "loss": running training loss (EMA, NaN before the first step); "val_loss" too when
        images are held out."""
        out = {"loss": self.loss_ema if self.loss_ema is not None else math.nan}
        if self.validation is not None:
            out["val_loss"] = self.validation_loss()
        return out

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss of the EMA weights on the held-out images over every state of the unit.
        The noise is drawn from a fixed seed each time, so values compare across steps."""
        if self.validation is None:
            raise ValueError("no validation images were held out (training.validation_images)")
        images, labels = self.validation
        weights = self.ema_state_dict()
        generator = torch.Generator().manual_seed(self.validation_seed)
        total, count = 0.0, 0
        for state in range(len(self.timesteps)):
            noise = torch.randn(images.shape, generator=generator).to(self.device)
            for start in range(0, len(images), self.cfg.batch_size):
                x0 = images[start : start + self.cfg.batch_size]
                eps = noise[start : start + self.cfg.batch_size]
                alpha_bar = self.alphas_cumprod[state].expand(len(x0)).to(self.device)
                t = self.timesteps[state].expand(len(x0)).to(self.device)
                x_t = q_sample(x0, eps, alpha_bar)
                target = eps if self.prediction_type == "epsilon" else v_target(x0, eps, alpha_bar)
                kwargs = {
                    "class_labels": labels[start : start + len(x0)] if labels is not None else None
                }
                with self._autocast():
                    pred = torch.func.functional_call(self.model, weights, (x_t, t), kwargs).sample
                total += float(F.mse_loss(pred.float(), target, reduction="sum"))
                count += target.numel()
        return total / count

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON) holding everything the next step depends on."""
        optim_tensors, optim_json = flatten_optimizer_state(self.optimizer.state_dict())
        tensors = pack_training_state(
            {
                "model": self.model.state_dict(),
                "ema": self.ema,
                "optim": optim_tensors,
                "rng": {"generator": flatten_rng(self.generator)},
            }
        )
        state = {"step": self.step, "loss_ema": self.loss_ema, "optimizer": optim_json}
        return tensors, state

    def load_checkpoint_state(
        self, tensors: dict[str, torch.Tensor], state: dict[str, Any]
    ) -> None:
        """Continue exactly where `checkpoint_state` left off."""
        try:
            self.model.load_state_dict(unpack(tensors, "model"))
            ema = unpack(tensors, "ema")
            if ema.keys() != self.ema.keys():
                raise CheckpointError("the checkpoint's EMA weights do not match the model")
            self.ema = {k: v.to(self.device) for k, v in ema.items()}
            self.optimizer.load_state_dict(
                unflatten_optimizer_state(unpack(tensors, "optim"), state["optimizer"])
            )
            restore_rng(self.generator, tensors["rng.generator"])
            self.step = int(state["step"])
            self.loss_ema = state.get("loss_ema")
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"the checkpoint does not fit this unit's model or trainer: {exc}"
            ) from exc
