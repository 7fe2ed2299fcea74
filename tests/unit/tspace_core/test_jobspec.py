"""Tests of job specs: TOML parsing, validation messages, resolution, hashing, round trips."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import DDPMScheduler

from tspace_core.errors import SpecError, TspaceError
from tspace_core.jobspec import Job, load_job, resolve, spec_from_dict, spec_to_dict

ROOT = Path(__file__).resolve().parents[3]
DIGITS = ROOT / "examples" / "digits.toml"


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000) -> np.ndarray:
    """The oracle: diffusers' own linear schedule."""
    sched: Any = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
    )
    return sched.alphas_cumprod.double().numpy()


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def job_of(doc: dict[str, Any]) -> Job:
    return resolve(spec_from_dict(doc))


def spec_error(doc: dict[str, Any]) -> str:
    """The message of the SpecError `doc` raises; any other exception fails the test."""
    with pytest.raises(SpecError) as info:
        job_of(doc)
    assert isinstance(info.value, TspaceError)
    return str(info.value)


# ---------------------------------------------------------------------------- the example


def test_digits_example_resolves_to_ten_single_units_on_the_base_schedule() -> None:
    job = load_job(DIGITS)
    assert job.spec.name == "digits"
    assert job.latent_states.timesteps == tuple(range(99, 1000, 100))
    assert job.units == tuple((t,) for t in range(99, 1000, 100))
    oracle = ddpm_alphas_cumprod()[list(job.latent_states.timesteps)]
    np.testing.assert_allclose(job.latent_states.alphas_cumprod, oracle, rtol=1e-6, atol=0)
    for i, (t,) in enumerate(job.units):
        assert job.unit_alphas_cumprod(i) == (job.latent_states.alpha_bar(t),)
    assert job.base_dir == DIGITS.parent


def test_digits_hash_is_sha256_hex_and_stable() -> None:
    first, second = load_job(DIGITS), load_job(DIGITS)
    assert re.fullmatch(r"[0-9a-f]{64}", first.hash)
    assert first.hash == second.hash
    assert first.spec == second.spec


def test_hash_ignores_key_order_and_spelled_out_defaults(tmp_path: Path) -> None:
    raw = tomllib.loads(DIGITS.read_text())
    shuffled = {
        k: dict(reversed(list(v.items()))) if isinstance(v, dict) else v for k, v in raw.items()
    }
    shuffled = dict(reversed(list(shuffled.items())))
    assert job_of(shuffled).hash == load_job(DIGITS).hash
    # Writing every default out changes nothing: the hash covers the resolved spec.
    assert job_of(spec_to_dict(load_job(DIGITS).spec)).hash == load_job(DIGITS).hash
    assert job_of({"name": "d"}).hash == job_of(spec_to_dict(job_of({"name": "d"}).spec)).hash


# A different valid value for every field of the spec; a None default names its replacement.
CHANGES: dict[str, Any] = {
    "schedule.kind": "scaled_linear",
    "schedule.snr": "linear",
    "states.spacing": "leading",
    "states.mapping": "naive",
    "units.partition": "joint",
    "model.preset": "small",
    "model.prediction_type": "v_prediction",
    "model.kwargs": {"dropout": 0.1},
    "training.assignment": "knn",
    "training.mixed_precision": "no",
    "data.source": "other-digits",
    "data.resize": 16,
    "data.channels": 3,
}


def changed(value: Any, path: str) -> Any:
    if path in CHANGES:
        return CHANGES[path]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.5
    raise AssertionError(f"no change defined for {path} = {value!r}")


def test_hash_changes_when_any_field_changes() -> None:
    base = spec_to_dict(load_job(DIGITS).spec)
    hashes = {load_job(DIGITS).hash}
    paths = ["name"] + [f"{s}.{k}" for s, v in base.items() if isinstance(v, dict) for k in v]
    paths.remove("states.indices")  # changed together with spacing below
    paths.remove("units.groups")
    for path in paths:
        doc = copy.deepcopy(base)
        if path == "name":
            doc["name"] = "digits2"
        else:
            section, key = path.split(".")
            doc[section][key] = changed(doc[section][key], path)
        hashes.add(job_of(doc).hash)
    explicit = copy.deepcopy(base)
    explicit["states"].update(spacing="explicit", indices=[99, 999], count=None)
    hashes.add(job_of(explicit).hash)
    groups = copy.deepcopy(base)
    groups["units"].update(
        partition="explicit", groups=[[99, 199], *[[t] for t in range(299, 1000, 100)]]
    )
    hashes.add(job_of(groups).hash)
    assert len(hashes) == len(paths) + 3


# ---------------------------------------------------------------------------- bad input

