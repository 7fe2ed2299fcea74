"""Tests for tspace_core.ensemble: sampling a trained run and refusing tampered ensembles."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tspace_core import ensemble
from tspace_core.ensemble import SampleOptions, read_manifest, sample_ensemble, write_manifest
from tspace_core.errors import CheckpointError, TspaceError
from tspace_core.jobspec import resolve, spec_from_dict
from tspace_core.runner import train_job

STATES = (332, 666, 999)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = {
        "name": "tiny-digits",
        "states": {"count": len(STATES)},
        "model": {"preset": "tiny", "class_conditional": True},
        "training": {"steps": 2, "batch_size": 8},
        "data": {"source": "digits"},
    }
    out = tmp_path_factory.mktemp("ensemble") / "run"
    train_job(resolve(spec_from_dict(raw)), out)
    return out


@pytest.fixture
def copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the base timestep of every model call the sampler makes."""
    calls: list[int] = []
    ddim = ensemble.ddim_sample

    def counting(predict: Any, *args: Any, **kw: Any) -> torch.Tensor:
        def counted(x: torch.Tensor, t: int, labels: torch.Tensor | None) -> torch.Tensor:
            calls.append(t)
            return predict(x, t, labels)

        return ddim(counted, *args, **kw)

    monkeypatch.setattr(ensemble, "ddim_sample", counting)
    return calls


# ------------------------------------------------------------------------ sampling


def test_samples_are_uint8_images_with_cycling_labels(trained: Path) -> None:
    images, labels = sample_ensemble(trained, SampleOptions(n=12, seed=0))
    assert images.dtype == torch.uint8 and images.shape == (12, 1, 8, 8)
    assert labels is not None and labels.dtype == torch.int64
    assert labels.tolist() == [i % 10 for i in range(12)]


