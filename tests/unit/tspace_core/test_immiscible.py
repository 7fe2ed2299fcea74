"""Tests for tspace_core.immiscible: noise assignment against scipy and analytic properties."""

import itertools

import numpy as np
import pytest
import scipy.optimize
import torch

from tspace_core.errors import SpecError
from tspace_core.immiscible import ASSIGNMENTS, assign_noise


def _batch(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Images in [-1, 1] like the training data, noise standard normal.
    return torch.rand(shape, generator=g) * 2 - 1, torch.randn(shape, generator=g)


def _pair_cost(x0: torch.Tensor, eps: torch.Tensor) -> float:
    return float((x0 - eps).flatten(1).double().norm(dim=1).sum())


def _row_indices(rows: torch.Tensor, pool: torch.Tensor) -> list[int]:
    """For each row of `rows`, the index of the identical row in `pool` (asserts there is one)."""
    found = []
    for row in rows:
        hits = [j for j in range(pool.shape[0]) if torch.equal(row, pool[j])]
        assert len(hits) == 1
        found.append(hits[0])
    return found


def test_none_returns_noise_unchanged() -> None:
    x0, noise = _batch(0, (5, 1, 4, 4))
    assert assign_noise(x0, noise, "none") is noise


@pytest.mark.parametrize("seed", range(5))
def test_assignment_is_a_permutation_of_the_noise_rows(seed: int) -> None:
    x0, noise = _batch(seed, (16, 3, 8, 8))
    out = assign_noise(x0, noise, "assignment")
    assert out.shape == noise.shape and out.dtype == noise.dtype
    assert sorted(_row_indices(out, noise)) == list(range(16))


@pytest.mark.parametrize("seed", range(8))
def test_assignment_never_costs_more_than_the_identity_pairing(seed: int) -> None:
    x0, noise = _batch(100 + seed, (32, 1, 8, 8))
    out = assign_noise(x0, noise, "assignment")
    assert _pair_cost(x0, out) <= _pair_cost(x0, noise) + 1e-9


def test_assignment_reaches_the_optimum_found_by_brute_force() -> None:
    # 6! = 720 pairings: small enough to enumerate, an oracle independent of scipy.
    x0, noise = _batch(7, (6, 1, 3, 3))
    d = torch.cdist(x0.flatten(1).double(), noise.flatten(1).double())
    best = min(sum(float(d[i, p[i]]) for i in range(6)) for p in itertools.permutations(range(6)))
    assert _pair_cost(x0, assign_noise(x0, noise, "assignment")) == pytest.approx(best, rel=1e-6)


def test_assignment_matches_scipy_on_a_float64_matrix() -> None:
    x0, noise = _batch(11, (12, 3, 4, 4))
    d = np.linalg.norm(x0.flatten(1).numpy()[:, None] - noise.flatten(1).numpy()[None], axis=-1)
    rows, cols = scipy.optimize.linear_sum_assignment(d.astype(np.float64))
    out = assign_noise(x0, noise, "assignment")
    assert _pair_cost(x0, out) == pytest.approx(float(d[rows, cols].sum()), rel=1e-6)


def test_assignment_keeps_dtype_and_does_not_track_gradients() -> None:
    x0, noise = _batch(3, (8, 3, 4, 4))
    out = assign_noise(x0.double(), noise.double().requires_grad_(), "assignment")
    assert out.dtype == torch.float64 and not out.requires_grad


def test_assignment_pairs_each_image_with_its_own_nearby_noise() -> None:
    # Noise built as tiny perturbations of shuffled images: the optimum undoes the shuffle.
    x0, _ = _batch(5, (10, 1, 4, 4))
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    noise = x0[perm] + 1e-3
    out = assign_noise(x0, noise, "assignment")
    torch.testing.assert_close(out, x0 + 1e-3)


@pytest.mark.parametrize("k", [2, 4, 16])
def test_knn_rows_are_no_farther_than_the_first_candidate(k: int) -> None:
    x0, noise = _batch(21, (32, 3, 8, 8))
    out = assign_noise(x0, noise, "knn", k=k, generator=torch.Generator().manual_seed(1))
    chosen = (x0 - out).flatten(1).norm(dim=1)
    first = (x0 - noise).flatten(1).norm(dim=1)
    assert bool((chosen <= first).all())
    assert bool((chosen < first).any())  # with k >= 2 some image finds closer noise


def test_knn_picks_the_nearest_of_exactly_the_candidates_drawn() -> None:
    x0, noise = _batch(22, (6, 1, 4, 4))
    k = 5
    out = assign_noise(x0, noise, "knn", k=k, generator=torch.Generator().manual_seed(9))
    fresh = torch.randn((k - 1, *x0.shape), generator=torch.Generator().manual_seed(9))
    candidates = torch.cat([noise[None], fresh])
    for i in range(6):
        distances = [float((x0[i] - candidates[c, i]).norm()) for c in range(k)]
        assert torch.equal(out[i], candidates[int(np.argmin(distances)), i])


def test_knn_with_k_one_returns_the_noise() -> None:
    x0, noise = _batch(2, (4, 1, 4, 4))
    assert torch.equal(assign_noise(x0, noise, "knn", k=1), noise)


def test_knn_is_deterministic_given_the_generator_and_varies_with_it() -> None:
    x0, noise = _batch(23, (16, 3, 8, 8))

    def run(seed: int) -> torch.Tensor:
        return assign_noise(x0, noise, "knn", k=4, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


@pytest.mark.parametrize("method", ASSIGNMENTS)
@pytest.mark.parametrize("shape", [(8, 1, 8, 8), (8, 3, 8, 8), (1, 3, 4, 4)])
def test_shapes_are_kept_for_one_and_three_channels(method: str, shape: tuple[int, ...]) -> None:
    x0, noise = _batch(4, shape)
    out = assign_noise(x0, noise, method, k=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == shape and out.dtype == x0.dtype


@pytest.mark.parametrize("method", ["hungarian", "", "KNN"])
def test_unknown_method_is_a_spec_error(method: str) -> None:
    x0, noise = _batch(0, (2, 1, 2, 2))
    with pytest.raises(SpecError, match="assignment"):
        assign_noise(x0, noise, method)


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one_is_a_spec_error(k: int) -> None:
    x0, noise = _batch(0, (2, 1, 2, 2))
    with pytest.raises(SpecError, match="k"):
        assign_noise(x0, noise, "knn", k=k)
