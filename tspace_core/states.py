"""Latent states picked from the base schedule and their partition into units (arXiv 2508.14413)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Literal

import numpy as np

from tspace_core.errors import SpecError
from tspace_core.schedules import ScheduleConfig, alphas_cumprod_of

Spacing = Literal["trailing", "leading", "linspace", "explicit"]
Mapping = Literal["base", "naive"]

DEFAULT_COUNT = 10
SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace", "explicit")
MAPPINGS: tuple[str, ...] = ("base", "naive")
PARTITIONS = 'one of "single", "joint", "stages:K" (K an integer >= 1) or "explicit"'
_STAGES = re.compile(r"stages:([+-]?\d+)")


def _as_index_tuple(field: str, values: object) -> tuple[int, ...]:
    # Configs may arrive from JSON as lists; keep them as tuples so configs stay hashable.
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise SpecError(f"{field} must be a sequence of integer base indices, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise SpecError(f"{field} must hold integer base indices, got {v!r} in {values!r}")
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class StatesConfig:
    """Which S of the T base steps become latent states, and which alpha-bar they carry.

    count: S, the number of states (>= 1, at most T). Left out (None) it is 10, or
        len(indices) with spacing="explicit", where a given count must equal len(indices).
    spacing: "trailing" (diffusers' trailing: T=1000, S=10 gives 99, 199, ..., 999),
        "leading" (i * (T // S), diffusers' leading without steps_offset), "linspace"
        (round(linspace(0, T-1, S))) or "explicit" (the given indices).
    indices: the base indices for spacing="explicit" (required then, forbidden otherwise);
        any order, stored as given, used sorted.
    mapping: "base" keeps the base schedule's alpha-bar at each state (the method);
        "naive" gives the states a freshly computed S-step schedule (the paper's failure
        case, kept as an ablation).
    """

    count: int | None = None
    spacing: Spacing = "trailing"
    indices: tuple[int, ...] | None = None
    mapping: Mapping = "base"

    def __post_init__(self) -> None:
        if self.spacing not in SPACINGS:
            raise SpecError(f"spacing must be one of {', '.join(SPACINGS)}; got {self.spacing!r}")
        if self.mapping not in MAPPINGS:
            raise SpecError(f"mapping must be one of {', '.join(MAPPINGS)}; got {self.mapping!r}")
        if self.spacing == "explicit":
            if self.indices is None:
                raise SpecError('spacing="explicit" needs indices: the base indices of the states')
            object.__setattr__(self, "indices", _as_index_tuple("indices", self.indices))
        elif self.indices is not None:
            raise SpecError(
                f'indices are only allowed with spacing="explicit" (spacing is {self.spacing!r}); '
                'drop indices or set spacing="explicit"'
            )
        _check_count(self.count, self.indices)

    @property
    def num_states(self) -> int:
        """S, resolved: count, or len(indices) when count is None."""
        if self.count is not None:
            return self.count
        return len(self.indices) if self.indices is not None else DEFAULT_COUNT


def _check_count(count: object, indices: tuple[int, ...] | None) -> None:
    if count is None:
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SpecError(
            f"count (the number of latent states S) must be an integer >= 1, got {count!r}"
        )
    if indices is not None and count != len(indices):
        raise SpecError(
            f"count={count} but indices has {len(indices)} entries; "
            f"set count = {len(indices)} or leave count out"
        )


def _computed_timesteps(T: int, S: int, spacing: str) -> np.ndarray:
    if spacing == "trailing":
        # diffusers' round(arange(T, 0, -T/S)) - 1, written so it always yields exactly S values
        # (diffusers' arange sometimes adds a spurious -1, e.g. T=1000, S=61).
        return np.round(T - np.arange(S) * (T / S)).astype(np.int64) - 1
    if spacing == "leading":
        return np.arange(S, dtype=np.int64) * (T // S)
    return np.round(np.linspace(0, T - 1, S)).astype(np.int64)


def select_timesteps(
    num_train_timesteps: int,
    count: int | None,
    spacing: str,
    indices: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """The latent states' base indices in ascending order (count=None only with explicit)."""
    T = num_train_timesteps
    if spacing not in SPACINGS:
        raise SpecError(f"spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")
    if spacing == "explicit":
        if indices is None:
            raise SpecError('spacing="explicit" needs indices: the base indices of the states')
        chosen = _as_index_tuple("indices", indices)
        if not chosen:
            raise SpecError("indices is empty: give at least one base index")
        _check_count(count, chosen)
    else:
        if indices is not None:
            raise SpecError(f'indices are only allowed with spacing="explicit", not {spacing!r}')
        if count is None:
            raise SpecError("count (the number of latent states S) must be an integer >= 1")
        _check_count(count, None)
        if count > T:
            raise SpecError(
                f"count={count} latent states is more than the {T} base steps; use count <= {T}"
            )
        chosen = tuple(int(t) for t in _computed_timesteps(T, count, spacing))
    outside = sorted({t for t in chosen if not 0 <= t < T})
    if outside:
        raise SpecError(f"indices {outside} are outside the base steps [0, {T}); use 0..{T - 1}")
    if len(set(chosen)) != len(chosen):
        repeated = sorted({t for t in chosen if chosen.count(t) > 1})
        raise SpecError(
            f"latent states must be distinct, but {repeated} appear more than once "
            f"(spacing={spacing!r}, count={count}, T={T}); choose other indices or count"
        )
    return tuple(sorted(chosen))


@dataclass(frozen=True)
class LatentStates:
    """The chosen states: base indices and the alpha-bar each one is trained and sampled with.

    timesteps: strictly ascending base indices (what the models receive as t).
    alphas_cumprod: alpha-bar at each state, same order, so strictly decreasing in (0, 1).
    """

    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]

    def __post_init__(self) -> None:
        # Lists from a JSON manifest become tuples, so states compare equal and stay hashable.
        ts = _as_index_tuple("timesteps", self.timesteps)
        abar = tuple(float(a) for a in self.alphas_cumprod)
        object.__setattr__(self, "timesteps", ts)
        object.__setattr__(self, "alphas_cumprod", abar)
        if not ts or len(ts) != len(abar):
            raise SpecError(
                f"LatentStates needs one alpha-bar per timestep and at least one state; "
                f"got {len(ts)} timesteps and {len(abar)} alphas_cumprod"
            )
        if any(b <= a for a, b in pairwise(ts)):
            raise SpecError(f"timesteps must be strictly ascending, got {ts}")
        if not all(0.0 < a < 1.0 for a in abar) or any(b >= a for a, b in pairwise(abar)):
            raise SpecError(f"alphas_cumprod must be strictly decreasing inside (0, 1), got {abar}")

    def __len__(self) -> int:
        return len(self.timesteps)

    def alpha_bar(self, t: int) -> float:
        """alpha-bar of the state at base index t."""
        try:
            return self.alphas_cumprod[self.timesteps.index(t)]
        except ValueError:
            raise SpecError(
                f"{t!r} is not a latent state; the states are {self.timesteps}"
            ) from None

    def subset(self, k: int) -> LatentStates:
        """k states spread evenly over these (trailing: the noisiest is kept), for fewer steps."""
        S = len(self)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= S:
            raise SpecError(f"k (sampling steps) must be an integer in 1..{S}, got {k!r}")
        positions = sorted(_computed_timesteps(S, k, "trailing").tolist())
        return LatentStates(
            timesteps=tuple(self.timesteps[p] for p in positions),
            alphas_cumprod=tuple(self.alphas_cumprod[p] for p in positions),
        )


def latent_states(schedule: ScheduleConfig, cfg: StatesConfig) -> LatentStates:
    """The latent states of `cfg` on `schedule`, with base or (ablation) naive alpha-bar."""
    timesteps = select_timesteps(
        schedule.num_train_timesteps, cfg.num_states, cfg.spacing, cfg.indices
    )
    if cfg.mapping == "base":
        # The method: each state keeps the base schedule's alpha-bar (arXiv 2508.14413, §1).
        abar = alphas_cumprod_of(schedule)[list(timesteps)]
    else:
        S = len(timesteps)
        if S < 2:
            raise SpecError(
                'mapping="naive" needs at least 2 states (an S-step schedule); use count >= 2'
            )
        # The failure case: a fresh S-step schedule, its k-th value on the k-th chosen state.
        abar = alphas_cumprod_of(replace(schedule, num_train_timesteps=S))
    return LatentStates(timesteps=timesteps, alphas_cumprod=tuple(float(a) for a in abar))


@dataclass(frozen=True)
class UnitsConfig:
    """How the latent states are grouped into units, each trained by one independent model.

    partition: "single" (one state per unit: complete disentanglement), "joint" (all states
        in one unit: a single model), "stages:K" (K contiguous groups as equal as possible,
        the cleaner groups one state larger when S is not a multiple of K) or "explicit".
    groups: for partition="explicit" (required then, forbidden otherwise): the units as
        tuples of base indices; together they must hold every latent state exactly once.
    """

    partition: str = "single"
    groups: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.partition, str) or (
            self.partition not in ("single", "joint", "explicit") and self.stages is None
        ):
            raise SpecError(f"partition must be {PARTITIONS}; got {self.partition!r}")
        if self.partition == "explicit":
            if self.groups is None:
                raise SpecError(
                    'partition="explicit" needs groups: a tuple of units of base indices'
                )
            object.__setattr__(self, "groups", _as_groups(self.groups))
        elif self.groups is not None:
            raise SpecError(
                f'groups are only allowed with partition="explicit" (partition is '
                f'{self.partition!r}); drop groups or set partition="explicit"'
            )

    @property
    def stages(self) -> int | None:
        """K for partition="stages:K", else None; raises SpecError for K < 1."""
        match = _STAGES.fullmatch(self.partition)
        if match is None:
            return None
        K = int(match.group(1))
        if K < 1:
            raise SpecError(f'partition "stages:K" needs K >= 1, got {self.partition!r}')
        return K


def _as_groups(groups: object) -> tuple[tuple[int, ...], ...]:
    if not isinstance(groups, Sequence) or isinstance(groups, str) or not groups:
        raise SpecError(f"groups must be a non-empty sequence of units, got {groups!r}")
    units = tuple(_as_index_tuple("groups", g) for g in groups)
    for i, unit in enumerate(units):
        if not unit:
            raise SpecError(f"groups[{i}] is an empty unit; every unit needs at least one state")
    return units


def partition_units(timesteps: Sequence[int], cfg: UnitsConfig) -> tuple[tuple[int, ...], ...]:
    """Units of base indices, cleanest unit first, each unit's states ascending."""
    ts = tuple(sorted(_as_index_tuple("timesteps", timesteps)))
    if not ts or len(set(ts)) != len(ts):
        raise SpecError(f"timesteps must be a non-empty set of distinct indices, got {timesteps}")
    if cfg.partition == "single":
        return tuple((t,) for t in ts)
    if cfg.partition == "joint":
        return (ts,)
    if cfg.partition == "explicit":
        assert cfg.groups is not None  # UnitsConfig requires groups for explicit
        return _explicit_units(ts, cfg.groups)
    num_units = cfg.stages
    assert num_units is not None  # UnitsConfig accepts no other partition
    if num_units > len(ts):
        raise SpecError(
            f"partition {cfg.partition!r} asks for {num_units} units but there are only {len(ts)} "
            f"latent states; use K <= {len(ts)}"
        )
    return tuple(tuple(int(t) for t in part) for part in np.array_split(np.array(ts), num_units))


def _explicit_units(
    ts: tuple[int, ...], groups: tuple[tuple[int, ...], ...]
) -> tuple[tuple[int, ...], ...]:
    states = set(ts)
    seen: dict[int, int] = {}
    for i, unit in enumerate(groups):
        for t in unit:
            if t not in states:
                raise SpecError(f"groups[{i}] has {t}, which is not a latent state; states: {ts}")
            if t in seen and seen[t] == i:
                raise SpecError(f"state {t} appears twice in groups[{i}]; list it once")
            if t in seen:
                raise SpecError(f"state {t} is in two units (groups[{seen[t]}] and groups[{i}])")
            seen[t] = i
    missing = sorted(states - seen.keys())
    if missing:
        raise SpecError(f"states {missing} are in no unit; every latent state needs a unit")
    units = [tuple(sorted(unit)) for unit in groups]
    return tuple(sorted(units, key=lambda unit: unit[0]))
