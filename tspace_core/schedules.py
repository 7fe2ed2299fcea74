"""Base noise schedules (diffusers-exact alphas_cumprod) and TV/SNR schedules (arXiv 2502.08598)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from tspace_core.errors import SpecError

BaseSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
ScheduleKind = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "tv_snr"]
SnrSource = Literal["ot_fm", "linear", "scaled_linear", "squaredcos_cap_v2"]

BASE_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
SCHEDULE_KINDS: tuple[str, ...] = (*BASE_SCHEDULES, "tv_snr")
SNR_SOURCES: tuple[str, ...] = ("ot_fm", *BASE_SCHEDULES)

# Largest |a^2 + b^2 - 1| still called variance preserving; float64 rounding is ~1e-16.
VP_TOLERANCE = 1e-9
# Far beyond any schedule in use; keeps a typo from allocating gigabytes.
MAX_TIMESTEPS = 100_000


def _cosine_alpha_bar(t: float) -> float:
    # Improved DDPM (Nichol & Dhariwal 2021) eq. 17, with s = 0.008, as diffusers writes it.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    # beta_i = min(1 - abar(t_{i+1}) / abar(t_i), max_beta), in Python floats like diffusers.
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - _cosine_alpha_bar(t2) / _cosine_alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def betas_for(
    name: str, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """The float32 betas diffusers' DDPMScheduler/DDIMScheduler build for `beta_schedule=name`."""
    if name == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if name == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta).
        start, end = beta_start**0.5, beta_end**0.5
        return torch.linspace(start, end, num_train_timesteps, dtype=torch.float32) ** 2
    if name == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(num_train_timesteps)
    raise SpecError(f"unknown base schedule {name!r}: choose one of {', '.join(BASE_SCHEDULES)}")


def base_alphas_cumprod(
    name: str, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """alphas_cumprod of a named schedule: cumprod in float32 as diffusers does, then float64."""
    betas = betas_for(name, num_train_timesteps, beta_start, beta_end)
    # abar_t = prod_{s<=t} (1 - beta_s) (DDPM, Ho et al. 2020, eq. 4); float32 on purpose.
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


def base_log_snr(
    name: str, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """log gamma = log(abar / (1 - abar)) of a named schedule, float64, shape (T,)."""
    abar = base_alphas_cumprod(name, num_train_timesteps, beta_start, beta_end)
    return torch.log(abar) - torch.log1p(-abar)


def ot_fm_log_snr(
    num_train_timesteps: int,
    eta: float = 3.0,
    kappa: float = 2.0,
    t_min: float = 0.03,
    t_max: float = 0.973,
) -> torch.Tensor:
    """Generalised OT-FM log-SNR on the grid t_i = (i+1)/T, float64, shape (T,)."""
    t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    t_prime = t_min + t * (t_max - t_min)
    # log gamma(t') = eta * log((1 - t') / t') + kappa (arXiv 2502.08598, inverse-sigmoid SNR).
    return eta * (torch.log1p(-t_prime) - torch.log(t_prime)) + kappa


def tv_snr_from_log_snr(log_snr: torch.Tensor, tv_exponent: float = 0.0) -> TVSNR:
    """a, b from a log-SNR and the TV family tv^2 = (1 + 1/gamma)^c; c=0 is VP, c=1 has a == 1."""
    lam = log_snr.to(torch.float64)
    log_sig = torch.nn.functional.logsigmoid(lam)  # log(gamma / (1 + gamma))
    log_sig_neg = torch.nn.functional.logsigmoid(-lam)  # log(1 / (1 + gamma))
    # a^2 = tv^2 gamma/(1+gamma), b^2 = tv^2/(1+gamma), log tv^2 = -c log(gamma/(1+gamma));
    # in log space so that gamma -> 0 or infinity stays finite where the answer is.
    log_a2 = (1.0 - tv_exponent) * log_sig
    log_b2 = log_sig_neg - tv_exponent * log_sig
    return TVSNR(a=torch.exp(0.5 * log_a2), b=torch.exp(0.5 * log_b2))


@dataclass(frozen=True)
class TVSNR:
    """A forward process x_t = a(t) x0 + b(t) eps on the T base steps (arXiv 2502.08598).

    a, b: float64 tensors of shape (T,), index T-1 the noisiest.
    """

    a: torch.Tensor
    b: torch.Tensor

    @property
    def gamma(self) -> torch.Tensor:
        """SNR gamma = a^2 / b^2."""
        return self.a**2 / self.b**2

    @property
    def tv2(self) -> torch.Tensor:
        """Total variance tv^2 = a^2 + b^2."""
        return self.a**2 + self.b**2

    @property
    def is_variance_preserving(self) -> bool:
        """Whether a^2 + b^2 == 1 at every step (to VP_TOLERANCE)."""
        return bool(torch.all(torch.abs(self.tv2 - 1.0) <= VP_TOLERANCE))

    def alphas_cumprod(self) -> torch.Tensor:
        """abar = a^2, defined only for a variance-preserving process."""
        if not self.is_variance_preserving:
            worst = float(torch.max(torch.abs(self.tv2 - 1.0)))
            raise SpecError(
                "this TV/SNR schedule is not variance preserving (max |a^2 + b^2 - 1| = "
                f"{worst:.3g}), so it has no alphas_cumprod: training and sampling need "
                "tv_exponent = 0 (constant total variance)"
            )
        return self.a**2


@dataclass(frozen=True)
class ScheduleConfig:
    """The base noise schedule of T steps that every latent state indexes into.

    kind: "linear", "scaled_linear" or "squaredcos_cap_v2" (as in diffusers), or "tv_snr"
        (an SNR schedule combined with a total-variance schedule, arXiv 2502.08598).
    num_train_timesteps: T, the number of base steps (2..MAX_TIMESTEPS).
    beta_start, beta_end: beta range of "linear" and "scaled_linear" (0 < start < end < 1);
        also used by kind="tv_snr" when snr names one of those schedules.
    snr: for kind="tv_snr", the SNR source: "ot_fm" (generalised OT flow matching) or a
        named base schedule (its gamma = abar / (1 - abar)).
    eta, kappa, t_min, t_max: the OT-FM log-SNR eta * log((1-t')/t') + kappa with
        t' = t_min + t (t_max - t_min); eta > 0 and 0 < t_min < t_max < 1.
    tv_exponent: c in tv^2 = (1 + 1/gamma)^c, 0 <= c <= 1. c = 0 is constant TV (variance
        preserving, the only value training and sampling accept); c = 1 is variance
        exploding (a == 1). The paper names both ends; the interpolating family is ours.
    """

    kind: ScheduleKind = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    snr: SnrSource = "ot_fm"
    eta: float = 3.0
    kappa: float = 2.0
    t_min: float = 0.03
    t_max: float = 0.973
    tv_exponent: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, SCHEDULE_KINDS)
        _check_choice("snr", self.snr, SNR_SOURCES)
        T = self.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or not 2 <= T <= MAX_TIMESTEPS:
            raise SpecError(
                f"num_train_timesteps must be an integer in 2..{MAX_TIMESTEPS}, got {T!r}"
            )
        for name in ("beta_start", "beta_end", "eta", "kappa", "t_min", "t_max", "tv_exponent"):
            _check_real(name, getattr(self, name))
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise SpecError(
                "beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1, got "
                f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r}"
            )
        if not 0.0 < self.t_min < self.t_max < 1.0:
            raise SpecError(
                "t_min and t_max must satisfy 0 < t_min < t_max < 1, got "
                f"t_min={self.t_min!r}, t_max={self.t_max!r}"
            )
        if not self.eta > 0.0:
            raise SpecError(f"eta must be > 0 (so the SNR falls with t), got {self.eta!r}")
        if not 0.0 <= self.tv_exponent <= 1.0:
            raise SpecError(
                f"tv_exponent must be in [0, 1] (0 = constant TV, 1 = variance exploding), "
                f"got {self.tv_exponent!r}"
            )


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpecError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")


