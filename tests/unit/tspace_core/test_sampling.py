"""The ensemble DDIM sampler against diffusers' DDIMScheduler, and routing to unit owners."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from tspace_core.models import ModelConfig, build_unet, unet_config
from tspace_core.sampling import EnsemblePredictor, ddim_sample
from tspace_core.schedules import ScheduleConfig, alphas_cumprod_of
from tspace_core.states import LatentStates, StatesConfig, latent_states

T = 1000
DATA_STD = 0.5


class GaussianDenoiser(torch.nn.Module):
    """The exact posterior-mean predictor for data ~ N(0, DATA_STD^2 I): a well-scaled model."""

    def __init__(self, prediction_type: str) -> None:
        super().__init__()
        self.alphas_cumprod = alphas_cumprod_of(ScheduleConfig()).float()
        self.prediction_type = prediction_type

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1)[0]
        a = self.alphas_cumprod[t]
        denom = a * DATA_STD**2 + 1 - a
        eps = (1 - a).sqrt() * x / denom
        if self.prediction_type == "epsilon":
            return eps
        x0 = a.sqrt() * DATA_STD**2 * x / denom
        return a.sqrt() * eps - (1 - a).sqrt() * x0


def _reference(model, noise, steps, eta, prediction_type, clip, seed):
    scheduler = DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        clip_sample=clip,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t), t, x, eta=eta, generator=generator).prev_sample
    return x


def _ours(predict, states: LatentStates, noise, eta, prediction_type, clip, seed):
    return ddim_sample(
        predict,
        states.timesteps,
        states.alphas_cumprod,
        noise.clone(),
        eta=eta,
        prediction_type=prediction_type,
        clip_sample=1.0 if clip else None,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [10, 5])
def test_equals_diffusers_ddim_with_one_model_everywhere(prediction_type, eta, steps):
    model = GaussianDenoiser(prediction_type)
    states = latent_states(ScheduleConfig(), StatesConfig(count=10)).subset(steps)
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = _reference(model, noise, steps, eta, prediction_type, clip=False, seed=7)
    got = _ours(lambda x, t, y: model(x, t), states, noise, eta, prediction_type, False, seed=7)
    assert (got - expected).abs().max() < 1e-5
    assert not torch.equal(got, noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_equals_diffusers_with_a_unet_and_clipping(prediction_type):
    # In float64: an untrained UNet amplifies float32 rounding (x0 = (x - sqrt(1-abar) eps) /
    # sqrt(abar) multiplies it by ~160 at t=999) into ~3e-5 differences that depend on the
    # kernels' summation order. What remains is diffusers keeping its alpha-bars in float32.
    config = unet_config(ModelConfig(class_conditional=False), 8, 1, 0)
    unet = build_unet(config, seed=0).double().eval()
    states = latent_states(ScheduleConfig(), StatesConfig(count=10))
    predictor = EnsemblePredictor({t: unet for t in states.timesteps})
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = _reference(lambda x, t: unet(x, t).sample, noise, 10, 0.0, prediction_type, True, 0)
    got = _ours(predictor, states, noise, 0.0, prediction_type, True, 0)
    assert (got - expected).abs().max() < 1e-5


def test_the_cleanest_state_steps_to_alpha_bar_one():
    # With a perfect x0 predictor, one step from any state lands exactly on x0.
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    abar = 0.3
    noise = torch.randn_like(x0)
    x_t = abar**0.5 * x0 + (1 - abar) ** 0.5 * noise

    def oracle(x, t, y):
        return noise

    out = ddim_sample(oracle, (500,), (abar,), x_t)
    assert torch.allclose(out, x0, atol=1e-6)


class Recorder(torch.nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.calls: list[int] = []

    def forward(self, x, timestep, class_labels=None):
        self.calls.append(int(timestep[0]))
        return type("Out", (), {"sample": torch.full_like(x, self.value)})()


def test_each_state_is_predicted_by_the_unit_that_owns_it():
    low, high = Recorder(0.1), Recorder(-0.1)
    states = latent_states(ScheduleConfig(), StatesConfig(count=6))
    ts = states.timesteps
    predictor = EnsemblePredictor.from_units([(ts[:2], low), (ts[2:], high)])
    ddim_sample(predictor, ts, states.alphas_cumprod, torch.zeros(2, 1, 4, 4))
    assert high.calls == list(reversed(ts[2:]))
    assert low.calls == list(reversed(ts[:2]))


def test_a_state_owned_twice_or_not_at_all_is_an_error():
    m = Recorder(0.0)
    with pytest.raises(ValueError, match="owned by two units"):
        EnsemblePredictor.from_units([((1, 2), m), ((2, 3), m)])
    with pytest.raises(KeyError, match="no unit owns state 5"):
        EnsemblePredictor({1: m})(torch.zeros(1, 1, 2, 2), 5, None)


def test_gaussian_optimal_chain_converges_to_the_data_variance():
    # An analytic property: with the exact denoiser, DDIM maps N(0, I) towards N(0, DATA_STD^2),
    # and its discretisation error shrinks as the chain gets more states.
    model = GaussianDenoiser("epsilon")
    noise = torch.randn(20000, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    errors = []
    for count in (10, 50, 250, 1000):
        states = latent_states(ScheduleConfig(), StatesConfig(count=count))
        out = _ours(lambda x, t, y: model(x, t), states, noise, 0.0, "epsilon", False, 0)
        errors.append(abs(out.std().item() - DATA_STD))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01


def test_same_seed_same_samples_with_eta():
    model = GaussianDenoiser("epsilon")
    states = latent_states(ScheduleConfig(), StatesConfig(count=10))
    noise = torch.randn(4, 1, 4, 4)
    a = _ours(lambda x, t, y: model(x, t), states, noise, 1.0, "epsilon", False, seed=5)
    b = _ours(lambda x, t, y: model(x, t), states, noise, 1.0, "epsilon", False, seed=5)
    c = _ours(lambda x, t, y: model(x, t), states, noise, 1.0, "epsilon", False, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
