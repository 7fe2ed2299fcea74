"""The tspace checkpoint file: one safetensors file with JSON metadata, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import safetensors
import safetensors.torch
import torch

from tspace_core.errors import CheckpointError
from tspace_core.fsio import atomic_write_bytes
from tspace_core.fsio import sha256_file as sha256_file

FORMAT = "tspace-checkpoint/1"
MAX_HEADER_BYTES = 100 * 2**20
_ONLY_SAFETENSORS = (
    "tspace accepts only safetensors checkpoints written by tspace (it never unpickles anything); "
    "re-create the checkpoint with tspace or convert the weights to safetensors yourself"
)
_TUPLE_KEEP_LIST = frozenset({"params", "param_names"})

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    tensors: name -> tensor, on the device asked for.
    meta: the JSON metadata given to `save_checkpoint`.
    sha256: hex digest of the file's bytes (exactly the bytes the tensors were read from).
    path: where it was read from.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    sha256: str
    path: Path


def save_checkpoint(
    path: PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> str:
    """Write `tensors` and JSON `meta` to `path` atomically; return the file's SHA-256 (hex)."""
    header = {"format": FORMAT, "meta": json.dumps(dict(meta), sort_keys=True)}
    data = canonical_header(safetensors.torch.save(_saveable(tensors), metadata=header))
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def canonical_header(data: bytes) -> bytes:
    """The safetensors bytes with their JSON header rewritten with sorted keys and no spaces.

    safetensors writes the metadata map in an order that differs from process to process, so
    the same tensors and metadata could give different bytes, and digests. Rewritten this way,
    equal training gives equal files (a retrained checkpoint is recognised by its digest). Data
    offsets in the header are relative to the end of the header, so the tensor bytes stay as
    they are; the header is padded with spaces to a multiple of 8 bytes, as safetensors does.
    """
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def load_checkpoint(path: PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint written by `save_checkpoint`; raise CheckpointError if not."""
    path = Path(path)
    _check_is_file(path)
    # One read serves both the digest and the tensors, so the digest names what was loaded.
    data = path.read_bytes()
    meta = _parse_header(path, data[:8], len(data), lambda n: data[8 : 8 + n])
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{path} is a corrupt safetensors file ({exc}); {_ONLY_SAFETENSORS}"
        ) from exc
    tensors = {name: t.to(device) for name, t in tensors.items()}
    return Checkpoint(tensors, meta, hashlib.sha256(data).hexdigest(), path)


def read_meta(path: PathLike) -> dict[str, Any]:
    """Return a checkpoint's metadata, reading only its header (no tensor data)."""
    path = Path(path)
    _check_is_file(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        meta = _parse_header(path, f.read(8), size, f.read)
    return meta


def _saveable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no storage (safetensors refuses overlapping ones)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"checkpoint entries must be str -> Tensor, got {name!r}: {tensor!r}")
        t = tensor.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _check_is_file(path: Path) -> None:
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}; check the path")


def _parse_header(
    path: Path, prefix: bytes, size: int, read_header: Callable[[int], bytes]
) -> dict[str, Any]:
    """Validate a safetensors header and return its tspace meta; `prefix` is the first 8 bytes."""
    header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
    sane = 0 < header_len <= min(size - 8, MAX_HEADER_BYTES)
    raw = read_header(header_len) if sane else b""
    # Sniff magic bytes only when the file is not safetensors-shaped: a genuine header length can
    # start with 0x80 or "PK" too.
    if not raw.startswith(b"{"):
        _refuse(path, _looks_like(prefix, size, header_len))
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        _refuse(path, "not a safetensors file (its header is not valid JSON)")
    if not isinstance(header, dict):
        _refuse(path, "not a safetensors file (its header is not a JSON object)")
    _check_data_size(path, header, size - 8 - header_len)
    return _tspace_meta(path, header.get("__metadata__"))


def _looks_like(prefix: bytes, size: int, header_len: int) -> str:
    """What a file that is not a safetensors file seems to be, for the error message."""
    if prefix.startswith(b"PK"):
        return "a zip archive (the format torch.save writes)"
    if prefix.startswith(b"\x80"):
        return "a Python pickle"
    if size < 8:
        return f"only {size} bytes long (empty or truncated)"
    if header_len > MAX_HEADER_BYTES:
        return f"not safetensors (header length {header_len} exceeds {MAX_HEADER_BYTES})"
    if header_len > size - 8:
        return f"truncated or not safetensors (header length {header_len}, file {size} bytes)"
    return "not a safetensors file (no JSON header after the length)"


