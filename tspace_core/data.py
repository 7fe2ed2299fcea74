"""Image datasets: the built-in digits, image folders, and sha256-verified safetensors shards."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tspace_core.errors import DataError, SpecError
from tspace_core.fsio import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tspace-shards/1"
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_GRAY_MODES = frozenset({"1", "L", "LA"})
_SHARD_RE = re.compile(r"shard-\d{5}\.safetensors")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images in memory with optional class labels."""

    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor | None  # int64, (N,); None when unlabelled
    num_classes: int  # 0 when unlabelled
    name: str
    shards: tuple[str, ...] = ()  # shard file names the data came from; empty if read directly

    def __post_init__(self) -> None:
        # A malformed dataset is a bug in the code that built it, not a user error.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 N x C x H x W, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if (self.labels is None) != (self.num_classes == 0):
            raise ValueError("labels must be given exactly when num_classes > 0")
        if self.labels is not None:
            if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
                raise ValueError(f"labels must be int64 of shape ({len(self.images)},)")
            lo, hi = (int(self.labels.min()), int(self.labels.max())) if len(self) else (0, 0)
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def to_float(self) -> torch.Tensor:
        """Images as float32 in [-1, 1] (x / 127.5 - 1), the range the diffusion models use."""
        return self.images.to(torch.float32) / 127.5 - 1.0


