"""The digits quality metric: classifier, Fréchet distance, precision/recall and their sanity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tspace_core.data import ImageDataset, load_digits
from tspace_core.evaluation import (
    DigitsClassifier,
    QualityReport,
    digits_classifier,
    evaluate,
    frechet_distance,
    precision_recall,
    train_classifier,
)

N = 360  # samples per evaluated set, about the held-out reference's size


@pytest.fixture(scope="module")
def clf() -> DigitsClassifier:
    return digits_classifier()


@pytest.fixture(scope="module")
def real_images(clf: DigitsClassifier) -> torch.Tensor:
    """Training-split digits: real, and disjoint from the held-out reference."""
    return load_digits().images[clf.train_index[:N]]


# ---------------------------------------------------------------------------- classifier


def test_classifier_is_deterministic_and_accurate(clf: DigitsClassifier) -> None:
    threads = torch.get_num_threads()
    again = train_classifier()
    assert torch.get_num_threads() == threads
    a, b = clf.net.state_dict(), again.net.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert clf.held_out_accuracy == again.held_out_accuracy
    assert clf.held_out_accuracy > 0.95


def test_split_is_disjoint_and_complete(clf: DigitsClassifier) -> None:
    train, held = set(clf.train_index.tolist()), set(clf.held_out_index.tolist())
    assert not train & held
    assert train | held == set(range(len(load_digits())))
    assert len(held) == round(0.2 * len(load_digits()))


# ---------------------------------------------------------------------------- Fréchet distance


def _gaussian(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    # Diagonal covariances commute: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt v1 - sqrt v2)^2.
    exact = 1.0 + 0.0 + 4.0 + (1.0 - 2.0) ** 2 + (2.0 - 1.0) ** 2 + 0.0  # = 7
    a = _gaussian(mu1, np.diag(var1), 200_000, seed=1)
    b = _gaussian(mu2, np.diag(var2), 200_000, seed=2)
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02)


def test_frechet_distance_closed_form_is_rotation_invariant() -> None:
    # Rotating both diagonal covariances by one orthogonal Q keeps them commuting and keeps the
    # distance; so full (non-diagonal) covariances still have an exact answer.
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(4, 4)))
    var1, var2 = np.array([1.0, 9.0, 0.25, 4.0]), np.array([4.0, 1.0, 1.0, 4.0])
    mu1, mu2 = np.zeros(4), q @ np.array([3.0, 0.0, 0.0, 0.0])
    exact = 9.0 + float(np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))  # 9 + 1 + 4 + 0.25 + 0
    a = _gaussian(mu1, q @ np.diag(var1) @ q.T, 200_000, seed=4)
    b = _gaussian(mu2, q @ np.diag(var2) @ q.T, 200_000, seed=5)
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02)


def test_frechet_distance_one_dimension() -> None:
    # N(0, 1) vs N(3, 4): 3^2 + (1 - 2)^2 = 10.
    rng = np.random.default_rng(6)
    a, b = rng.normal(0.0, 1.0, 200_000), rng.normal(3.0, 2.0, 200_000)
    assert frechet_distance(a, b) == pytest.approx(10.0, rel=0.02)


def test_frechet_distance_of_identical_sets_is_zero() -> None:
    a = _gaussian(np.zeros(5), np.diag([1.0, 2.0, 3.0, 4.0, 5.0]), 1000, seed=7)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Singular covariances (a constant feature, fewer samples than dimensions) stay finite.
    singular = np.concatenate([a[:20], np.zeros((20, 1))], axis=1)
    assert frechet_distance(singular, singular) == pytest.approx(0.0, abs=1e-3)
    shifted = singular + 1.0
    assert frechet_distance(singular, shifted) == pytest.approx(6.0, abs=1e-3)


def test_frechet_distance_rejects_mismatched_dimensions() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))


# ---------------------------------------------------------------------------- precision/recall


def test_precision_recall_of_identical_sets_is_one() -> None:
    a = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(a, a) == (1.0, 1.0)


def test_precision_recall_of_far_apart_clusters_is_zero() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(100, 4, generator=g)
    fake = torch.randn(100, 4, generator=g) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_hand_built_case() -> None:
    # k = 1. Real: a unit square (radius 1 each) and (10, -10), whose nearest real is (1, 0):
    # radius sqrt(181) = 13.45.
    real = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [10, -10]], dtype=float)
    # Fake: (0.5, 0.5) is 0.71 from a corner: inside. (3, 3) is 2.83 from (1, 1) and 14.8 from
    # (10, -10): outside. (1.5, 1) is 0.5 from (1, 1): inside. (-1.5, 0) is 1.5 from (0, 0) and
    # 15.2 from (10, -10): outside. Precision 2/4.
    fake = np.array([[0.5, 0.5], [3, 3], [1.5, 1], [-1.5, 0]], dtype=float)
    # Fake radii (nearest other fake): 1.118, 2.5, 1.118, 2.06. Every square corner is within
    # 0.71 of (0.5, 0.5); (10, -10) is 13.9 from (1.5, 1), the nearest fake. Recall 4/5.
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(0.5)
    assert recall == pytest.approx(0.8)
    assert precision_recall(fake, real, k=1) == (recall, precision)


def test_precision_recall_needs_more_points_than_k() -> None:
    with pytest.raises(ValueError):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


# ---------------------------------------------------------------------------- the metric


def _degrade(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """Real images with Gaussian noise of std `sigma` in [-1, 1] units, as float in [-1, 1]."""
    x = images.to(torch.float32) / 127.5 - 1.0
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x + sigma * noise).clamp(-1.0, 1.0)


def test_metric_orders_real_degraded_and_noise(real_images: torch.Tensor) -> None:
    real = evaluate(real_images)
    degraded = [evaluate(_degrade(real_images, s, seed=i)) for i, s in enumerate((0.5, 1.0, 1.5))]
    noise_images = torch.randint(
        0, 256, (N, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(9)
    )
    noise = evaluate(noise_images)
    fds = [real.fd, *(r.fd for r in degraded), noise.fd]
    assert fds == sorted(fds), fds  # monotone: real < sigma 0.5 < 1.0 < 1.5 < uniform noise
    assert real.fd < 0.05 * noise.fd, fds
    assert real.fd < degraded[0].fd / 3, fds
    assert real.precision > 0.8 and real.recall > 0.7, real
    assert noise.precision < 0.05, noise
    assert degraded[-1].precision < real.precision


def test_real_vs_real_with_explicit_reference(clf: DigitsClassifier) -> None:
    # Two disjoint halves of the held-out digits: real against real, no training images.
    held = load_digits().images[clf.held_out_index]
    reference = ImageDataset(held[1::2], None, 0, "held-out-odd")
    same = evaluate(held[::2], reference)
    noise = evaluate(_degrade(held[::2], 1.0, seed=11), reference)
    assert same.n_reference == len(held[1::2])
    assert same.fd < noise.fd / 5
    assert same.precision > 0.8 and same.recall > 0.8


def test_report_fields(clf: DigitsClassifier, real_images: torch.Tensor) -> None:
    report = evaluate(real_images)
    assert isinstance(report, QualityReport)
    assert report.n == N and report.n_reference == len(clf.held_out_index)
    assert report.classifier_accuracy == clf.held_out_accuracy
    assert sum(report.class_histogram) == N and len(report.class_histogram) == 10
    # Training digits are balanced across classes and classified confidently.
    assert min(report.class_histogram) > 20
    assert report.confident_fraction > 0.9
    # uint8 pixels and their [-1, 1] floats are the same images.
    as_float = real_images.to(torch.float32) / 127.5 - 1.0
    assert evaluate(as_float) == report
    with pytest.raises(AttributeError):
        report.fd = 0.0  # type: ignore[misc]


def test_evaluate_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError):
        evaluate(torch.zeros(4, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        evaluate(torch.zeros(4, 1, 8, 8, dtype=torch.int32))