def _check_real(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(f"{field} must be a finite number, got {value!r}")


def tv_snr_of(cfg: ScheduleConfig) -> TVSNR:
    """The (a, b) pair of any schedule; a named kind gives a = sqrt(abar), b = sqrt(1 - abar)."""
    T = cfg.num_train_timesteps
    if cfg.kind != "tv_snr":
        abar = base_alphas_cumprod(cfg.kind, T, cfg.beta_start, cfg.beta_end)
        return TVSNR(a=torch.sqrt(abar), b=torch.sqrt(1.0 - abar))
    if cfg.snr == "ot_fm":
        log_snr = ot_fm_log_snr(T, cfg.eta, cfg.kappa, cfg.t_min, cfg.t_max)
    else:
        log_snr = base_log_snr(cfg.snr, T, cfg.beta_start, cfg.beta_end)
    return tv_snr_from_log_snr(log_snr, cfg.tv_exponent)


def alphas_cumprod_of(cfg: ScheduleConfig) -> torch.Tensor:
    """alphas_cumprod (float64, shape (T,)) of any schedule: the entry point the rest uses."""
    if cfg.kind in BASE_SCHEDULES:
        abar = base_alphas_cumprod(cfg.kind, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
    else:
        abar = tv_snr_of(cfg).alphas_cumprod()
    _check_usable(abar, cfg)
    return abar


def _check_usable(abar: torch.Tensor, cfg: ScheduleConfig) -> None:
    # The sampler divides by sqrt(abar) and sqrt(1 - abar), and states assume more noise
    # at higher indices, so abar of exactly 0 or 1 or a flat step is unusable.
    inside = bool(torch.all((abar > 0.0) & (abar < 1.0)))
    falling = bool(torch.all(abar[1:] < abar[:-1]))
    if not (inside and falling):
        raise SpecError(
            f"schedule {cfg.kind!r} with these parameters gives alphas_cumprod that is not "
            "strictly decreasing inside (0, 1) (values round to 0 or 1 in float precision); "
            "use fewer num_train_timesteps, a smaller beta_end, or a smaller kappa / eta"
        )
