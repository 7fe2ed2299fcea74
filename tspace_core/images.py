"""Turning image batches into files people can look at: PNG grids, npz arrays, uint8 pixels."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tspace_core.errors import DataError
from tspace_core.fsio import atomic_write

ImageBatch = torch.Tensor | np.ndarray


def _as_uint8_array(images: ImageBatch) -> np.ndarray:
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty uint8 N x C x H x W batch, got {arr.dtype} {arr.shape}"
        )
    if arr.shape[1] not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 channels, got {arr.shape[1]}")
    return arr


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] to uint8 0..255; the inverse of ImageDataset.to_float."""
    return ((x.detach().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def make_grid(
    images: ImageBatch,
    nrow: int | None = None,
    scale: int = 1,
    padding: int = 1,
    pad_value: int = 0,
) -> np.ndarray:
    """Tile a batch into one uint8 image (H', W', C), or (H', W') for one channel.

    `nrow` images per row (default ceil(sqrt(N))), like torchvision; each tile is upscaled
    `scale` times by nearest neighbour; `padding` pixels of `pad_value` surround every tile, so
    H' = rows * (H * scale + padding) + padding.
    """
    arr = _as_uint8_array(images)
    n, c, h, w = arr.shape
    nrow = math.ceil(math.sqrt(n)) if nrow is None else nrow
    if nrow < 1 or scale < 1 or padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError("need nrow >= 1, scale >= 1, padding >= 0 and pad_value in 0..255")
    rows = math.ceil(n / nrow)
    th, tw = h * scale, w * scale
    tiles = arr.transpose(0, 2, 3, 1).repeat(scale, axis=1).repeat(scale, axis=2)
    grid = np.full(
        (rows * (th + padding) + padding, nrow * (tw + padding) + padding, c),
        pad_value,
        dtype=np.uint8,
    )
    for i, tile in enumerate(tiles):
        top = padding + (i // nrow) * (th + padding)
        left = padding + (i % nrow) * (tw + padding)
        grid[top : top + th, left : left + tw] = tile
    return grid[..., 0] if c == 1 else grid


def save_grid(
    images: ImageBatch,
    path: Path | str,
    nrow: int | None = None,
    scale: int | None = None,
    padding: int = 1,
) -> Path:
    """Save a grid as PNG; default scale is the smallest making every tile at least 32 px."""
    arr = _as_uint8_array(images)
    if scale is None:
        scale = max(1, math.ceil(32 / min(arr.shape[2], arr.shape[3])))
    img = Image.fromarray(make_grid(arr, nrow=nrow, scale=scale, padding=padding))
    path = Path(path)
    atomic_write(path, lambda f: img.save(f, format="PNG"))
    return path


def save_npz(path: Path | str, images: ImageBatch, labels: ImageBatch | None = None) -> Path:
    """Save `images` (uint8 N x C x H x W) and optional int64 `labels` as an uncompressed npz."""
    arr = _as_uint8_array(images)
    if labels is None:
        atomic_write(path, lambda f: np.savez(f, images=arr))
        return Path(path)
    lab = np.asarray(labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    if lab.shape != (arr.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({arr.shape[0]},), got {lab.shape}")
    atomic_write(path, lambda f: np.savez(f, images=arr, labels=lab.astype(np.int64)))
    return Path(path)


def load_npz(path: Path | str) -> tuple[np.ndarray, np.ndarray | None]:
    """Read what save_npz wrote: (images uint8 N x C x H x W, labels int64 or None); no pickle."""
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise DataError(f"{path} holds no 'images' array; it was not written by save_npz")
            images = npz["images"]
            labels = npz["labels"] if "labels" in npz.files else None
    except FileNotFoundError as exc:
        raise DataError(f"npz file {path} does not exist") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read npz file {path}: {exc}") from exc
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(
            f"{path}: 'images' must be uint8 N x C x H x W, got {images.dtype} {images.shape}"
        )
    if labels is not None and (labels.dtype != np.int64 or labels.shape != (images.shape[0],)):
        raise DataError(f"{path}: 'labels' must be int64 of shape ({images.shape[0]},)")
    return images, labels
