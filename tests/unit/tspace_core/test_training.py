"""Tests for tspace_core.training: noising, state draws, resume determinism, immiscible, EMA, LR."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from tspace_core import training
from tspace_core.checkpoint import load_checkpoint, save_checkpoint
from tspace_core.data import load_digits
from tspace_core.errors import SpecError
from tspace_core.immiscible import assign_noise
from tspace_core.models import ModelConfig, build_unet, unet_config
from tspace_core.schedules import ScheduleConfig, alphas_cumprod_of
from tspace_core.training import TrainConfig, UnitTrainer, q_sample, unit_seed, v_target

DIGITS = load_digits()
CONFIG = unet_config(ModelConfig(preset="tiny", class_conditional=True), 8, 1, 10)
BASE = alphas_cumprod_of(ScheduleConfig())


def _cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "batch_size": 8, "warmup_steps": 2, **kw})


def _trainer(
    cfg: TrainConfig,
    timesteps: tuple[int, ...] = (332, 666),
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    alphas: tuple[float, ...] | None = None,
    model: nn.Module | None = None,
) -> UnitTrainer:
    abar = alphas if alphas is not None else tuple(float(BASE[t]) for t in timesteps)
    return UnitTrainer(
        model if model is not None else build_unet(CONFIG, seed=seed),
        timesteps,
        abar,
        DIGITS.images,
        cfg,
        labels=DIGITS.labels,
        prediction_type=prediction_type,
        seed=seed,
    )


class Recorder(nn.Module):
    """Wraps a UNet and records what the trainer feeds it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Any = None) -> Any:
        labels = None if class_labels is None else class_labels.clone()
        self.calls.append((x.detach().clone(), t.clone(), labels))
        return self.inner(x, t, class_labels=class_labels)


def _record_batches(trainer: UnitTrainer) -> list[tuple[Any, ...]]:
    batches: list[tuple[Any, ...]] = []
    draw = trainer._batch

    def recording() -> Any:
        out = draw()
        batches.append(out)
        return out

    trainer._batch = recording  # type: ignore[method-assign]
    return batches


def _record_targets(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    targets: list[torch.Tensor] = []

    def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        targets.append(target.detach().clone())
        return F.mse_loss(pred, target)

    monkeypatch.setattr(training, "F", SimpleNamespace(mse_loss=mse_loss))
    return targets


# ------------------------------------------------------------------------ q_sample, v_target


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 99, 500, 998, 999])
    return x0, noise, t


def test_q_sample_and_v_target_follow_their_formulas(batch: Any) -> None:
    x0, noise, _ = batch
    abar = torch.tensor([0.99, 0.9, 0.5, 0.25, 0.1, 0.001])
    x_t, v = q_sample(x0, noise, abar), v_target(x0, noise, abar)
    for i, a in enumerate(abar.tolist()):
        torch.testing.assert_close(x_t[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i])
        torch.testing.assert_close(v[i], math.sqrt(a) * noise[i] - math.sqrt(1 - a) * x0[i])
    # Analytic check: x0 = sqrt(abar) x_t - sqrt(1 - abar) v (Salimans & Ho 2022).
    a = abar.view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_q_sample_and_v_target_match_diffusers(batch: Any, beta_schedule: str) -> None:
    x0, noise, t = batch
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)
    abar = sched.alphas_cumprod[t]
    torch.testing.assert_close(q_sample(x0, noise, abar), sched.add_noise(x0, noise, t))
    torch.testing.assert_close(v_target(x0, noise, abar), sched.get_velocity(x0, noise, t))


# ------------------------------------------------------------------------ what the trainer feeds


def test_trainer_draws_only_its_states_with_the_given_alpha_bars() -> None:
    # Alpha-bars deliberately not the base schedule's: the trainer must use what it is given.
    states, abar = (100, 700), (0.8, 0.05)
    recorder = Recorder(build_unet(CONFIG, seed=0))
    trainer = _trainer(_cfg(), states, alphas=abar, model=recorder)
    batches = _record_batches(trainer)
    for _ in range(4):
        trainer.train_step()
    assert len(recorder.calls) == len(batches) == 4
    seen: set[int] = set()
    data = DIGITS.images.float() / 127.5 - 1
    for (x_t, t, labels), (x0, noise, _, batch_labels) in zip(recorder.calls, batches, strict=True):
        assert t.dtype == torch.long and t.shape == (8,)
        seen |= set(t.tolist())
        alpha = torch.tensor([abar[states.index(s)] for s in t.tolist()])
        assert torch.equal(x_t, q_sample(x0, noise, alpha))
        assert torch.equal(labels, batch_labels)
        # Every x0 is a training image scaled to [-1, 1], and its label is that image's.
        for img, label in zip(x0, labels, strict=True):
            match = (data == img).flatten(1).all(dim=1)
            assert match.any() and int(label) in DIGITS.labels[match].tolist()
    assert seen == set(states)


