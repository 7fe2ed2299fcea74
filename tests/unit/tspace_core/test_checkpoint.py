"""Tests for tspace_core.checkpoint: the safetensors format, refusals, atomicity, resume state."""

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tspace_core.checkpoint import (
    FORMAT,
    Checkpoint,
    flatten_optimizer_state,
    flatten_rng,
    load_checkpoint,
    pack_training_state,
    read_meta,
    restore_rng,
    save_checkpoint,
    sha256_file,
    unflatten_optimizer_state,
    unpack,
)
from tspace_core.errors import CheckpointError

META = {"job": "digits", "unit": 3, "states": [31, 63], "step": 500, "loss": 0.125}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.weight": torch.randn(4, 3, generator=g),
        "model.bias": torch.randn(4, generator=g).half(),
        "ema.weight": torch.randn(4, 3, generator=g).t(),  # not contiguous
        "counts": torch.arange(5, dtype=torch.int64),
        "empty": torch.zeros(0, 2),
    }


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, _tensors(), META)
    return path


def test_round_trip_of_tensors_and_meta(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    digest = save_checkpoint(path, _tensors(), META)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.meta == META and ckpt.path == path and ckpt.sha256 == digest
    assert ckpt.tensors.keys() == _tensors().keys()
    for name, tensor in _tensors().items():
        assert ckpt.tensors[name].dtype == tensor.dtype
        assert torch.equal(ckpt.tensors[name], tensor)


def test_digest_equals_hashlib_over_the_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    digest = save_checkpoint(path, _tensors(), META)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == digest


def test_sha256_file_streams_files_larger_than_a_chunk(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = os.urandom(2**20 * 2 + 17)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_file_is_plain_safetensors_with_tspace_metadata(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    # An independent reader sees our tensors and the documented header fields.
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        assert set(f.keys()) == set(_tensors())
    assert metadata["format"] == FORMAT
    assert json.loads(metadata["meta"]) == META
    assert metadata["meta"] == json.dumps(META, sort_keys=True)


def test_read_meta_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved(tmp_path)

    def no_tensor_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("read_meta loaded tensor data")

    monkeypatch.setattr(safetensors.torch, "load", no_tensor_loading)
    monkeypatch.setattr(safetensors.torch, "load_file", no_tensor_loading)
    monkeypatch.setattr(Path, "read_bytes", no_tensor_loading)
    assert read_meta(path) == META


def test_tensors_sharing_storage_are_saved(tmp_path: Path) -> None:
    base = torch.randn(6)
    path = tmp_path / "shared.safetensors"
    save_checkpoint(path, {"a": base, "b": base, "c": base[1:4]}, {})
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.tensors["b"], base) and torch.equal(ckpt.tensors["c"], base[1:4])


def test_empty_checkpoint_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    save_checkpoint(path, {}, {"step": 0})
    assert load_checkpoint(path).tensors == {} and read_meta(path) == {"step": 0}


# --- refusals ---------------------------------------------------------------------------------


def _assert_refused(path: Path, *fragments: str) -> None:
    for reader in (load_checkpoint, read_meta):
        with pytest.raises(CheckpointError) as info:
            reader(path)
        message = str(info.value)
        assert "safetensors" in message
        for fragment in fragments:
            assert fragment in message


@pytest.mark.parametrize("magic", [b"\x80", b"PK"])
def test_real_checkpoint_whose_header_length_looks_like_magic_bytes_loads(
    tmp_path: Path, magic: bytes
) -> None:
    # The 8-byte length can begin with 0x80 (pickle) or "PK" (zip); sniffing must not refuse it.
    def header(pad: int) -> dict[str, str]:
        return {"format": FORMAT, "meta": json.dumps({"pad": "x" * pad})}

    tensors = {"w": torch.ones(2)}
    pad = next(
        p for p in range(40000) if safetensors.torch.save(tensors, header(p)).startswith(magic)
    )
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, tensors, {"pad": "x" * pad})
    assert path.read_bytes().startswith(magic)
    assert load_checkpoint(path).meta == {"pad": "x" * pad}
    assert read_meta(path) == {"pad": "x" * pad}


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_meta(tmp_path / "nope.safetensors")


def test_torch_save_file_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.randn(3)}, path)  # only to create the bad file
    _assert_refused(path, "zip", "torch.save", "only safetensors")


