"""Tests for tspace_core.images: grids, PNG and npz files, uint8 conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tspace_core.data import ImageDataset
from tspace_core.errors import DataError
from tspace_core.images import load_npz, make_grid, save_grid, save_npz, to_uint8


def _batch(n: int, c: int, h: int, w: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n * 1000 + c)
    return torch.randint(0, 256, (n, c, h, w), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("n", "c", "nrow", "scale", "padding", "expected"),
    [
        (7, 3, None, 1, 1, (3 * 6 + 1, 3 * 5 + 1, 3)),  # nrow = ceil(sqrt(7)) = 3, 3 rows
        (7, 1, 2, 1, 0, (4 * 5, 2 * 4)),
        (4, 1, 4, 3, 2, (15 + 4, 4 * (12 + 2) + 2)),
        (1, 3, None, 2, 1, (12, 10, 3)),
    ],
)
def test_grid_shape(
    n: int, c: int, nrow: int | None, scale: int, padding: int, expected: tuple[int, ...]
) -> None:
    grid = make_grid(_batch(n, c, 5, 4), nrow=nrow, scale=scale, padding=padding)
    assert grid.shape == expected and grid.dtype == np.uint8


def test_grid_places_upscaled_tiles() -> None:
    images = _batch(5, 3, 2, 3)
    grid = make_grid(images.numpy(), nrow=2, scale=2, padding=1, pad_value=7)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(5):
        top, left = 1 + (i // 2) * 5, 1 + (i % 2) * 7
        tile = grid[top : top + 4, left : left + 6]
        assert np.array_equal(tile[::2, ::2], arr[i]) and np.array_equal(tile[1::2, 1::2], arr[i])
    assert (grid[0] == 7).all() and (grid[:, 0] == 7).all()
    assert (grid[11:15, 8:14] == 7).all()  # the empty sixth cell is padding colour


def test_grid_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        make_grid(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="scale"):
        make_grid(_batch(2, 1, 4, 4), scale=0)


@pytest.mark.parametrize("c", [1, 3])
def test_save_grid_png_round_trip(tmp_path: Path, c: int) -> None:
    images = _batch(6, c, 8, 8)
    path = save_grid(images, tmp_path / "deep" / "dir" / "grid.png")
    with Image.open(path) as img:
        pixels = np.asarray(img)
        assert img.format == "PNG"
    # The default scale makes an 8 px tile 32 px.
    assert np.array_equal(pixels, make_grid(images, scale=4))
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp files left


def test_save_grid_default_scale_reaches_32px(tmp_path: Path) -> None:
    images = _batch(2, 1, 5, 9)
    with Image.open(save_grid(images, tmp_path / "g.png", nrow=2, padding=0)) as img:
        assert img.size == (2 * 9 * 7, 5 * 7)  # ceil(32 / 5) = 7


def test_npz_round_trip(tmp_path: Path) -> None:
    images = _batch(3, 3, 4, 4)
    path = save_npz(tmp_path / "s.npz", images, torch.tensor([2, 0, 1]))
    back, labels = load_npz(path)
    assert np.array_equal(back, images.numpy()) and back.dtype == np.uint8
    assert labels is not None and labels.dtype == np.int64 and labels.tolist() == [2, 0, 1]
    back, labels = load_npz(save_npz(tmp_path / "u.npz", images.numpy()))
    assert labels is None and np.array_equal(back, images.numpy())


def test_load_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "obj.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="cannot read"):
        load_npz(tmp_path / "obj.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="no 'images'"):
        load_npz(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 junk")
    with pytest.raises(DataError, match="cannot read"):
        load_npz(tmp_path / "junk.npz")


def test_to_uint8_bounds_and_inverse() -> None:
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.999, 1.0, 4.0])
    assert to_uint8(x).tolist() == [0, 0, 64, 128, 255, 255, 255]  # 63.75, 127.5, 254.87 round
    assert to_uint8(x).dtype == torch.uint8
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    ds = ImageDataset(every, None, 0, "all-values")
    assert torch.equal(to_uint8(ds.to_float()), every)