def test_trainer_rejects_states_without_alpha_bars() -> None:
    with pytest.raises(SpecError, match="state"):
        _trainer(_cfg(), (1, 2), alphas=(0.5,))
    with pytest.raises(SpecError, match="state"):
        _trainer(_cfg(), (), alphas=())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_target_is_noise_or_velocity(
    monkeypatch: pytest.MonkeyPatch, prediction_type: str
) -> None:
    targets = _record_targets(monkeypatch)
    trainer = _trainer(_cfg(), prediction_type=prediction_type)
    batches = _record_batches(trainer)
    trainer.train_step()
    x0, noise, state, _ = batches[0]
    abar = trainer.alphas_cumprod[state]
    want = noise if prediction_type == "epsilon" else v_target(x0, noise, abar)
    assert torch.equal(targets[0], want)


@pytest.mark.parametrize("method", ["assignment", "knn"])
def test_immiscible_target_is_the_assigned_noise(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    targets = _record_targets(monkeypatch)
    assigned: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def recording(x0: torch.Tensor, noise: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        out = assign_noise(x0, noise, *args, **kw)
        assigned.append((x0.clone(), noise.clone(), out.clone()))
        return out

    monkeypatch.setattr(training, "assign_noise", recording)
    recorder = Recorder(build_unet(CONFIG, seed=0))
    trainer = _trainer(_cfg(assignment=method), model=recorder)
    batches = _record_batches(trainer)
    for _ in range(2):
        trainer.train_step()
    assert len(assigned) == len(targets) == 2
    for (x0, raw, out), target, (x_t, _, _), batch in zip(
        assigned, targets, recorder.calls, batches, strict=True
    ):
        if method == "assignment":
            # Recomputed independently of the trainer: the permuted noise, not the raw draw.
            assert torch.equal(target, assign_noise(x0, raw, "assignment"))
            assert sorted(map(tuple, target.flatten(1).tolist())) == sorted(
                map(tuple, raw.flatten(1).tolist())
            )
        assert torch.equal(target, out)
        assert not torch.equal(target, raw)
        abar = trainer.alphas_cumprod[batch[2]]
        assert torch.equal(x_t, q_sample(x0, out, abar))


# ------------------------------------------------------------------------ resume determinism


def _assert_same_trainer(a: UnitTrainer, b: UnitTrainer) -> None:
    assert a.step == b.step and a.loss_ema == b.loss_ema
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.ema.keys() == b.ema.keys()
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for pid, state in oa["state"].items():
        assert state.keys() == ob["state"][pid].keys()
        assert all(torch.equal(v, ob["state"][pid][k]) for k, v in state.items())
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


@pytest.mark.parametrize(
    ("assignment", "prediction_type"),
    [("none", "epsilon"), ("knn", "epsilon"), ("assignment", "epsilon"), ("none", "v_prediction")],
)
def test_resume_from_a_checkpoint_is_bitwise_identical(
    tmp_path: Path, assignment: str, prediction_type: str
) -> None:
    cfg = _cfg(assignment=assignment, ema_decay=0.9)
    straight = _trainer(cfg, seed=5, prediction_type=prediction_type)
    for _ in range(6):
        straight.train_step()

    first = _trainer(cfg, seed=5, prediction_type=prediction_type)
    for _ in range(3):
        first.train_step()
    tensors, state = first.checkpoint_state()
    save_checkpoint(tmp_path / "k3.safetensors", tensors, state)
    del first

    ckpt = load_checkpoint(tmp_path / "k3.safetensors")
    resumed = _trainer(cfg, seed=77, prediction_type=prediction_type)
    resumed.load_checkpoint_state(ckpt.tensors, ckpt.meta)
    assert resumed.step == 3
    for _ in range(3):
        resumed.train_step()
    _assert_same_trainer(straight, resumed)


def test_fresh_trainers_with_other_seeds_differ() -> None:
    # The resume test can fail: without the checkpoint, another seed trains differently.
    a, b = _trainer(_cfg(), seed=5), _trainer(_cfg(), seed=77)
    a.train_step()
    b.train_step()
    assert not torch.equal(a.model.conv_in.weight, b.model.conv_in.weight)


def test_unit_seed_is_distinct_per_unit_and_reproducible() -> None:
    seeds = [unit_seed(0, u) for u in range(50)] + [unit_seed(1, u) for u in range(50)]
    assert len(set(seeds)) == len(seeds)
    assert unit_seed(3, 7) == unit_seed(3, 7)
    assert all(0 <= s < 2**63 for s in seeds)


# ------------------------------------------------------------------------ EMA, LR, clipping


def _weights(trainer: UnitTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_ema_with_zero_decay_equals_the_weights() -> None:
    trainer = _trainer(_cfg(ema_decay=0.0))
    for _ in range(3):
        trainer.train_step()
        weights = trainer.model.state_dict()
        assert all(torch.equal(trainer.ema[k], weights[k]) for k in trainer.ema)
    state = trainer.ema_state_dict()
    assert all(torch.equal(state[k], v) for k, v in trainer.model.state_dict().items())


def test_ema_lags_with_the_warmed_up_decay() -> None:
    decay = 0.5
    trainer = _trainer(_cfg(ema_decay=decay, steps=12))
    shadow = {k: v.double() for k, v in _weights(trainer).items()}
    for n in range(1, 13):
        trainer.train_step()
        weights = _weights(trainer)
        # EMA warm-up: decay_n = min(decay, (1 + n) / (10 + n)) after n optimiser steps.
        d = min(decay, (1 + n) / (10 + n))
        shadow = {k: d * shadow[k] + (1 - d) * weights[k].double() for k in shadow}
    lagging = [k for k in trainer.ema if not torch.equal(trainer.ema[k], weights[k])]
    assert "conv_in.weight" in lagging
    for k, ema in trainer.ema.items():
        torch.testing.assert_close(ema.double(), shadow[k], rtol=1e-5, atol=1e-7)
    # The EMA state dict swaps in the shadow weights and keeps every key of the model's.
    state = trainer.ema_state_dict()
    assert state.keys() == trainer.model.state_dict().keys()
    assert torch.equal(state["conv_in.weight"], trainer.ema["conv_in.weight"])


def test_lr_warms_up_linearly_to_the_peak() -> None:
    cfg = _cfg(lr=4e-3, warmup_steps=4)
    trainer = _trainer(cfg)
    used = []
    for _ in range(6):
        trainer.train_step()
        used.append(trainer.optimizer.param_groups[0]["lr"])
    assert used == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3, 4e-3, 4e-3], rel=1e-12)
    assert trainer.lr_at(0) < cfg.lr
    assert _trainer(_cfg(lr=4e-3, warmup_steps=0)).lr_at(0) == cfg.lr


def _first_step(grad_clip: float) -> tuple[float, float]:
    """(gradient norm the optimiser saw, largest weight change) of one step."""
    trainer = _trainer(_cfg(grad_clip=grad_clip, warmup_steps=0))
    norms: list[float] = []

    def hook(opt: torch.optim.Optimizer, *_: Any) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    trainer.optimizer.register_step_pre_hook(hook)
    before = _weights(trainer)
    trainer.train_step()
    after = _weights(trainer)
    change = max(float((after[k] - before[k]).abs().max()) for k in before)
    return norms[0], change


def test_grad_clip_bounds_the_gradient_and_the_update() -> None:
    unclipped_norm, unclipped_change = _first_step(0.0)
    clipped_norm, _ = _first_step(1e-3)
    tiny_norm, tiny_change = _first_step(1e-12)
    assert unclipped_norm > 1e-2
    assert clipped_norm == pytest.approx(1e-3, rel=1e-3)
    assert tiny_norm <= 1.01e-12
    # Adam normalises gradients, so only a gradient far below its eps (1e-8) shrinks the step.
    assert unclipped_change == pytest.approx(1e-3, rel=0.05)
    assert tiny_change < 1e-2 * unclipped_change


# ------------------------------------------------------------------------ config and sanity


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", 0),
        ("knn_k", 0),
        ("warmup_steps", -1),
        ("weight_decay", -0.1),
        ("grad_clip", -1.0),
        ("checkpoint_every", -1),
        ("seed", -1),
        ("lr", 0.0),
        ("lr", 1.0),
        ("ema_decay", 1.0),
        ("ema_decay", -0.1),
        ("assignment", "hungarian"),
        ("mixed_precision", "fp16"),
    ],
)
def test_train_config_errors_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(SpecError, match=rf"^{field}: "):
        TrainConfig(**{field: value})