def _check_data_size(path: Path, header: dict[str, Any], data_len: int) -> None:
    """The tensors' byte ranges must end exactly where the file does (catches truncation)."""
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] >= offsets[0] >= 0):
            _refuse(path, f"a malformed safetensors file (entry {name!r} has no valid offsets)")
        end = max(end, int(offsets[1]))
    if end != data_len:
        _refuse(path, f"truncated or padded (tensors need {end} data bytes, file has {data_len})")


def _tspace_meta(path: Path, metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, dict) or "format" not in metadata:
        _refuse(path, "a safetensors file without tspace metadata (not written by tspace)")
    if metadata["format"] != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {metadata['format']!r}; this tspace reads {FORMAT!r}. "
            "Use the tspace version that wrote it, or re-create the checkpoint"
        )
    try:
        meta = json.loads(metadata.get("meta", ""))
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        _refuse(path, "a tspace checkpoint whose 'meta' field is not a JSON object (corrupt)")
    return meta


def _refuse(path: Path, looks_like: str) -> NoReturn:
    raise CheckpointError(f"{path} is {looks_like}; {_ONLY_SAFETENSORS}")


def flatten_optimizer_state(
    state_dict: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors and a JSON-serialisable part (no pickle).

    Per-parameter tensors are named "{param_id}.{key}"; tensors in param_groups (e.g. a tensor lr)
    "group{i}.{key}". Python values and the name -> (owner, key) map go to the JSON part, so
    `unflatten_optimizer_state` never parses names.
    """
    tensors: dict[str, torch.Tensor] = {}
    state_json: list[list[Any]] = []
    for param_id, param_state in state_dict["state"].items():
        scalars: dict[str, Any] = {}
        names: dict[str, str] = {}
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                names[key] = f"{param_id}.{key}"
                tensors[names[key]] = value
            else:
                scalars[key] = value
        state_json.append([param_id, scalars, names])
    groups_json: list[dict[str, Any]] = []
    group_tensors: dict[str, list[Any]] = {}
    for i, group in enumerate(state_dict["param_groups"]):
        plain = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):
                tensors[f"group{i}.{key}"] = value
                group_tensors[f"group{i}.{key}"] = [i, key]
            else:
                plain[key] = list(value) if isinstance(value, tuple) else value
        groups_json.append(plain)
    json_part = {"state": state_json, "param_groups": groups_json, "group_tensors": group_tensors}
    json.dumps(json_part)  # fail here, not at save time, if a value is not JSON
    return tensors, json_part


def unflatten_optimizer_state(
    tensors: Mapping[str, torch.Tensor], json_part: Mapping[str, Any]
) -> dict[str, Any]:
    """Rebuild a state dict that `torch.optim.Optimizer.load_state_dict` accepts."""
    try:
        state: dict[Any, dict[str, Any]] = {}
        for param_id, scalars, names in json_part["state"]:
            state[param_id] = {**scalars, **{key: tensors[name] for key, name in names.items()}}
        # JSON has no tuples; optimizers keep hyperparameters like betas as tuples.
        groups = [
            {
                k: tuple(v) if isinstance(v, list) and k not in _TUPLE_KEEP_LIST else v
                for k, v in group.items()
            }
            for group in json_part["param_groups"]
        ]
        for name, (i, key) in json_part["group_tensors"].items():
            groups[i][key] = tensors[name]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(
            f"the checkpoint's optimizer state is incomplete or malformed ({exc!r}); "
            "resume from another checkpoint or restart the unit without optimizer state"
        ) from exc
    return {"state": state, "param_groups": groups}


def flatten_rng(generator: torch.Generator) -> torch.Tensor:
    """A torch.Generator's state as a uint8 CPU tensor, storable in a checkpoint."""
    return generator.get_state()


def restore_rng(generator: torch.Generator, state: torch.Tensor) -> None:
    """Set `generator` to a state from `flatten_rng`."""
    if state.dtype != torch.uint8 or state.dim() != 1:
        raise CheckpointError(
            f"RNG state must be a 1-D uint8 tensor, got {state.dtype} {tuple(state.shape)}; "
            "the checkpoint is corrupt or not from tspace"
        )
    try:
        generator.set_state(state.to("cpu"))
    except RuntimeError as exc:
        raise CheckpointError(f"RNG state does not fit this generator ({exc})") from exc


def pack_training_state(
    prefixes: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Namespace several tensor dicts into one: {"model": {"w": t}} -> {"model.w": t}."""
    packed: dict[str, torch.Tensor] = {}
    for prefix, group in prefixes.items():
        if not prefix or "." in prefix:
            raise ValueError(f"prefix {prefix!r} must be non-empty and contain no '.'")
        packed.update({f"{prefix}.{name}": t for name, t in group.items()})
    return packed


def unpack(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors packed under `prefix`, prefix removed: the inverse of pack_training_state."""
    head = f"{prefix}."
    return {name[len(head) :]: t for name, t in tensors.items() if name.startswith(head)}
