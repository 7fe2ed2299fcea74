"""Tests for tspace_core.schedules: diffusers as the oracle, TV/SNR by its algebra."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from tspace_core.errors import SpecError
from tspace_core.schedules import (
    BASE_SCHEDULES,
    SNR_SOURCES,
    TVSNR,
    ScheduleConfig,
    alphas_cumprod_of,
    base_alphas_cumprod,
    betas_for,
    ot_fm_log_snr,
    tv_snr_of,
)

BETA_RANGES = [(1e-4, 0.02), (0.00085, 0.012)]
EXPONENTS = [0.0, 0.25, 0.5, 1.0]


def _diffusers_scheduler(cls: type, name: str, T: int, beta_range: tuple[float, float]):
    return cls(
        num_train_timesteps=T,
        beta_schedule=name,
        beta_start=beta_range[0],
        beta_end=beta_range[1],
    )


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("name", BASE_SCHEDULES)
@pytest.mark.parametrize("T", [10, 1000])
@pytest.mark.parametrize("beta_range", BETA_RANGES)
def test_base_schedules_match_diffusers(cls, name, T, beta_range):
    sched = _diffusers_scheduler(cls, name, T, beta_range)
    expected = sched.alphas_cumprod.double()
    ours = base_alphas_cumprod(name, T, *beta_range)
    assert ours.dtype == torch.float64 and ours.shape == (T,)
    assert torch.max(torch.abs(ours - expected)).item() < 1e-6
    # Bit-exact: a float64 cumprod would differ by ~2.5e-7, within 1e-6 but not the same numbers.
    assert torch.equal(ours, expected)
    cfg = ScheduleConfig(
        kind=name, num_train_timesteps=T, beta_start=beta_range[0], beta_end=beta_range[1]
    )
    assert torch.max(torch.abs(alphas_cumprod_of(cfg) - expected)).item() < 1e-6
    assert torch.equal(betas_for(name, T, *beta_range), sched.betas)


def test_betas_for_rejects_unknown_name():
    with pytest.raises(SpecError, match="linear"):
        betas_for("sigmoid", 10)


def _source_log_snr(cfg: ScheduleConfig) -> np.ndarray:
    """log gamma of cfg's SNR source computed independently (diffusers, or the formula in numpy)."""
    T = cfg.num_train_timesteps
    if cfg.snr == "ot_fm":
        t = (np.arange(T) + 1) / T
        tp = cfg.t_min + t * (cfg.t_max - cfg.t_min)
        return cfg.eta * np.log((1 - tp) / tp) + cfg.kappa
    sched = _diffusers_scheduler(DDPMScheduler, cfg.snr, T, (cfg.beta_start, cfg.beta_end))
    abar = sched.alphas_cumprod.double().numpy()
    return np.log(abar / (1 - abar))


@pytest.mark.parametrize("snr", SNR_SOURCES)
@pytest.mark.parametrize("c", EXPONENTS)
def test_tv_snr_identities(snr, c):
    cfg = ScheduleConfig(kind="tv_snr", snr=snr, tv_exponent=c, num_train_timesteps=200)
    tv = tv_snr_of(cfg)
    a2, b2 = tv.a.numpy() ** 2, tv.b.numpy() ** 2
    gamma = np.exp(_source_log_snr(cfg))
    assert tv.a.dtype == torch.float64 and tv.a.shape == (200,)
    np.testing.assert_allclose(a2 / b2, gamma, rtol=1e-9)
    np.testing.assert_allclose(tv.gamma.numpy(), gamma, rtol=1e-9)
    np.testing.assert_allclose(a2 + b2, (1 + 1 / gamma) ** c, rtol=1e-9)
    np.testing.assert_allclose(tv.tv2.numpy(), a2 + b2, rtol=1e-12)
    assert tv.is_variance_preserving == (c == 0.0)