SECTION_KEYS = {
    "schedule": ("num_train_timestep", "num_train_timesteps"),
    "states": ("cuont", "count"),
    "units": ("partiton", "partition"),
    "model": ("prset", "preset"),
    "training": ("batchsize", "batch_size"),
    "data": ("sorce", "source"),
}


@pytest.mark.parametrize("section", sorted(SECTION_KEYS))
def test_unknown_key_names_section_key_and_hints(section: str, tmp_path: Path) -> None:
    typo, meant = SECTION_KEYS[section]
    path = write(tmp_path, f'name = "x"\n[{section}]\n{typo} = 1\n')
    with pytest.raises(SpecError) as info:
        load_job(path)
    msg = str(info.value)
    assert f"{section}.{typo}" in msg
    assert f"did you mean {meant!r}" in msg
    assert msg.startswith(f"{path}: {section}.{typo}")


def test_unknown_top_level_section() -> None:
    msg = spec_error({"name": "x", "schedul": {"kind": "linear"}})
    assert msg.startswith("schedul:")
    assert "did you mean 'schedule'" in msg
    msg = spec_error({"name": "x", "zzz": 1})
    assert msg.startswith("zzz:") and "did you" not in msg


def test_missing_name() -> None:
    assert spec_error({"states": {"count": 3}}).startswith("name: missing")


@pytest.mark.parametrize("name", ["../x", "a b", "", "-x", "x/y", "a" * 65, "é"])
def test_bad_name_characters(name: str) -> None:
    msg = spec_error({"name": name})
    assert msg.startswith("name:") and repr(name) in msg


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('[training]\nsteps = "3"', "training.steps"),
        ("[training]\nsteps = true", "training.steps"),
        ("[training]\nsteps = 1.5", "training.steps"),
        ("[training]\nlr = [0.1]", "training.lr"),
        ("[training]\ncompile = 1", "training.compile"),
        ('[states]\ncount = "10"', "states.count"),
        ("[schedule]\nnum_train_timesteps = 1000.0", "schedule.num_train_timesteps"),
        ('[schedule]\nbeta_end = "0.02"', "schedule.beta_end"),
        ("[data]\nsource = 3", "data.source"),
        ("[model]\nkwargs = 3", "model.kwargs"),
        ('[states]\nspacing = "explicit"\nindices = 5', "states.indices"),
        ('[states]\nspacing = "explicit"\nindices = [5, "6"]', "states.indices[1]"),
    ],
)
def test_wrong_types_name_the_field(toml: str, field: str, tmp_path: Path) -> None:
    path = write(tmp_path, f'name = "x"\n{toml}\n')
    with pytest.raises(SpecError) as info:
        load_job(path)
    assert str(info.value).startswith(f"{path}: {field}:")


@pytest.mark.parametrize(
    ("section", "key", "allowed"),
    [
        ("schedule", "kind", ["linear", "scaled_linear", "squaredcos_cap_v2", "tv_snr"]),
        ("schedule", "snr", ["ot_fm", "linear", "scaled_linear", "squaredcos_cap_v2"]),
        ("states", "spacing", ["trailing", "leading", "linspace", "explicit"]),
        ("states", "mapping", ["base", "naive"]),
    ],
)
def test_literal_fields_list_allowed_values(section: str, key: str, allowed: list[str]) -> None:
    for bad in ("cosine", True, 1):
        msg = spec_error({"name": "x", section: {key: bad}})
        assert msg.startswith(f"{section}.{key}:")
        assert all(repr(a) in msg for a in allowed)


