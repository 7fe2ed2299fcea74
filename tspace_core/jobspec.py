"""Job specs: TOML to frozen dataclasses, validated, resolved to states and units, hashed."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import re
import tomllib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tspace_core.data import DataConfig
from tspace_core.errors import SpecError
from tspace_core.models import ModelConfig
from tspace_core.schedules import ScheduleConfig, alphas_cumprod_of
from tspace_core.states import (
    LatentStates,
    StatesConfig,
    UnitsConfig,
    latent_states,
    partition_units,
)
from tspace_core.training import TrainConfig

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class JobSpec:
    """A job as written: a name and one config per section of the TOML file."""

    name: str
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    states: StatesConfig = dataclasses.field(default_factory=StatesConfig)
    units: UnitsConfig = dataclasses.field(default_factory=UnitsConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise SpecError(
                f"name: {self.name!r} is not allowed; use 1-64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )


SECTIONS: dict[str, type] = {
    "schedule": ScheduleConfig,
    "states": StatesConfig,
    "units": UnitsConfig,
    "model": ModelConfig,
    "training": TrainConfig,
    "data": DataConfig,
}


def _unknown_key(where: str, key: str, allowed: list[str]) -> SpecError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return SpecError(f"{where}{key}: unknown key{hint}; allowed: {', '.join(allowed)}")


def _kind(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, "a list" if typing.get_origin(tp) is tuple else "a table")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (as TOML or JSON gives it) as type `tp`, or a SpecError naming `where`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise SpecError(f"{where}: {value!r} is not allowed; use one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arm in arms:
            try:
                return _coerce(value, arm, where)
            except SpecError as exc:
                errors.append(str(exc))
        raise (
            SpecError(errors[0])
            if len(errors) == 1
            else SpecError(
                f"{where}: expected {' or '.join(_kind(a) for a in arms)}, got {value!r}"
            )
        )
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise SpecError(f"{where}: expected a list, got {value!r}")
        (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported field type {tp!r} at {where}")
    if not ok:
        raise SpecError(f"{where}: expected {_kind(tp)}, got {value!r}")
    return float(value) if tp is float else value


def section_from_dict(cls: type, raw: Any, section: str) -> Any:
    """One section's dataclass from its table; every message names the field."""
    if not isinstance(raw, dict):
        raise SpecError(f"{section}: [{section}] must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in allowed:
            raise _unknown_key(f"{section}.", key, allowed)
        values[key] = _coerce(value, hints[key], f"{section}.{key}")
    try:
        return cls(**values)
    except SpecError as exc:
        # Some configs already name their section (DataConfig: "data.resize ...").
        msg = str(exc)
        raise SpecError(msg if msg.startswith(f"{section}.") else f"{section}.{msg}") from None


def spec_from_dict(raw: dict[str, Any]) -> JobSpec:
    """A validated JobSpec from a parsed TOML (or JSON) document."""
    allowed = ["name", *SECTIONS]
    for key in raw:
        if key not in allowed:
            raise _unknown_key("", key, allowed)
    if "name" not in raw:
        raise SpecError('name: missing; every job needs a name, e.g. name = "digits"')
    sections = {k: section_from_dict(cls, raw.get(k, {}), k) for k, cls in SECTIONS.items()}
    return JobSpec(name=_coerce(raw["name"], str, "name"), **sections)


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """Every field, defaults included, as plain JSON-able data."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


@dataclass(frozen=True)
class Job:
    """A resolved job: the spec, its latent states and its units, and where it was read from."""

    spec: JobSpec
    latent_states: LatentStates
    units: tuple[tuple[int, ...], ...]
    base_dir: Path | None = None

    @property
    def hash(self) -> str:
        canonical = json.dumps(spec_to_dict(self.spec), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def unit_alphas_cumprod(self, unit: int) -> tuple[float, ...]:
        return tuple(self.latent_states.alpha_bar(t) for t in self.units[unit])

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "job_hash": self.hash,
            "latent_states": list(self.latent_states.timesteps),
            "alphas_cumprod": list(self.latent_states.alphas_cumprod),
            "units": [list(u) for u in self.units],
            "spec": spec_to_dict(self.spec),
        }


@contextlib.contextmanager
def _section(name: str) -> Iterator[None]:
    """Re-raise a SpecError with `name` first, unless its message already starts with it."""
    try:
        yield
    except SpecError as exc:
        msg = str(exc)
        raise SpecError(msg if msg.startswith(name) else f"{name}: {msg}") from None


def resolve(spec: JobSpec, base_dir: Path | None = None) -> Job:
    # Cross-field checks (usable schedule, S <= T, distinct states, groups) run here, not in
    # the configs; each error names the section it concerns.
    with _section("schedule"):
        alphas_cumprod_of(spec.schedule)
    with _section("states"):
        states = latent_states(spec.schedule, spec.states)
    with _section("units"):
        units = partition_units(states.timesteps, spec.units)
    return Job(spec=spec, latent_states=states, units=units, base_dir=base_dir)


def load_job(path: str | Path) -> Job:
    """Read, validate and resolve a job file; every problem is a SpecError naming the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"job file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"job file {path} cannot be read: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path} is not valid TOML: {exc}") from None
    try:
        return resolve(spec_from_dict(raw), base_dir=path.absolute().parent)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
