"""Tests for tspace_core.data: digits, image folders, shards and the config."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits as sk_load_digits

from tspace_core.data import (
    DataConfig,
    ImageDataset,
    load_dataset,
    load_digits,
    load_image_folder,
    load_shards,
    pack_shards,
    read_manifest,
)
from tspace_core.errors import DataError, SpecError
from tspace_core.fsio import sha256_file


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_digits()


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _small(n: int = 10, labelled: bool = True) -> ImageDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 5, 4), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n, dtype=torch.int64) % 3 if labelled else None
    return ImageDataset(images, labels, 3 if labelled else 0, "small")


# ---------------------------------------------------------------------------- digits


def test_digits_match_sklearn_scaled(digits: ImageDataset) -> None:
    bunch = sk_load_digits()
    expected = np.floor(bunch.data.reshape(-1, 1, 8, 8) * 255 / 16 + 0.5).astype(np.uint8)
    assert len(digits) == 1797 and digits.shape == (1, 8, 8)
    assert digits.images.dtype == torch.uint8
    assert np.array_equal(digits.images.numpy(), expected)
    assert digits.num_classes == 10 and digits.labels is not None
    assert np.array_equal(digits.labels.numpy(), bunch.target)
    assert set(digits.labels.tolist()) == set(range(10))
    assert int(digits.images.min()) == 0 and int(digits.images.max()) == 255
    assert digits.shards == () and digits.name == "digits"


def test_digits_resize_and_to_float(digits: ImageDataset) -> None:
    big = load_digits(resize=16)
    assert tuple(big.images.shape) == (1797, 1, 16, 16) and big.images.dtype == torch.uint8
    # Bilinear upsampling keeps each image's mean brightness close to the original's.
    diff = big.images.float().mean((1, 2, 3)) - digits.images.float().mean((1, 2, 3))
    assert float(diff.abs().max()) < 12
    x = digits.to_float()
    assert x.dtype == torch.float32 and float(x.min()) == -1.0 and float(x.max()) == 1.0


def test_load_dataset_digits_channels() -> None:
    ds = load_dataset(DataConfig(source="digits", resize=12, channels=3))
    assert ds.shape == (3, 12, 12)
    assert torch.equal(ds.images[:, 0], ds.images[:, 1])


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"resize": 3}, "resize"),
        ({"resize": 2048}, "resize"),
        ({"resize": True}, "resize"),
        ({"channels": 2}, "channels"),
        ({"source": ""}, "source"),
    ],
)
def test_data_config_rejects(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError, match=f"data.{field}"):
        DataConfig(**kwargs)  # type: ignore[arg-type]


def test_load_dataset_missing_source_lists_allowed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"digits.*image folder.*manifest"):
        load_dataset(DataConfig(source="nope"), base_dir=tmp_path)


# ---------------------------------------------------------------------------- image folders


def test_image_folder_labelled(tmp_path: Path) -> None:
    names = ["e", "b", "d", "a", "c"]  # five classes so an unsorted listing is caught
    for name in names:
        for i in range(2):
            value = ord(name)
            _png(tmp_path / "pets" / name / f"{i}.png", np.full((6, 7, 3), value, dtype=np.uint8))
    (tmp_path / "pets" / "README.txt").write_text("ignored: not an image")
    ds = load_image_folder(tmp_path / "pets")
    assert ds.shape == (3, 6, 7) and ds.num_classes == 5 and ds.name == "pets"
    assert ds.labels is not None and ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # Label k is the k-th class name in sorted order, as in torchvision's ImageFolder.
    for k, name in enumerate(sorted(names)):
        assert (ds.images[ds.labels == k] == ord(name)).all()


def test_image_folder_unlabelled_gray_and_resize(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.full((8, 8), 10, dtype=np.uint8))
    _png(tmp_path / "b.png", np.full((4, 6), 200, dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path, resize=5)
    assert ds.labels is None and ds.num_classes == 0
    assert ds.shape == (1, 5, 5)
    assert ds.images[0].unique().tolist() == [10] and ds.images[1].unique().tolist() == [200]
    rgb = load_dataset(DataConfig(source=tmp_path.name, resize=5, channels=3), tmp_path.parent)
    assert rgb.shape == (3, 5, 5)


def test_image_folder_mixed_modes_become_rgb(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    _png(tmp_path / "b.png", np.zeros((4, 4, 3), dtype=np.uint8))
    assert load_image_folder(tmp_path).shape == (3, 4, 4)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no images"):
        load_image_folder(tmp_path)
    _png(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    _png(tmp_path / "b.png", np.zeros((4, 5), dtype=np.uint8))
    with pytest.raises(DataError, match=r"b\.png is 5x4 .*a\.png is 4x4"):
        load_image_folder(tmp_path)
    (tmp_path / "b.png").write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match=r"cannot read image .*b\.png"):
        load_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="loose images"):
        load_image_folder(tmp_path)


def test_image_folder_empty_class(tmp_path: Path) -> None:
    _png(tmp_path / "one" / "a.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "two").mkdir()
    with pytest.raises(DataError, match="two holds no images"):
        load_image_folder(tmp_path)


# ---------------------------------------------------------------------------- shards


def test_pack_load_round_trip(tmp_path: Path, digits: ImageDataset) -> None:
    manifest_path = pack_shards(digits, tmp_path / "shards", num_shards=4)
    raw = json.loads(manifest_path.read_text())
    assert raw["format"] == "tspace-shards/1" and raw["count"] == 1797
    assert raw["shape"] == [1, 8, 8] and raw["num_classes"] == 10
    assert [s["count"] for s in raw["shards"]] == [450, 449, 449, 449]
    for shard in raw["shards"]:
        data = (tmp_path / "shards" / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert sha256_file(tmp_path / "shards" / shard["file"]) == shard["sha256"]
    back = load_shards(manifest_path)
    assert torch.equal(back.images, digits.images)
    assert back.labels is not None and digits.labels is not None
    assert torch.equal(back.labels, digits.labels)
    assert back.shards == tuple(s["file"] for s in raw["shards"])
    via_cfg = load_dataset(DataConfig(source="shards", resize=16), base_dir=tmp_path)
    assert via_cfg.shape == (1, 16, 16) and len(via_cfg) == 1797


def test_select_subset_of_shards(tmp_path: Path) -> None:
    ds = _small(10)
    manifest_path = pack_shards(ds, tmp_path, num_shards=3)  # 4, 3, 3
    part = load_shards(tmp_path, select=[2, 0])
    assert part.shards == ("shard-00002.safetensors", "shard-00000.safetensors")
    assert torch.equal(part.images, torch.cat([ds.images[7:], ds.images[:4]]))
    with pytest.raises(DataError, match="selection"):
        load_shards(manifest_path, select=[3])


def test_unlabelled_round_trip(tmp_path: Path) -> None:
    ds = _small(5, labelled=False)
    back = load_shards(pack_shards(ds, tmp_path / "s", num_shards=5))
    assert back.labels is None and back.num_classes == 0
    assert torch.equal(back.images, ds.images)


def test_corrupt_and_missing_shard_named(tmp_path: Path) -> None:
    manifest_path = pack_shards(_small(9), tmp_path, num_shards=3)
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00001\.safetensors.*corrupt"):
        load_shards(manifest_path)
    load_shards(manifest_path, select=[0, 2])  # the intact shards still load
    shard.unlink()
    with pytest.raises(DataError, match=r"shard-00001\.safetensors.*missing"):
        load_shards(manifest_path)


def test_shard_content_must_match_manifest(tmp_path: Path) -> None:
    manifest_path = pack_shards(_small(6), tmp_path, num_shards=2)
    raw = json.loads(manifest_path.read_text())
    raw["shape"] = [3, 4, 5]  # digests still match, the content does not
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"shard-00000\.safetensors.*does not match"):
        load_shards(manifest_path)


@pytest.mark.parametrize("bad", ["../x", "sub/x.safetensors", "..", "/etc/passwd", "a\\b"])
def test_manifest_refuses_unsafe_names(tmp_path: Path, bad: str) -> None:
    manifest_path = pack_shards(_small(4), tmp_path, num_shards=1)
    raw = json.loads(manifest_path.read_text())
    raw["shards"][0]["file"] = bad
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="plain file name"):
        read_manifest(manifest_path)


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(tmp_path)
    good = json.loads(pack_shards(_small(4), tmp_path / "ok", 2).read_text())
    cases = {
        "format": ({**good, "format": "other/2"}, "format"),
        "key": ({k: v for k, v in good.items() if k != "num_classes"}, "num_classes"),
        "count": ({**good, "count": 5}, "sum of shard counts"),
        "digest": ({**good, "shards": [{**good["shards"][0], "sha256": "zz"}]}, "sha256"),
    }
    for name, (raw, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(raw))
        with pytest.raises(DataError, match=message):
            read_manifest(path)


def test_pack_refuses_bad_requests(tmp_path: Path) -> None:
    ds = _small(4)
    for n in (0, 5):
        with pytest.raises(DataError, match="num_shards"):
            pack_shards(ds, tmp_path / "a", n)
    pack_shards(ds, tmp_path / "b", 4)
    with pytest.raises(DataError, match="not empty"):
        pack_shards(ds, tmp_path / "b", 2)
    pack_shards(ds, tmp_path / "b", 2, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert torch.equal(load_shards(tmp_path / "b").images, ds.images)