def test_sampling_is_deterministic_per_seed(trained: Path) -> None:
    a, _ = sample_ensemble(trained, SampleOptions(n=4, seed=1, eta=1.0))
    b, _ = sample_ensemble(trained, SampleOptions(n=4, seed=1, eta=1.0))
    c, _ = sample_ensemble(trained, SampleOptions(n=4, seed=2, eta=1.0))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_every_state_is_visited_once_by_its_owner(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_calls(monkeypatch)
    ticks: list[int] = []
    sample_ensemble(trained, SampleOptions(n=2), progress=ticks.append)
    assert calls == list(reversed(STATES))
    assert sum(ticks) == len(STATES)


@pytest.mark.parametrize("steps", [1, 2])
def test_fewer_steps_use_that_many_model_calls(
    trained: Path, monkeypatch: pytest.MonkeyPatch, steps: int
) -> None:
    calls = _count_calls(monkeypatch)
    sample_ensemble(trained, SampleOptions(n=2, steps=steps))
    assert len(calls) == steps
    assert calls[0] == STATES[-1]  # the noisiest state always starts the chain
    assert set(calls) <= set(STATES) and calls == sorted(calls, reverse=True)


def test_a_label_conditions_every_sample(trained: Path) -> None:
    images, labels = sample_ensemble(trained, SampleOptions(n=5, label=3))
    assert labels is not None and labels.tolist() == [3] * 5
    other, _ = sample_ensemble(trained, SampleOptions(n=5, label=4))
    assert images.shape == (5, 1, 8, 8)
    assert not torch.equal(images, other)


@pytest.mark.parametrize("label", [-1, 10])
def test_a_label_out_of_range_is_refused(trained: Path, label: int) -> None:
    with pytest.raises(TspaceError, match="--label"):
        sample_ensemble(trained, SampleOptions(n=2, label=label))


def test_a_label_for_an_unconditional_ensemble_is_refused(copy: Path) -> None:
    manifest = read_manifest(copy / "ensemble.json")
    write_manifest(copy / "ensemble.json", dataclasses.replace(manifest, num_classes=0))
    with pytest.raises(TspaceError, match="not class-conditional"):
        sample_ensemble(copy, SampleOptions(n=2, label=1))


def test_manifest_round_trips(trained: Path, tmp_path: Path) -> None:
    manifest = read_manifest(trained / "ensemble.json")
    write_manifest(tmp_path / "ensemble.json", manifest)
    assert read_manifest(tmp_path / "ensemble.json") == manifest
    assert manifest.latent_states.timesteps == STATES


# ------------------------------------------------------------------------ verification


def _refused(root: Path, match: str) -> CheckpointError:
    before = _snapshot(root)
    with pytest.raises(CheckpointError, match=match) as info:
        sample_ensemble(root, SampleOptions(n=2))
    assert _snapshot(root) == before
    return info.value


def _member_file(root: Path, unit: int) -> Path:
    return root / read_manifest(root / "ensemble.json").members[unit].checkpoint


def test_a_flipped_byte_is_caught_by_the_digest(copy: Path) -> None:
    path = _member_file(copy, 1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # tensor data: still a valid safetensors file, only the digest differs
    path.write_bytes(bytes(data))
    error = _refused(copy, "digest")
    assert "unit 1" in str(error)


class _Trap:
    """Unpickling this creates `marker`: proof that something unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_torch_save_file_is_never_unpickled(
    copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_torch_load(*args: Any, **kw: Any) -> Any:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    marker = tmp_path / "unpickled"
    path = _member_file(copy, 0)
    torch.save({"weights": torch.zeros(2), "trap": _Trap(marker)}, path)
    _refused(copy, "torch.save|pickle")
    assert not marker.exists()


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_member_path_outside_the_folder_is_refused(copy: Path, where: str) -> None:
    manifest = read_manifest(copy / "ensemble.json")
    first = manifest.members[0]
    # An absolute path is refused even when it points at the genuine file inside the folder.
    path = "../x.safetensors" if where == "parent" else str((copy / first.checkpoint).resolve())
    if where == "parent":
        shutil.copy(copy / first.checkpoint, copy.parent / "x.safetensors")
    members = (dataclasses.replace(first, checkpoint=path), *manifest.members[1:])
    write_manifest(copy / "ensemble.json", dataclasses.replace(manifest, members=members))
    _refused(copy, "leaves the ensemble folder")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '"a string"',
        "{}",
        json.dumps({"format": "tspace-ensemble/0"}),
    ],
)
def test_a_malformed_manifest_is_refused(copy: Path, text: str) -> None:
    (copy / "ensemble.json").write_text(text)
    _refused(copy, "ensemble.json")


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("members"),
        lambda d: d["members"][0].pop("sha256"),
        lambda d: d["members"][0].update(extra=1),
        lambda d: d.update(members=[1, 2]),
        lambda d: d.update(timesteps=5),
        lambda d: d["members"][0].update(checkpoint=5),
        lambda d: d["members"][0].update(sha256=None),
        lambda d: d["members"][0].update(timesteps="ab"),
        lambda d: d.update(image_shape=["1", "8", "8"]),
        lambda d: d.update(num_classes="10"),
        lambda d: d.update(prediction_type="sample"),
        lambda d: d.update(alphas_cumprod=[0.5, 0.6, 0.7]),
        lambda d: d.update(members=d["members"][:2]),
        lambda d: d.update(members=[*d["members"], d["members"][0]]),
    ],
)
def test_a_manifest_with_broken_fields_is_refused(copy: Path, change: Any) -> None:
    data = json.loads((copy / "ensemble.json").read_text())
    change(data)
    (copy / "ensemble.json").write_text(json.dumps(data))
    _refused(copy, "not a valid ensemble manifest")


def test_a_missing_manifest_is_refused(copy: Path) -> None:
    (copy / "ensemble.json").unlink()
    _refused(copy, "does not exist")


def test_a_member_trained_on_other_states_is_refused(copy: Path) -> None:
    manifest = read_manifest(copy / "ensemble.json")
    a, b, c = manifest.members
    # Every state still has one owner, but units 0 and 1 claim each other's checkpoint.
    swapped = (
        dataclasses.replace(a, timesteps=b.timesteps),
        dataclasses.replace(b, timesteps=a.timesteps),
        c,
    )
    write_manifest(copy / "ensemble.json", dataclasses.replace(manifest, members=swapped))
    _refused(copy, "unit 0: .* trained on states")
