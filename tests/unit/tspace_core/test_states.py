"""Tests for tspace_core.states: diffusers' DDIMScheduler is the oracle for the spacings."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import tspace_core.states as states_mod
from tspace_core.errors import SpecError
from tspace_core.schedules import ScheduleConfig, alphas_cumprod_of
from tspace_core.states import (
    LatentStates,
    StatesConfig,
    UnitsConfig,
    latent_states,
    partition_units,
    select_timesteps,
)

CASES = [(1000, 10), (1000, 32), (1000, 7), (1000, 1), (1000, 1000), (10, 3), (10, 10), (999, 12)]


def _ddim_timesteps(T: int, S: int, spacing: str) -> set[int]:
    sched = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
    sched.set_timesteps(S)
    return {int(t) for t in sched.timesteps}


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize(("T", "S"), CASES)
def test_spacings_match_diffusers_ddim(spacing, T, S):
    ours = select_timesteps(T, S, spacing)
    assert len(ours) == S
    assert list(ours) == sorted(ours)
    assert set(ours) == _ddim_timesteps(T, S, spacing)


@pytest.mark.parametrize(("T", "S"), [(1000, 61), (999, 13)])
def test_trailing_never_emits_diffusers_spurious_minus_one(T, S):
    # diffusers' arange(T, 0, -T/S) gives S+1 values for these, the last being -1.
    diffusers_set = _ddim_timesteps(T, S, "trailing")
    assert len(diffusers_set) == S + 1 and -1 in diffusers_set
    assert set(select_timesteps(T, S, "trailing")) == diffusers_set - {-1}


def test_trailing_examples_from_the_methods():
    assert select_timesteps(1000, 10, "trailing") == tuple(range(99, 1000, 100))
    assert select_timesteps(1000, 32, "trailing")[:2] == (30, 61)
    assert select_timesteps(1000, 32, "trailing")[-1] == 999
    assert select_timesteps(1024, 32, "trailing") == tuple(range(31, 1024, 32))


def test_explicit_indices_are_sorted():
    assert select_timesteps(100, 3, "explicit", (50, 7, 99)) == (7, 50, 99)
    assert select_timesteps(100, None, "explicit", [0]) == (0,)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((100, 0, "trailing"), "count"),
        ((100, -1, "leading"), "count"),
        ((100, None, "linspace"), "count"),
        ((100, 101, "trailing"), "more than the 100 base steps"),
        ((100, 2, "uniform"), "spacing"),
        ((100, 2, "trailing", (1, 2)), "only allowed"),
        ((100, None, "explicit"), "needs indices"),
        ((100, None, "explicit", ()), "empty"),
        ((100, 2, "explicit", (5, 5)), r"distinct.*\[5\]"),
        ((100, 2, "explicit", (-1, 5)), r"\[-1\] are outside"),
        ((100, 2, "explicit", (5, 100)), r"\[100\] are outside"),
        ((100, 3, "explicit", (5, 6)), "count=3 but indices has 2"),
        ((100, None, "explicit", (5, 6.0)), "integer"),
    ],
)
def test_select_timesteps_errors(args, match):
    with pytest.raises(SpecError, match=match):
        select_timesteps(*args)


def test_duplicates_from_rounding_are_reported(monkeypatch):
    # No T <= 400 makes the three spacings collide; the guard still must catch it if one ever does.
    monkeypatch.setattr(states_mod, "_computed_timesteps", lambda T, S, sp: np.array([3, 3, 9]))
    with pytest.raises(SpecError, match="distinct"):
        select_timesteps(10, 3, "linspace")


def test_states_config_defaults_and_rules():
    cfg = StatesConfig()
    assert (cfg.num_states, cfg.spacing, cfg.indices, cfg.mapping) == (10, "trailing", None, "base")
    assert cfg.num_states == 10
    explicit = StatesConfig(count=None, spacing="explicit", indices=[9, 3])  # type: ignore[arg-type]
    assert explicit.indices == (9, 3) and explicit.num_states == 2
    assert StatesConfig(count=2, spacing="explicit", indices=(9, 3)).num_states == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"count": 0}, "count"),
        ({"count": -3}, "count"),
        ({"count": True}, "count"),
        ({"spacing": "uniform"}, "spacing"),
        ({"mapping": "fresh"}, "mapping"),
        ({"indices": (1, 2)}, "indices"),
        ({"spacing": "explicit"}, "indices"),
        ({"spacing": "explicit", "count": 3, "indices": (1, 2)}, "count=3 but indices has 2"),
        ({"spacing": "explicit", "count": None, "indices": "12"}, "indices"),
    ],
)
def test_states_config_validation(kwargs, match):
    with pytest.raises(SpecError, match=match):
        StatesConfig(**kwargs)


def _diffusers_abar(T: int, name: str = "linear") -> np.ndarray:
    return DDIMScheduler(num_train_timesteps=T, beta_schedule=name).alphas_cumprod.double().numpy()


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
def test_base_mapping_keeps_the_base_alpha_bar(name):
    states = latent_states(ScheduleConfig(kind=name), StatesConfig(count=10))
    assert states.timesteps == tuple(range(99, 1000, 100))
    expected = _diffusers_abar(1000, name)[list(states.timesteps)]
    np.testing.assert_allclose(states.alphas_cumprod, expected, rtol=0, atol=1e-7)


def test_base_mapping_on_a_tv_snr_schedule():
    schedule = ScheduleConfig(kind="tv_snr")
    states = latent_states(schedule, StatesConfig(count=5, spacing="linspace"))
    full = alphas_cumprod_of(schedule)
    assert states.alphas_cumprod == tuple(full[list(states.timesteps)].tolist())


def test_naive_mapping_is_a_fresh_short_schedule():
    base = latent_states(ScheduleConfig(), StatesConfig(count=10))
    naive = latent_states(ScheduleConfig(), StatesConfig(count=10, mapping="naive"))
    assert naive.timesteps == base.timesteps  # the models still receive base indices
    np.testing.assert_allclose(naive.alphas_cumprod, _diffusers_abar(10), rtol=0, atol=1e-7)
    assert np.max(np.abs(np.array(naive.alphas_cumprod) - np.array(base.alphas_cumprod))) > 0.1


def test_naive_mapping_needs_two_states():
    with pytest.raises(SpecError, match="naive"):
        latent_states(ScheduleConfig(), StatesConfig(count=1, mapping="naive"))


def _states(ts: tuple[int, ...]) -> LatentStates:
    abar = torch.linspace(0.99, 0.01, len(ts), dtype=torch.float64)
    return LatentStates(timesteps=ts, alphas_cumprod=tuple(abar.tolist()))


def test_latent_states_helpers():
    states = latent_states(ScheduleConfig(), StatesConfig(count=10))
    assert len(states) == 10
    full = alphas_cumprod_of(ScheduleConfig())
    assert states.alpha_bar(499) == full[499].item()
    with pytest.raises(SpecError, match="not a latent state"):
        states.alpha_bar(500)


def test_latent_states_from_lists_become_tuples():
    states = LatentStates(timesteps=[3, 8], alphas_cumprod=[0.9, 0.2])  # type: ignore[arg-type]
    assert states == LatentStates(timesteps=(3, 8), alphas_cumprod=(0.9, 0.2))
    assert hash(states) == hash(LatentStates(timesteps=(3, 8), alphas_cumprod=(0.9, 0.2)))


@pytest.mark.parametrize(("S", "k"), [(10, 10), (10, 1), (10, 5), (10, 3), (32, 7), (7, 6)])
def test_subset_is_even_and_keeps_the_noisiest(S, k):
    states = _states(tuple(range(5, 5 + 3 * S, 3)))
    sub = states.subset(k)
    assert len(sub) == k
    assert sub.timesteps[-1] == states.timesteps[-1]
    assert set(sub.timesteps) <= set(states.timesteps)
    assert all(sub.alpha_bar(t) == states.alpha_bar(t) for t in sub.timesteps)
    positions = [states.timesteps.index(t) for t in sub.timesteps]
    gaps = np.diff([-1, *positions])
    assert gaps.max() - gaps.min() <= 1  # as even as integer positions allow


def test_subset_matches_trailing_on_state_positions():
    states = _states(tuple(range(100)))
    assert states.subset(10).timesteps == select_timesteps(100, 10, "trailing")


@pytest.mark.parametrize("k", [0, 11, -1, 2.0, True])
def test_subset_rejects_bad_k(k):
    with pytest.raises(SpecError, match="k"):
        _states(tuple(range(10))).subset(k)


@pytest.mark.parametrize(
    ("ts", "abar", "match"),
    [
        ((), (), "at least one"),
        ((1, 2), (0.9,), "one alpha-bar"),
        ((2, 1), (0.9, 0.5), "ascending"),
        ((1, 2), (0.5, 0.9), "decreasing"),
        ((1, 2), (1.0, 0.5), "decreasing"),
    ],
)
def test_latent_states_validation(ts, abar, match):
    with pytest.raises(SpecError, match=match):
        LatentStates(timesteps=ts, alphas_cumprod=abar)


TS = (9, 19, 29, 39, 49, 59, 69)


def test_single_and_joint_partitions():
    assert partition_units(TS, UnitsConfig()) == tuple((t,) for t in TS)
    assert partition_units(TS[::-1], UnitsConfig(partition="joint")) == (TS,)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 7])
def test_stages_are_contiguous_cover_and_as_equal_as_possible(K):
    units = partition_units(TS, UnitsConfig(partition=f"stages:{K}"))
    assert len(units) == K
    assert tuple(t for unit in units for t in unit) == TS  # contiguous, ordered, covering
    sizes = [len(unit) for unit in units]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_explicit_partition_is_ordered_cleanest_first():
    cfg = UnitsConfig(partition="explicit", groups=[[69, 49], [9], [59, 19, 29, 39]])  # type: ignore[arg-type]
    assert cfg.groups == ((69, 49), (9,), (59, 19, 29, 39))
    assert partition_units(TS, cfg) == ((9,), (19, 29, 39, 59), (49, 69))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"partition": "stages"}, "partition must be"),
        ({"partition": "stages:x"}, "partition must be"),
        ({"partition": "stages:2.5"}, "partition must be"),
        ({"partition": "stages:0"}, "K >= 1"),
        ({"partition": "stages:-2"}, "K >= 1"),
        ({"partition": "pairs"}, "partition must be"),
        ({"partition": 3}, "partition must be"),
        ({"partition": "explicit"}, "needs groups"),
        ({"partition": "joint", "groups": ((1,),)}, "only allowed"),
        ({"partition": "explicit", "groups": ()}, "non-empty"),
        ({"partition": "explicit", "groups": ((1,), ())}, r"groups\[1\] is an empty unit"),
        ({"partition": "explicit", "groups": ((1, "2"),)}, "integer"),
    ],
)
def test_units_config_validation(kwargs, match):
    with pytest.raises(SpecError, match=match):
        UnitsConfig(**kwargs)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (UnitsConfig(partition="stages:8"), "only 7 latent states"),
        (
            UnitsConfig(partition="explicit", groups=((9, 19, 29), (39, 49, 59))),
            r"\[69\] are in no unit",
        ),
        (
            UnitsConfig(partition="explicit", groups=((9, 19, 29, 39), (39, 49, 59, 69))),
            "two units",
        ),
        (UnitsConfig(partition="explicit", groups=((9, 9, 19, 29, 39, 49, 59, 69),)), "twice"),
        (
            UnitsConfig(partition="explicit", groups=((9, 19, 29, 39, 49, 59, 69, 70),)),
            "70.*not a latent",
        ),
    ],
)
def test_partition_units_errors(cfg, match):
    with pytest.raises(SpecError, match=match):
        partition_units(TS, cfg)


def test_partition_units_rejects_duplicate_timesteps():
    with pytest.raises(SpecError, match="distinct"):
        partition_units((1, 1, 2), UnitsConfig())


def test_count_left_out_means_ten_or_as_many_as_indices():
    assert StatesConfig().num_states == 10
    assert StatesConfig(spacing="explicit", indices=(5, 50, 500)).num_states == 3
