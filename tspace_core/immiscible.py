"""Immiscible diffusion: re-pair a batch's images with nearby noise before noising it."""

from __future__ import annotations

import scipy.optimize
import torch

from tspace_core.errors import SpecError

ASSIGNMENTS = ("none", "assignment", "knn")


def assign_noise(
    x0: torch.Tensor,
    noise: torch.Tensor,
    method: str,
    k: int = 4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the noise each image of the batch `x0` (B x ...) is noised with.

    - "none": `noise` unchanged.
    - "assignment" (arXiv 2406.12303): the permutation of `noise`'s rows that minimises the total
      L2 distance to the images (linear assignment). The set of noises is unchanged, so the
      marginal stays Gaussian. `k` and `generator` are ignored.
    - "knn" (arXiv 2505.18521): each image keeps the nearest of `k` candidate noises. The first
      candidate is the image's row of `noise`; the other `k - 1` are drawn with `generator`
      (shape, dtype and device of `x0`), so the result is deterministic given `noise` and the
      generator's state, and `k=1` returns `noise` unchanged. Not a permutation.

    The diffusion loss must regress onto the *returned* noise, never the `noise` passed in: using
    the unpermuted noise as the target trains on mismatched pairs.
    """
    if method not in ASSIGNMENTS:
        raise SpecError(f"noise assignment {method!r} is unknown; use one of {list(ASSIGNMENTS)}")
    if k < 1:
        raise SpecError(f"noise assignment k={k} is invalid; k must be an integer >= 1")
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    if method == "none":
        return noise
    if method == "assignment":
        return assignment_noise(x0, noise) if x0.shape[0] > 1 else noise
    return knn_noise(x0, noise, k, generator)


@torch.no_grad()
def assignment_noise(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Permute `noise`'s rows to minimise sum_i ||x0_i - eps_{col_i}||_2 (linear assignment)."""
    # float32 on the CPU: the reference's fp16 with 0.1 scaling only saves GPU memory and
    # perturbs near-ties; scipy needs the matrix on the CPU anyway.
    flat_x0 = x0.detach().reshape(x0.shape[0], -1).to("cpu", torch.float32)
    flat_noise = noise.detach().reshape(noise.shape[0], -1).to("cpu", torch.float32)
    distances = torch.cdist(flat_x0, flat_noise)  # D[i, j] = ||x0_i - eps_j||_2
    _, col = scipy.optimize.linear_sum_assignment(distances.double().numpy())
    return noise[torch.as_tensor(col, dtype=torch.long, device=noise.device)]


@torch.no_grad()
def knn_noise(
    x0: torch.Tensor, noise: torch.Tensor, k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """For each image keep the nearest in L2 of `noise` and `k - 1` fresh Gaussian candidates."""
    if k == 1:
        return noise
    draw_device = generator.device if generator is not None else x0.device
    fresh = torch.randn(
        (k - 1, *x0.shape), generator=generator, dtype=x0.dtype, device=draw_device
    ).to(x0.device)
    candidates = torch.cat([noise.unsqueeze(0), fresh])  # k x B x ...
    diff = candidates.float() - x0.detach().float().unsqueeze(0)
    distances = diff.reshape(k, x0.shape[0], -1).norm(dim=-1)  # k x B
    nearest = distances.argmin(dim=0)  # first minimum: ties keep `noise`
    return candidates[nearest, torch.arange(x0.shape[0], device=x0.device)]