@pytest.mark.parametrize("name", BASE_SCHEDULES)
def test_constant_tv_with_named_snr_gives_the_base_alphas_cumprod(name):
    cfg = ScheduleConfig(kind="tv_snr", snr=name)
    base = alphas_cumprod_of(ScheduleConfig(kind=name))
    assert tv_snr_of(cfg).is_variance_preserving
    np.testing.assert_allclose(alphas_cumprod_of(cfg).numpy(), base.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", BASE_SCHEDULES)
def test_named_kind_tv_snr_is_sqrt_alphas_cumprod(name):
    cfg = ScheduleConfig(kind=name, num_train_timesteps=50)
    tv = tv_snr_of(cfg)
    abar = base_alphas_cumprod(name, 50)
    assert torch.allclose(tv.a, abar.sqrt(), rtol=0, atol=1e-15)
    assert torch.allclose(tv.b, (1 - abar).sqrt(), rtol=0, atol=1e-15)
    assert tv.is_variance_preserving


@pytest.mark.parametrize("snr", SNR_SOURCES)
def test_exponent_one_is_variance_exploding(snr):
    tv = tv_snr_of(ScheduleConfig(kind="tv_snr", snr=snr, tv_exponent=1.0))
    assert torch.allclose(tv.a, torch.ones_like(tv.a), rtol=0, atol=1e-12)
    assert torch.all(tv.tv2 > 1.0)
    assert not tv.is_variance_preserving


@pytest.mark.parametrize(
    ("eta", "kappa", "t_min", "t_max", "T"),
    [(3.0, 2.0, 0.03, 0.973, 1000), (1.0, 0.0, 0.1, 0.9, 10), (2.5, -1.0, 0.2, 0.5, 37)],
)
def test_ot_fm_log_snr_is_decreasing_and_matches_the_formula_at_the_ends(
    eta, kappa, t_min, t_max, T
):
    lam = ot_fm_log_snr(T, eta, kappa, t_min, t_max)
    assert lam.dtype == torch.float64 and lam.shape == (T,)
    assert torch.all(lam[1:] < lam[:-1])
    first = t_min + (1 / T) * (t_max - t_min)
    assert math.isclose(lam[0].item(), eta * math.log((1 - first) / first) + kappa, rel_tol=1e-12)
    assert math.isclose(lam[-1].item(), eta * math.log((1 - t_max) / t_max) + kappa, rel_tol=1e-12)


def test_ot_fm_default_alphas_cumprod_is_a_usable_vp_schedule():
    abar = alphas_cumprod_of(ScheduleConfig(kind="tv_snr"))
    assert abar.shape == (1000,)
    assert torch.all(abar[1:] < abar[:-1]) and 0 < abar[-1] < abar[0] < 1
    lam_end = 3 * math.log(0.027 / 0.973) + 2
    assert math.isclose(abar[-1].item(), 1 / (1 + math.exp(-lam_end)), rel_tol=1e-12)


@pytest.mark.parametrize("snr", SNR_SOURCES)
def test_non_vp_alphas_cumprod_raises(snr):
    cfg = ScheduleConfig(kind="tv_snr", snr=snr, tv_exponent=0.5)
    with pytest.raises(SpecError, match="tv_exponent = 0"):
        alphas_cumprod_of(cfg)
    with pytest.raises(SpecError, match="not variance preserving"):
        tv_snr_of(cfg).alphas_cumprod()


def test_tvsnr_vp_check_uses_the_tolerance():
    a = torch.tensor([0.6, 0.8], dtype=torch.float64)
    assert TVSNR(a=a, b=a.flip(0)).is_variance_preserving
    assert not TVSNR(a=a * (1 + 1e-8), b=a.flip(0)).is_variance_preserving


def test_schedule_that_saturates_at_one_is_rejected():
    # kappa so large that a^2 rounds to exactly 1.0 at the cleanest steps.
    with pytest.raises(SpecError, match="strictly decreasing"):
        alphas_cumprod_of(ScheduleConfig(kind="tv_snr", kappa=60.0))


def test_schedule_config_defaults():
    cfg = ScheduleConfig()
    assert (cfg.kind, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end) == (
        "linear",
        1000,
        1e-4,
        0.02,
    )
    assert (cfg.snr, cfg.eta, cfg.kappa, cfg.t_min, cfg.t_max, cfg.tv_exponent) == (
        "ot_fm",
        3.0,
        2.0,
        0.03,
        0.973,
        0.0,
    )
    with pytest.raises(AttributeError):
        cfg.kind = "tv_snr"  # type: ignore[misc]
    assert replace(cfg, kind="tv_snr").kind == "tv_snr"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "cosine"}, "kind"),
        ({"snr": "edm"}, "snr"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"num_train_timesteps": 10.0}, "num_train_timesteps"),
        ({"num_train_timesteps": True}, "num_train_timesteps"),
        ({"beta_start": 0.0}, "beta_start"),
        ({"beta_start": 0.03}, "beta_start"),
        ({"beta_end": 1.0}, "beta_end"),
        ({"beta_end": float("nan")}, "beta_end"),
        ({"beta_start": "0.1"}, "beta_start"),
        ({"t_min": 0.0}, "t_min"),
        ({"t_min": 0.98}, "t_min"),
        ({"t_max": 1.0}, "t_max"),
        ({"eta": 0.0}, "eta"),
        ({"kappa": float("inf")}, "kappa"),
        ({"tv_exponent": -0.1}, "tv_exponent"),
        ({"tv_exponent": 1.5}, "tv_exponent"),
    ],
)
def test_schedule_config_validation_names_the_field(kwargs, field):
    with pytest.raises(SpecError, match=field):
        ScheduleConfig(**kwargs)