class _Boom:
    """Unpickling this would raise: proves the loader never unpickles."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_explode, ("unpickled!",))


def _explode(message: str) -> None:
    raise AssertionError(message)


def test_raw_pickle_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0], "boom": _Boom()}))
    _assert_refused(path, "pickle")


@pytest.mark.parametrize("keep", [0, 3, 8, 20, -1])
def test_truncated_files_are_refused(tmp_path: Path, keep: int) -> None:
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    _assert_refused(path)


def test_header_length_beyond_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    _assert_refused(path, "header length")


def test_garbage_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    header = b"{not json at all \xff"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    _assert_refused(path, "not valid JSON")


def test_plain_safetensors_without_tspace_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path))
    _assert_refused(path, "without tspace metadata")
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path), metadata={"other": "x"})
    _assert_refused(path, "without tspace metadata")


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    metadata = {"format": "tspace-checkpoint/99", "meta": "{}"}
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="tspace-checkpoint/99"):
        load_checkpoint(path)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


# --- atomicity --------------------------------------------------------------------------------


def test_no_temp_file_is_left_and_existing_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"w": torch.zeros(1000)}, {"step": 1})
    digest = save_checkpoint(path, {"v": torch.ones(3)}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    ckpt = load_checkpoint(path)
    assert ckpt.sha256 == digest and ckpt.meta == {"step": 2}
    assert list(ckpt.tensors) == ["v"] and torch.equal(ckpt.tensors["v"], torch.ones(3))


def test_failed_write_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt.safetensors"
    digest = save_checkpoint(path, {"w": torch.zeros(3)}, {"step": 1})

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.ones(3)}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    assert sha256_file(path) == digest


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ckpt.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, {})
    assert read_meta(path) == {}


# --- resume state -----------------------------------------------------------------------------


def _train(model: torch.nn.Linear, optim: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(1000 + step)  # the batch depends only on the step
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
        optim.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optim.step()


def _fresh(seed: int = 0) -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.8, 0.95))


def test_optimizer_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path: Path) -> None:
    reference, reference_optim = _fresh()
    _train(reference, reference_optim, range(10))

    model, optim = _fresh()
    _train(model, optim, range(5))
    optim_tensors, optim_json = flatten_optimizer_state(optim.state_dict())
    path = tmp_path / "resume.safetensors"
    packed = pack_training_state({"model": model.state_dict(), "optim": optim_tensors})
    save_checkpoint(path, packed, {"step": 5, "optim": optim_json})

    ckpt = load_checkpoint(path)
    resumed, resumed_optim = _fresh(seed=123)  # different init: everything must come from the file
    resumed.load_state_dict(unpack(ckpt.tensors, "model"))
    state = unflatten_optimizer_state(unpack(ckpt.tensors, "optim"), ckpt.meta["optim"])
    resumed_optim.load_state_dict(state)
    assert resumed_optim.param_groups[0]["betas"] == (0.8, 0.95)
    _train(resumed, resumed_optim, range(5, 10))
    _train(model, optim, range(5, 10))  # the original continues too

    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor)
        assert torch.equal(model.state_dict()[name], tensor)


def test_optimizer_state_without_resume_differs(tmp_path: Path) -> None:
    # Guards the test above: dropping the optimizer state must change the result.
    reference, reference_optim = _fresh()
    _train(reference, reference_optim, range(10))
    model, optim = _fresh()
    _train(model, optim, range(5))
    fresh_optim = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.8, 0.95))
    _train(model, fresh_optim, range(5, 10))
    assert not torch.equal(model.weight, reference.weight)


def test_optimizer_tensor_hyperparameters_and_scalars_round_trip() -> None:
    model = torch.nn.Linear(2, 2)
    optim = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.01))
    model(torch.ones(1, 2)).sum().backward()
    optim.step()
    tensors, json_part = flatten_optimizer_state(optim.state_dict())
    json_part = json.loads(json.dumps(json_part))
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    state = unflatten_optimizer_state(tensors, json_part)
    original = optim.state_dict()
    group, original_group = state["param_groups"][0], original["param_groups"][0]
    assert torch.equal(group.pop("lr"), torch.tensor(0.01))
    assert group == {k: v for k, v in original_group.items() if k != "lr"}
    assert state["state"].keys() == original["state"].keys()
    for pid, param_state in original["state"].items():
        for key, value in param_state.items():
            assert torch.equal(state["state"][pid][key], value)


def test_python_scalars_in_per_param_state_go_to_json() -> None:
    state_dict = {
        "state": {0: {"step": 7, "momentum_buffer": torch.ones(2)}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    tensors, json_part = flatten_optimizer_state(state_dict)
    assert list(tensors) == ["0.momentum_buffer"]
    back = unflatten_optimizer_state(tensors, json.loads(json.dumps(json_part)))
    assert back["state"][0]["step"] == 7 and back["param_groups"] == [{"lr": 0.1, "params": [0]}]


def test_malformed_optimizer_state_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="optimizer state"):
        unflatten_optimizer_state({}, {"state": [[0, {}, {"exp_avg": "0.exp_avg"}]]})


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(42)
    torch.randn(10, generator=g)
    path = tmp_path / "rng.safetensors"
    state = flatten_rng(g)
    assert state.dtype == torch.uint8
    save_checkpoint(path, pack_training_state({"rng": {"torch": state}}), {})
    expected = torch.randn(100, generator=g)

    restored = torch.Generator().manual_seed(7)
    restore_rng(restored, unpack(load_checkpoint(path).tensors, "rng")["torch"])
    assert torch.equal(torch.randn(100, generator=restored), expected)


def test_bad_rng_state_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="uint8"):
        restore_rng(torch.Generator(), torch.zeros(3))


def test_pack_and_unpack_are_inverse() -> None:
    model = {"w": torch.ones(2), "layer.b": torch.zeros(1)}
    ema = {"w": torch.full((2,), 3.0)}
    packed = pack_training_state({"model": model, "ema": ema})
    assert set(packed) == {"model.w", "model.layer.b", "ema.w"}
    for prefix, group in (("model", model), ("ema", ema)):
        unpacked = unpack(packed, prefix)
        assert unpacked.keys() == group.keys()
        assert all(unpacked[name] is tensor for name, tensor in group.items())
    assert unpack(packed, "optim") == {}
    with pytest.raises(ValueError):
        pack_training_state({"a.b": model})


def test_equal_contents_give_equal_bytes_in_every_process(tmp_path: Path) -> None:
    """safetensors orders its metadata differently per process; tspace's files do not differ."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from tspace_core.checkpoint import save_checkpoint\n"
        "t = {'a': torch.arange(6.0).reshape(2, 3), 'b': torch.ones(4, dtype=torch.int64)}\n"
        "print(save_checkpoint(sys.argv[1], t, {'job': 'j', 'unit': 0, 'step': 3}))\n"
    )
    digests = set()
    for i in range(4):
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"c{i}.safetensors")],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1
    data = (tmp_path / "c0.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].rstrip(b" ")
    assert header == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
    assert length % 8 == 0
    loaded = load_checkpoint(tmp_path / "c0.safetensors")
    assert loaded.meta == {"job": "j", "unit": 0, "step": 3}
    assert torch.equal(loaded.tensors["a"], torch.arange(6.0).reshape(2, 3))
