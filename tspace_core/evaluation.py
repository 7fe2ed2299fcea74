"""Sample quality for the digits: Fréchet distance and k-NN precision/recall in a classifier's
feature space.

The feature extractor is a small MLP trained on a fixed, seeded 80/20 split of scikit-learn's
1797 digits (`load_digits`), with the same [-1, 1] scaling the diffusion models train on. Its
features are the penultimate layer's activations. Training is deterministic on the CPU (fixed
seed, fixed split, full-batch steps, one thread) and takes under a second, so the classifier is
trained on first use and kept in memory for the process; nothing is written to disk.

By default generated images are compared against the held-out 20% of the digits: images the
classifier never trained on, so their features are not flattered by fitting.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from tspace_core.data import ImageDataset, load_digits

SEED = 0
HELD_OUT_FRACTION = 0.2
FEATURE_DIM = 64
EPOCHS = 200
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-4
FD_EPS = 1e-6


class DigitsNet(nn.Module):
    """An MLP on flattened 8x8 images; `features` is the penultimate layer."""

    def __init__(self, hidden: int = 128, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True, eq=False)
class DigitsClassifier:
    """A trained `DigitsNet` with the split it was trained on and its held-out accuracy."""

    net: DigitsNet
    train_index: torch.Tensor  # int64 indices into load_digits()
    held_out_index: torch.Tensor  # int64, disjoint from train_index
    held_out_accuracy: float

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N x FEATURE_DIM, float64) of images (see `as_float`)."""
        with _one_thread(), torch.no_grad():
            return self.net.features(as_float(images)).to(torch.float64)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N x 10) of images (see `as_float`)."""
        with _one_thread(), torch.no_grad():
            return F.softmax(self.net(as_float(images)), dim=1)


@dataclass(frozen=True)
class QualityReport:
    """What `evaluate` measured for one batch of images against a reference set."""

    fd: float  # Fréchet distance of the feature Gaussians; 0 is ideal
    precision: float  # fraction of samples inside the reference manifold
    recall: float  # fraction of reference images inside the samples' manifold
    n: int  # number of samples evaluated
    n_reference: int
    classifier_accuracy: float  # the feature classifier's held-out accuracy
    confident_fraction: float  # samples whose top class probability is >= the threshold
    class_histogram: tuple[int, ...]  # samples per predicted class, classes 0..9


@contextmanager
def _one_thread() -> Iterator[None]:
    # Results must not depend on how many cores the host has; restore the caller's setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def as_float(images: torch.Tensor) -> torch.Tensor:
    """N x 1 x 8 x 8 images as float32 in [-1, 1].

    uint8 images are pixels 0..255 as `ImageDataset` stores them (and `tspace sample` writes);
    floating images are taken to be in [-1, 1] already, as `ddim_sample` returns them, and are
    clamped to it the way `to_uint8` does.
    """
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"images must be N x 1 x 8 x 8, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1.0
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.detach().to("cpu", torch.float32).clamp(-1.0, 1.0)


def digits_split(n: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of range(n) cut into (train, held-out) indices, each sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = round(n * HELD_OUT_FRACTION)
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def train_classifier(seed: int = SEED, epochs: int = EPOCHS) -> DigitsClassifier:
    """Train a fresh `DigitsNet` on the digits' train split; the same weights every run on CPU."""
    digits = load_digits()
    assert digits.labels is not None
    x, y = digits.to_float(), digits.labels
    train, held = digits_split(len(digits), seed)
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsNet()
        opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        for _ in range(epochs):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[train]), y[train]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            accuracy = (net(x[held]).argmax(1) == y[held]).to(torch.float64).mean().item()
    net.requires_grad_(False)
    return DigitsClassifier(net, train, held, accuracy)


@functools.cache
def digits_classifier() -> DigitsClassifier:
    """The process-wide classifier, trained on first use."""
    return train_classifier()


def frechet_distance(
    feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray
) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for Gaussians fitted to N x D sets.

    As in Heusel et al. 2017 (and pytorch-fid): when the product is near singular its square
    root is retried with eps added to both diagonals; a tiny imaginary part from round-off is
    dropped. The result is clamped at 0, which round-off can undershoot for identical sets.
    """
    a, b = _as_array(feats_a), _as_array(feats_b)
    if a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two sets of >= 2 D-dim features, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    if singular or not np.isfinite(covmean).all():
        # Dead ReLU units and N < D make covariances singular; regularise as pytorch-fid does.
        offset = np.eye(len(cov_a)) * FD_EPS
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean)
    return max(float(fd), 0.0)


def _as_array(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    arr = arr.astype(np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"features must be N x D, got shape {arr.shape}")
    return arr


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Direct differences, not the matmul expansion, so a point's distance to itself is exactly 0.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _kth_radius(feats: torch.Tensor, k: int) -> torch.Tensor:
    # The smallest of a point's distances within its own set is to itself, so skip one.
    return _distances(feats, feats).kthvalue(k + 1, dim=1).values


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    inside = (_distances(points, centres) <= radii[None, :]).any(dim=1)
    return inside.to(torch.float64).mean().item()


def precision_recall(
    real_feats: torch.Tensor | np.ndarray, fake_feats: torch.Tensor | np.ndarray, k: int = 3
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), each in [0, 1].

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour within the set. Precision: fraction of fake points inside the real manifold;
    recall: fraction of real points inside the fake manifold.
    """
    real = torch.from_numpy(_as_array(real_feats))
    fake = torch.from_numpy(_as_array(fake_feats))
    if real.shape[1] != fake.shape[1] or k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(
            f"need N x D sets of equal D with more than k={k} points each, "
            f"got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    precision = _coverage(fake, real, _kth_radius(real, k))
    recall = _coverage(real, fake, _kth_radius(fake, k))
    return precision, recall


def reference_images(reference: ImageDataset | None = None) -> torch.Tensor:
    """The images `evaluate` compares against: `reference`'s, or the digits' held-out split."""
    if reference is not None:
        return reference.images
    return load_digits().images[digits_classifier().held_out_index]


def evaluate(
    images: torch.Tensor,
    reference: ImageDataset | None = None,
    *,
    k: int = 3,
    confidence: float = 0.9,
) -> QualityReport:
    """Quality of generated digits against `reference` (default: the held-out digits).

    `images` are N x 1 x 8 x 8, uint8 0..255 or float in [-1, 1] (see `as_float`). FD is
    biased upwards for small N; compare figures only at equal N and equal reference.
    """
    clf = digits_classifier()
    ref = reference_images(reference)
    fake_feats, real_feats = clf.features(images), clf.features(ref)
    probs = clf.probabilities(images)
    top, predicted = probs.max(dim=1)
    precision, recall = precision_recall(real_feats, fake_feats, k)
    return QualityReport(
        fd=frechet_distance(real_feats, fake_feats),
        precision=precision,
        recall=recall,
        n=len(images),
        n_reference=len(ref),
        classifier_accuracy=clf.held_out_accuracy,
        confident_fraction=(top >= confidence).to(torch.float64).mean().item(),
        class_histogram=tuple(int(c) for c in torch.bincount(predicted, minlength=10)),
    )