def test_string_choices_list_allowed_values() -> None:
    msg = spec_error({"name": "x", "training": {"assignment": "hungarian"}})
    assert msg.startswith("training.assignment") and "'knn'" in msg
    msg = spec_error({"name": "x", "model": {"preset": "huge"}})
    assert msg.startswith("model.preset") and "'tiny'" in msg and "'base'" in msg
    msg = spec_error({"name": "x", "units": {"partition": "stages"}})
    assert msg.startswith("units.partition") and "stages:K" in msg


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "x"\n[states\ncount = 3\n')
    with pytest.raises(SpecError) as info:
        load_job(path)
    assert str(path) in str(info.value) and "TOML" in str(info.value)


def test_unreadable_job_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_job(tmp_path / "missing.toml")
    with pytest.raises(SpecError, match="cannot be read"):
        load_job(tmp_path)  # a folder
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(SpecError, match="cannot be read"):
        load_job(binary)


# ---------------------------------------------------------------------------- partitions


def test_joint_and_stages_partitions(tmp_path: Path) -> None:
    joint = load_job(write(tmp_path, 'name = "j"\n[units]\npartition = "joint"\n', "j.toml"))
    assert joint.units == (tuple(range(99, 1000, 100)),)
    staged = load_job(write(tmp_path, 'name = "s"\n[units]\npartition = "stages:3"\n', "s.toml"))
    assert len(staged.units) == 3
    assert sum(staged.units, ()) == staged.latent_states.timesteps  # contiguous, in order
    sizes = [len(u) for u in staged.units]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_explicit_groups_are_sorted_cleanest_first(tmp_path: Path) -> None:
    text = """name = "g"
[states]
count = 4
[units]
partition = "explicit"
groups = [[999, 499], [249], [749]]
"""
    job = load_job(write(tmp_path, text))
    assert job.latent_states.timesteps == (249, 499, 749, 999)
    assert job.units == ((249,), (499, 999), (749,))
    assert job.unit_alphas_cumprod(1) == (
        job.latent_states.alpha_bar(499),
        job.latent_states.alpha_bar(999),
    )


def test_explicit_indices(tmp_path: Path) -> None:
    # TOML has no null, so a file must spell count out (its default is 10, not None).
    text = 'name = "e"\n[states]\nspacing = "explicit"\nindices = [999, 5, 500]\ncount = 3\n'
    job = load_job(write(tmp_path, text))
    assert job.spec.states.indices == (999, 5, 500)  # stored as given, used sorted
    assert job.latent_states.timesteps == (5, 500, 999)
    oracle = ddpm_alphas_cumprod()[[5, 500, 999]]
    np.testing.assert_allclose(job.latent_states.alphas_cumprod, oracle, rtol=1e-6, atol=0)
    assert job.units == ((5,), (500,), (999,))


def test_naive_mapping_uses_a_fresh_short_schedule(tmp_path: Path) -> None:
    text = 'name = "n"\n[states]\ncount = 10\nmapping = "naive"\n'
    job = load_job(write(tmp_path, text))
    assert job.latent_states.timesteps == tuple(range(99, 1000, 100))
    np.testing.assert_allclose(
        job.latent_states.alphas_cumprod, ddpm_alphas_cumprod(10), rtol=1e-6, atol=0
    )
    base = load_job(DIGITS).latent_states.alphas_cumprod
    assert job.latent_states.alphas_cumprod[0] > base[0]  # the failure case: far too clean


# ---------------------------------------------------------------------------- serialisation


def test_to_json_is_aligned_and_plain() -> None:
    job = job_of({"name": "x", "states": {"count": 6}, "units": {"partition": "stages:2"}})
    doc = json.loads(json.dumps(job.to_json()))
    assert set(doc) >= {"name", "job_hash", "latent_states", "alphas_cumprod", "units", "spec"}
    assert doc["latent_states"] == sorted(doc["latent_states"]) == list(job.latent_states.timesteps)
    assert len(set(doc["latent_states"])) == 6
    assert doc["alphas_cumprod"] == [job.latent_states.alpha_bar(t) for t in doc["latent_states"]]
    assert all(
        b < a for a, b in zip(doc["alphas_cumprod"], doc["alphas_cumprod"][1:], strict=False)
    )
    assert doc["units"] == [list(u) for u in job.units] and isinstance(doc["units"][0], list)
    assert doc["job_hash"] == job.hash


@pytest.mark.parametrize(
    "doc",
    [
        {"name": "plain"},
        {
            "name": "every-section",
            "schedule": {"kind": "tv_snr", "snr": "ot_fm", "num_train_timesteps": 500},
            "states": {"spacing": "explicit", "indices": [400, 10, 200], "count": None},
            "units": {"partition": "explicit", "groups": [[10, 400], [200]]},
            "model": {
                "preset": "tiny",
                "class_conditional": True,
                "kwargs": {"block_out_channels": [16, 32]},
            },
            "training": {"steps": 7, "assignment": "knn", "knn_k": 8, "compile": True},
            "data": {"source": "some/folder", "resize": 16, "channels": 3},
        },
    ],
)
def test_round_trip_through_dict_and_json(doc: dict[str, Any]) -> None:
    job = job_of(doc)
    again = spec_from_dict(json.loads(json.dumps(spec_to_dict(job.spec))))
    assert again == job.spec
    assert resolve(again).hash == job.hash
    assert spec_to_dict(again) == spec_to_dict(job.spec)


def test_job_json_spec_reloads_to_the_same_job() -> None:
    job = load_job(DIGITS)
    again = job_of(job.to_json()["spec"])
    assert again.hash == job.hash and again.units == job.units


# ---------------------------------------------------------------------------- fuzz-lite

HUGE = 10**30

MALFORMED: list[tuple[dict[str, Any], str]] = [
    ({"name": "x", "schedule": "linear"}, "schedule"),
    ({"name": "x", "states": [1, 2, 3]}, "states"),
    ({"name": "x", "training": {"lr": {"value": 0.1}}}, "training.lr"),
    ({"name": "x", "model": {"kwargs": [1]}}, "model.kwargs"),
    ({"name": None}, "name"),
    ({"name": ["x"]}, "name"),
    ({"name": "x", "states": {"count": 0}}, "states.count"),
    ({"name": "x", "training": {"steps": None}}, "training.steps"),
    ({"name": "x", "data": {"source": None}}, "data.source"),
    ({"name": "x", "data": {"source": "  "}}, "data.source"),
    ({"name": "x", "states": {"count": HUGE}}, "states"),
    ({"name": "x", "data": {"resize": HUGE}}, "data.resize"),
    ({"name": "x", "data": {"channels": 2}}, "data.channels"),
    ({"name": "x", "training": {"steps": -3}}, "training.steps"),
    ({"name": "x", "training": {"steps": 0}}, "training.steps"),
    ({"name": "x", "training": {"seed": -1}}, "training.seed"),
    ({"name": "x", "training": {"lr": 0}}, "training.lr"),
    ({"name": "x", "training": {"ema_decay": 1}}, "training.ema_decay"),
    ({"name": "x", "training": {"batch_size": 0}}, "training.batch_size"),
    ({"name": "x", "states": {"count": 1001}}, "states"),
    ({"name": "x", "schedule": {"num_train_timesteps": 5}, "states": {"count": 6}}, "states"),
    ({"name": "x", "states": {"spacing": "explicit", "indices": [5, 5, 7]}}, "states"),
    ({"name": "x", "states": {"spacing": "explicit", "indices": [1000]}}, "states"),
    ({"name": "x", "states": {"spacing": "explicit", "indices": [-1, 3]}}, "states"),
    ({"name": "x", "states": {"spacing": "explicit", "indices": []}}, "states"),
    ({"name": "x", "states": {"spacing": "explicit"}}, "states"),
    ({"name": "x", "states": {"indices": [1, 2]}}, "states.indices"),
    (
        {"name": "x", "states": {"spacing": "explicit", "indices": [1, 2], "count": 3}},
        "states.count",
    ),
    ({"name": "x", "states": {"mapping": "naive", "count": 1}}, "states"),
    ({"name": "x", "units": {"partition": "stages:0"}}, "units.partition"),
    ({"name": "x", "units": {"partition": "stages:11"}}, "units"),
    ({"name": "x", "units": {"groups": [[99]]}}, "units.groups"),
    ({"name": "x", "units": {"partition": "explicit", "groups": [[99]]}}, "units"),
    ({"name": "x", "units": {"partition": "explicit", "groups": [[99], [99]]}}, "units"),
    ({"name": "x", "units": {"partition": "explicit", "groups": [[]]}}, "units.groups"),
    ({"name": "x", "schedule": {"num_train_timesteps": 1}}, "schedule.num_train_timesteps"),
    ({"name": "x", "schedule": {"beta_start": 0.02, "beta_end": 0.01}}, "schedule.beta_start"),
    ({"name": "x", "schedule": {"beta_start": 0.5, "beta_end": 0.9999}}, "schedule"),
    ({"name": "x", "schedule": {"kind": "tv_snr", "tv_exponent": 1.0}}, "schedule"),
    ({"name": "x", "model": {"kwargs": {"in_channels": 3}}}, "model.kwargs"),
    ({"name": "x", "training": {"mixed_precision": "fp16"}}, "training.mixed_precision"),
]


def test_fuzz_lite_every_malformed_document_is_a_named_spec_error() -> None:
    for doc, field in MALFORMED:
        msg = spec_error(doc)
        assert msg.startswith(field), (doc, msg)


def test_fuzz_lite_through_toml_files_prefixes_the_file(tmp_path: Path) -> None:
    # The documents TOML can express (no None) raise the same message, after the file name.
    for i, (doc, field) in enumerate(MALFORMED):
        if "None" in repr(doc):
            continue
        path = tmp_path / f"job{i}.toml"
        path.write_text(toml_of(doc))
        with pytest.raises(SpecError) as info:
            load_job(path)
        assert str(info.value) == f"{path}: {spec_error(doc)}"
        assert str(info.value).startswith(f"{path}: {field}")


def toml_of(doc: dict[str, Any]) -> str:
    """A tiny TOML writer for the flat documents above (top-level scalars, then tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return repr(v)

    scalars = [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = [
        f"[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
        for k, v in doc.items()
        if isinstance(v, dict)
    ]
    return "\n".join(scalars + tables) + "\n"


def test_absurd_number_of_base_steps_is_a_spec_error() -> None:
    assert "schedule.num_train_timesteps" in spec_error(
        {"name": "x", "schedule": {"num_train_timesteps": HUGE}}
    )