def test_train_config_defaults_are_valid() -> None:
    cfg = TrainConfig()
    assert cfg.assignment == "none" and cfg.steps >= 1


def test_loss_decreases_on_a_single_state_unit() -> None:
    trainer = _trainer(_cfg(steps=60, lr=2e-3, warmup_steps=5), (499,))
    losses = [trainer.train_step() for _ in range(60)]
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first
    assert trainer.metrics()["loss"] == pytest.approx(trainer.loss_ema)
    assert math.isnan(_trainer(_cfg()).metrics()["loss"])


@pytest.mark.parametrize("field", ["lr", "weight_decay", "grad_clip", "ema_decay"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(SpecError, match=f"^{field}: .* not a finite number"):
        TrainConfig(**{field: value})


# --- held-out validation loss ---


def _validated(cfg: TrainConfig, held: int = 40, **kw: Any) -> UnitTrainer:
    """A trainer on all digits but the last `held`, validating on those."""
    return UnitTrainer(
        build_unet(CONFIG, seed=3),
        (332, 666),
        tuple(float(BASE[t]) for t in (332, 666)),
        DIGITS.images[:-held],
        cfg,
        labels=DIGITS.labels[:-held],
        seed=3,
        validation=(DIGITS.images[-held:], DIGITS.labels[-held:]),
        **kw,
    )


def test_validation_loss_is_the_ema_weights_loss_on_the_held_out_images() -> None:
    trainer = _validated(_cfg(ema_decay=0.5, batch_size=16))
    for _ in range(3):
        trainer.train_step()
    # Independent route: the EMA weights loaded into a second model, every image in one batch,
    # noise drawn state by state from the documented seed (the trainer's seed + 1).
    model = build_unet(CONFIG, seed=0)
    model.load_state_dict(trainer.ema_state_dict())
    generator = torch.Generator().manual_seed(3 + 1)
    x0 = DIGITS.images[-40:].float() / 127.5 - 1
    losses = []
    with torch.no_grad():
        for t in (332, 666):
            noise = torch.randn(x0.shape, generator=generator)
            abar = torch.full((len(x0),), float(BASE[t]))
            pred = model(q_sample(x0, noise, abar), torch.full((len(x0),), t), DIGITS.labels[-40:])
            losses.append(F.mse_loss(pred.sample, noise))
    expected = float(torch.stack(losses).mean())
    assert trainer.validation_loss() == pytest.approx(expected, rel=1e-5)
    assert trainer.metrics()["val_loss"] == trainer.validation_loss()  # fixed noise: repeatable


def test_validation_does_not_change_training_and_falls_with_it() -> None:
    cfg = _cfg(steps=40, lr=3e-3, ema_decay=0.0)
    with_val = _validated(cfg)
    without = UnitTrainer(
        build_unet(CONFIG, seed=3),
        (332, 666),
        tuple(float(BASE[t]) for t in (332, 666)),
        DIGITS.images[:-40],
        cfg,
        labels=DIGITS.labels[:-40],
        seed=3,
    )
    start = with_val.validation_loss()
    for _ in range(40):
        with_val.train_step()
        without.train_step()
    _assert_same_trainer(with_val, without)
    assert "val_loss" not in without.metrics()
    assert with_val.validation_loss() < 0.8 * start


def test_validation_loss_needs_held_out_images() -> None:
    with pytest.raises(ValueError, match="validation_images"):
        _trainer(_cfg()).validation_loss()


def test_split_validation_holds_out_the_same_images_for_every_unit() -> None:
    from tspace_core.runner import split_validation

    train, held = split_validation(DIGITS, 100, seed=7)
    assert held is not None and len(held) == 100 and len(train) == len(DIGITS) - 100
    assert sorted(torch.cat([train, held]).tolist()) == list(range(len(DIGITS)))
    again, held_again = split_validation(DIGITS, 100, seed=7)
    assert torch.equal(held, held_again) and torch.equal(train, again)
    other = split_validation(DIGITS, 100, seed=8)[1]
    assert other is not None and not torch.equal(held, other)
    assert split_validation(DIGITS, 0, seed=7) == (slice(None), None)
    with pytest.raises(SpecError, match=f"has {len(DIGITS)} images"):
        split_validation(DIGITS, len(DIGITS), seed=7)