@dataclass(frozen=True)
class DataConfig:
    """Where the training images come from and how to shape them."""

    source: str = "digits"
    """"digits" (scikit-learn's 8x8 digits), an image folder, a shard manifest (manifest.json)
    or the folder holding one. Relative paths resolve against the job file's folder."""
    resize: int | None = None
    """Square side length (4..1024) every image is resized to (bilinear); None keeps the size."""
    channels: int | None = None
    """1 (grayscale) or 3 (RGB). None keeps the source's: digits 1; a folder 1 when every image
    is grayscale ("1", "L", "LA"), else 3; shards whatever they hold."""
    shards: int = 1
    """How many shards a coordinator stores the data as (at most the image count). A site that
    packs the same data the same way (`tspace data pack SRC DIR --shards N`) gets the same
    digests and trains from its local copy."""

    def __post_init__(self) -> None:
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1:
            raise SpecError(f"data.shards must be an integer >= 1, got {self.shards!r}")
        if not isinstance(self.source, str) or not self.source.strip():
            raise SpecError('data.source must be "digits", an image folder or a shard manifest')
        if self.resize is not None and (
            isinstance(self.resize, bool)
            or not isinstance(self.resize, int)
            or not 4 <= self.resize <= 1024
        ):
            raise SpecError(
                f"data.resize must be an integer in 4..1024 or null, got {self.resize!r}"
            )
        if self.channels is not None and (
            isinstance(self.channels, bool) or self.channels not in (1, 3)
        ):
            raise SpecError(f"data.channels must be 1, 3 or null, got {self.channels!r}")


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest describes it."""

    file: str  # plain file name inside the manifest's folder
    count: int
    sha256: str  # lowercase hex digest of the whole file


@dataclass(frozen=True)
class ShardManifest:
    """A parsed, validated `manifest.json`."""

    path: Path  # the manifest file; shard files live beside it
    name: str
    count: int
    shape: tuple[int, int, int]
    num_classes: int
    shards: tuple[ShardEntry, ...]

    @property
    def root(self) -> Path:
        """The folder holding the manifest and its shards."""
        return self.path.parent


# ---------------------------------------------------------------------------- file helpers


# ---------------------------------------------------------------------------- image helpers


def _finish(img: Image.Image, resize: int | None, mode: str) -> Image.Image:
    # Convert before resizing: palette ("P") images would otherwise resize with nearest.
    if img.mode != mode:
        img = img.convert(mode)
    if resize is not None and img.size != (resize, resize):
        img = img.resize((resize, resize), Image.Resampling.BILINEAR)
    return img


def _stack(imgs: Sequence[Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(img, dtype=np.uint8) for img in imgs]
    batch = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])  # N H W C
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def _transform(images: torch.Tensor, resize: int | None, channels: int | None) -> torch.Tensor:
    """Resize and/or change the channel count of uint8 images through Pillow."""
    c, h, w = (int(s) for s in images.shape[1:])
    target = c if channels is None else channels
    if (resize is None or (h, w) == (resize, resize)) and target == c:
        return images
    if c not in (1, 3):
        raise DataError(f"cannot resize or convert {c}-channel images; only 1 or 3 are supported")
    mode = "L" if target == 1 else "RGB"
    hwc = images.permute(0, 2, 3, 1).numpy()
    imgs = [_finish(Image.fromarray(a[..., 0] if c == 1 else a), resize, mode) for a in hwc]
    return _stack(imgs)


# ---------------------------------------------------------------------------- sources


def load_digits(resize: int | None = None) -> ImageDataset:
    """scikit-learn's 1797 8x8 digits (values 0..16) as uint8 0..255, one channel, 10 classes."""
    # Imported here so modules importing data do not pay scikit-learn's import time.
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.rint(np.asarray(bunch.images) * 255.0 / 16.0).astype(np.uint8)
    tensor = torch.from_numpy(np.ascontiguousarray(images[:, None]))
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return ImageDataset(_transform(tensor, resize, None), labels, 10, "digits")


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _discover(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Image files, their labels and the class names (empty when unlabelled)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        files = _list_images(root)
        if not files:
            raise DataError(
                f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        return files, [], []
    stray = _list_images(root)
    if stray:
        raise DataError(
            f"image folder {root} mixes class subfolders with loose images such as "
            f"{stray[0].name}; move them into a class subfolder"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _list_images(root / name)
        if not found:
            raise DataError(f"class folder {root / name} holds no images; add some or remove it")
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def _probe(files: Sequence[Path], resize: int | None) -> list[str]:
    """Modes of all images, checking each one opens and, without resize, that sizes agree."""
    modes, first_size = [], None
    for path in files:
        try:
            with Image.open(path) as img:
                modes.append(img.mode)
                size = img.size
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        if first_size is None:
            first_size = size
        elif resize is None and size != first_size:
            raise DataError(
                f"image {path} is {size[0]}x{size[1]} but {files[0]} is "
                f"{first_size[0]}x{first_size[1]} (width x height); "
                "give data.resize to resize all images to one square size"
            )
    return modes


def load_image_folder(
    path: Path | str, resize: int | None = None, channels: int | None = None
) -> ImageDataset:
    """Images from a folder: one subfolder per class (sorted names), or none for unlabelled."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    files, labels, classes = _discover(root)
    modes = _probe(files, resize)
    if channels is None:
        channels = 1 if all(m in _GRAY_MODES for m in modes) else 3
    mode = "L" if channels == 1 else "RGB"
    imgs = []
    for file in files:
        try:
            with Image.open(file) as img:
                imgs.append(_finish(img, resize, mode).copy())
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
            raise DataError(f"cannot read image {file}: {exc}") from exc
    label_tensor = torch.tensor(labels, dtype=torch.int64) if classes else None
    return ImageDataset(_stack(imgs), label_tensor, len(classes), root.resolve().name)


# ---------------------------------------------------------------------------- shards


def pack_shards(
    dataset: ImageDataset, out_dir: Path | str, num_shards: int, overwrite: bool = False
) -> Path:
    """Write the dataset as `num_shards` contiguous safetensors shards plus `manifest.json`."""
    out = Path(out_dir)
    count = len(dataset)
    if (
        isinstance(num_shards, bool)
        or not isinstance(num_shards, int)
        or not 1 <= num_shards <= count
    ):
        raise DataError(
            f"num_shards must be an integer in 1..{count} (the image count), got {num_shards!r}"
        )
    if out.exists() and not out.is_dir():
        raise DataError(f"shard output {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(
            f"shard output folder {out} is not empty; choose an empty folder, or overwrite it "
            "(tspace data pack --overwrite)"
        )
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(count), num_shards)])
    entries = []
    for i in range(num_shards):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        tensors = {"images": dataset.images[lo:hi].contiguous()}
        if dataset.labels is not None:
            tensors["labels"] = dataset.labels[lo:hi].contiguous()
        data = st_save(tensors)
        file = f"shard-{i:05d}.safetensors"
        atomic_write_bytes(out / file, data)
        entries.append({"file": file, "count": hi - lo, "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": dataset.name,
        "count": count,
        "shape": list(dataset.shape),
        "num_classes": dataset.num_classes,
        "shards": entries,
    }
    manifest_path = out / MANIFEST_NAME
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    # Shards of an earlier, larger packing would otherwise linger beside the new manifest.
    keep = {e["file"] for e in entries}
    for stale in out.iterdir():
        if _SHARD_RE.fullmatch(stale.name) and stale.name not in keep:
            stale.unlink()
    return manifest_path


def _is_plain_name(name: str) -> bool:
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and Path(name).name == name
    )


def _field(raw: dict[str, Any], key: str, kind: type, where: Path) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(
            f"manifest {where}: '{key}' is missing or not a {kind.__name__}; "
            "re-create it with pack_shards"
        )
    return value


def _parse_entry(raw: Any, where: Path) -> ShardEntry:
    if not isinstance(raw, dict):
        raise DataError(f"manifest {where}: each shard must be an object with file, count, sha256")
    file = _field(raw, "file", str, where)
    if not _is_plain_name(file):
        raise DataError(
            f"manifest {where}: shard file {file!r} is not a plain file name "
            "(no folders, no '..'); shards must sit beside the manifest"
        )
    count = _field(raw, "count", int, where)
    digest = _field(raw, "sha256", str, where).lower()
    if count < 1 or not _SHA256_RE.fullmatch(digest):
        raise DataError(f"manifest {where}: shard {file} needs count >= 1 and a 64-hex sha256")
    return ShardEntry(file, count, digest)


def read_manifest(path: Path | str) -> ShardManifest:
    """Parse and validate a shard manifest (the file, or the folder holding `manifest.json`)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise DataError(f"shard manifest {path} does not exist; pack shards first") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"shard manifest {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else None
        raise DataError(f"shard manifest {path} has format {got!r}, expected {MANIFEST_FORMAT!r}")
    shape = _field(raw, "shape", list, path)
    if len(shape) != 3 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise DataError(f"manifest {path}: 'shape' must be [C, H, W] of positive integers")
    entries = tuple(_parse_entry(e, path) for e in _field(raw, "shards", list, path))
    count, num_classes = _field(raw, "count", int, path), _field(raw, "num_classes", int, path)
    if not entries or count != sum(e.count for e in entries) or num_classes < 0:
        raise DataError(
            f"manifest {path}: needs at least one shard, 'count' equal to the sum of "
            "shard counts, and 'num_classes' >= 0"
        )
    if len({e.file for e in entries}) != len(entries):
        raise DataError(f"manifest {path}: a shard file is listed twice")
    name = _field(raw, "name", str, path)
    return ShardManifest(path, name, count, (shape[0], shape[1], shape[2]), num_classes, entries)


def _check_shard(tensors: dict[str, torch.Tensor], entry: ShardEntry, man: ShardManifest) -> None:
    expected = {"images", "labels"} if man.num_classes else {"images"}
    images, labels = tensors.get("images"), tensors.get("labels")
    problem = None
    if set(tensors) != expected:
        problem = f"holds tensors {sorted(tensors)}, expected {sorted(expected)}"
    elif (
        images is None
        or images.dtype != torch.uint8
        or tuple(images.shape)
        != (
            entry.count,
            *man.shape,
        )
    ):
        problem = f"images are not uint8 of shape {(entry.count, *man.shape)}"
    elif labels is not None and (
        labels.dtype != torch.int64
        or tuple(labels.shape) != (entry.count,)
        or (entry.count and not 0 <= int(labels.min()) <= int(labels.max()) < man.num_classes)
    ):
        problem = f"labels are not int64 of shape ({entry.count},) in [0, {man.num_classes})"
    if problem:
        raise DataError(f"shard {entry.file} in {man.root} does not match its manifest: {problem}")


def _read_shard(entry: ShardEntry, man: ShardManifest) -> dict[str, torch.Tensor]:
    path = man.root / entry.file
    if not path.is_file():
        raise DataError(f"shard {entry.file} listed in {man.path} is missing; fetch it again")
    # Hash the very bytes that get parsed, so the file cannot change between check and use.
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise DataError(
            f"shard {entry.file} in {man.root} is corrupt: sha256 {digest} differs "
            f"from the manifest's {entry.sha256}; fetch it again"
        )
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error type for malformed headers
        raise DataError(
            f"shard {entry.file} in {man.root} is not a safetensors file: {exc}"
        ) from exc
    _check_shard(tensors, entry, man)
    return tensors


def load_shards(manifest_path: Path | str, select: Sequence[int] | None = None) -> ImageDataset:
    """Load the chosen shards (default all), each verified against its sha256 before parsing."""
    man = read_manifest(manifest_path)
    indices = list(range(len(man.shards))) if select is None else list(select)
    n = len(man.shards)
    if (
        not indices
        or len(set(indices)) != len(indices)
        or not all(isinstance(i, int) and 0 <= i < n for i in indices)
    ):
        raise DataError(f"shard selection {indices} must be distinct indices in 0..{n - 1}")
    parts = [_read_shard(man.shards[i], man) for i in indices]
    images = torch.cat([p["images"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts]) if man.num_classes else None
    files = tuple(man.shards[i].file for i in indices)
    return ImageDataset(images, labels, man.num_classes, man.name, files)


def load_dataset(cfg: DataConfig, base_dir: Path | None = None) -> ImageDataset:
    """The dataset `cfg.source` names, resized and converted as `cfg` asks."""
    if cfg.source == "digits":
        ds = load_digits(cfg.resize)
        return ImageDataset(_transform(ds.images, None, cfg.channels), ds.labels, 10, ds.name)
    path = Path(cfg.source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.is_dir() and not (path / MANIFEST_NAME).is_file():
        return load_image_folder(path, cfg.resize, cfg.channels)
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        ds = load_shards(path)
        images = _transform(ds.images, cfg.resize, cfg.channels)
        return ImageDataset(images, ds.labels, ds.num_classes, ds.name, ds.shards)
    raise DataError(
        f'data source {cfg.source!r} (looked for {path}) is not usable; allowed: "digits", '
        f"an image folder, a shard manifest ({MANIFEST_NAME}) or the folder holding one"
    )
