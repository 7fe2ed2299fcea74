"""tspace never unpickles: no module imports a pickle library or calls a loader that unpickles,
checked statically on the source (with `ast`) and at run time (a checkpoint, a trainer state,
data shards and an npz file round-trip with every unpickler rigged to trip)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tspace_core", "coordinator", "worker")
GENERATED = ROOT / "tspace_core" / "proto"

# Importing any of these is refused outright: each exists to (un)pickle.
FORBIDDEN_MODULES = frozenset(
    {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "copyreg"}
)
# Calls (and references) that unpickle, by their fully qualified name.
FORBIDDEN_CALLS = frozenset(
    {
        "torch.load",
        "torch.serialization.load",
        "torch.jit.load",
        "torch.hub.load_state_dict_from_url",
        "pandas.read_pickle",
    }
)
# numpy.load unpickles object arrays unless told not to, so it must say allow_pickle=False.
NUMPY_LOAD = "numpy.load"
DYNAMIC_IMPORTS = frozenset({"__import__", "importlib.import_module"})


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _forbidden_module(name: str) -> bool:
    return name.split(".")[0] in FORBIDDEN_MODULES


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the qualified name it was imported as, for every import in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _qualified(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The fully qualified name `node` (a name or attribute chain) refers to, if imported."""
    parts = _dotted(node)
    if parts is None:
        return None
    head = aliases.get(parts[0], parts[0] if parts[0] == "__import__" else None)
    if head is None:
        return None
    return ".".join([head, *parts[1:]])


def _passes_allow_pickle_false(call: ast.Call) -> bool:
    return any(
        kw.arg == "allow_pickle" and isinstance(kw.value, ast.Constant) and kw.value.value is False
        for kw in call.keywords
    )


def pickle_findings(source: str, path: str = "<string>") -> list[Finding]:
    """Every way `source` could unpickle, as file:line findings."""
    tree = ast.parse(source, filename=path)
    aliases = _aliases(tree)
    found: list[Finding] = []
    allowed: set[int] = set()  # numpy.load nodes called with allow_pickle=False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _forbidden_module(alias.name):
                    found.append(Finding(path, node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _forbidden_module(node.module):
                found.append(Finding(path, node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            name = _qualified(node.func, aliases)
            if name == NUMPY_LOAD and _passes_allow_pickle_false(node):
                allowed.add(id(node.func))
            target = node.args[0] if node.args else None
            if (
                name in DYNAMIC_IMPORTS
                and isinstance(target, ast.Constant)
                and isinstance(target.value, str)
                and _forbidden_module(target.value)
            ):
                found.append(Finding(path, node.lineno, f"{name}({target.value!r})"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Name | ast.Attribute) or id(node) in allowed:
            continue
        name = _qualified(node, aliases)
        if name in FORBIDDEN_CALLS:
            found.append(Finding(path, node.lineno, f"{name} unpickles"))
        elif name == NUMPY_LOAD:
            found.append(Finding(path, node.lineno, "numpy.load without allow_pickle=False"))
    return sorted(set(found), key=lambda f: (f.line, f.what))


def project_sources() -> list[Path]:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    return [p for p in files if not p.is_relative_to(GENERATED)]


# --- static: the source ---


def test_no_module_of_the_project_unpickles() -> None:
    sources = project_sources()
    assert len(sources) > 50, "the scan found too few modules; is ROOT right?"
    findings = [
        str(f)
        for path in sources
        for f in pickle_findings(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    ]
    assert not findings, "code that can unpickle:\n" + "\n".join(findings)


SNIPPETS = [
    ("import pickle\n", "import pickle"),
    ("import os, pickle as p\n", "import pickle"),
    ("import cPickle\n", "import cPickle"),
    ("import _pickle\n", "import _pickle"),
    ("import dill\n", "import dill"),
    ("import joblib\n", "import joblib"),
    ("import shelve\n", "import shelve"),
    ("import copyreg\n", "import copyreg"),
    ("import cloudpickle\n", "import cloudpickle"),
    ("from pickle import loads\n", "from pickle import"),
    ("from joblib.numpy_pickle import load\n", "from joblib.numpy_pickle import"),
    ("import torch\nx = torch.load('f')\n", "torch.load unpickles"),
    ("import torch\nx = torch.load('f', weights_only=True)\n", "torch.load unpickles"),
    ("import torch as t\nx = t.load('f')\n", "torch.load unpickles"),
    ("from torch import load\nx = load('f')\n", "torch.load unpickles"),
    ("from torch import load as l\nx = l('f')\n", "torch.load unpickles"),
    ("import torch\nf = torch.load\n", "torch.load unpickles"),
    ("import torch\nx = torch.serialization.load('f')\n", "torch.serialization.load"),
    ("import torch.serialization\nx = torch.serialization.load('f')\n", "serialization.load"),
    ("from torch.serialization import load\nx = load('f')\n", "torch.serialization.load"),
    ("from torch import serialization as s\nx = s.load('f')\n", "torch.serialization.load"),
    ("import torch\nm = torch.jit.load('f')\n", "torch.jit.load"),
    ("import numpy as np\na = np.load('f')\n", "numpy.load without allow_pickle=False"),
    ("import numpy\na = numpy.load('f')\n", "numpy.load without allow_pickle=False"),
    ("import numpy as np\na = np.load('f', allow_pickle=True)\n", "numpy.load without"),
    ("import numpy as np\na = np.load('f', allow_pickle=flag)\n", "numpy.load without"),
    ("import numpy as np\na = np.load('f', **{'allow_pickle': False})\n", "numpy.load without"),
    ("from numpy import load\na = load('f')\n", "numpy.load without"),
    ("import pandas as pd\ndf = pd.read_pickle('f')\n", "pandas.read_pickle"),
    ("from pandas import read_pickle\ndf = read_pickle('f')\n", "pandas.read_pickle"),
    ("m = __import__('pickle')\n", "__import__('pickle')"),
    ("import importlib\nm = importlib.import_module('dill')\n", "import_module('dill')"),
]


@pytest.mark.parametrize(("source", "expected"), SNIPPETS)
def test_the_checker_sees_each_way_to_unpickle(source: str, expected: str) -> None:
    findings = pickle_findings(source, "m.py")
    assert findings, f"not detected: {source!r}"
    assert any(expected in f.what for f in findings), [str(f) for f in findings]
    last_line = source.rstrip("\n").count("\n") + 1
    assert all(f.path == "m.py" and 1 <= f.line <= last_line for f in findings)


@pytest.mark.parametrize(
    "source",
    [
        "import numpy as np\na = np.load('f', allow_pickle=False)\n",
        "import numpy\nwith numpy.load('f', mmap_mode='r', allow_pickle=False) as z:\n    pass\n",
        "import safetensors.torch\nt = safetensors.torch.load(b'')\n",
        "from safetensors.torch import load\nt = load(b'')\n",
        "import json\nx = json.load(open('f'))\n",
        "import torch\nm = torch.nn.Linear(1, 1)\nm.load_state_dict({})\n",
        "def load(x):\n    return x\n\nload(1)\n",
        "import pickletools_doc\n",
        "# import pickle\ns = 'torch.load'\n",
    ],
)
def test_the_checker_lets_safe_code_pass(source: str) -> None:
    assert pickle_findings(source) == []


def test_findings_name_file_and_line() -> None:
    source = "import json\n\nimport numpy as np\n\nx = np.load('a.npy')\n"
    assert [str(f) for f in pickle_findings(source, "pkg/mod.py")] == [
        "pkg/mod.py:5: numpy.load without allow_pickle=False"
    ]


# --- at run time: every unpickler trips ---

RUNTIME_SCRIPT = textwrap.dedent(
    r"""
    import importlib, json, pickle, _pickle, pkgutil, sys, tempfile
    from pathlib import Path

    calls = []

    def tripwire(name, original):
        def trip(*args, **kwargs):
            calls.append(name)
            raise RuntimeError(f"{name} was called")
        trip.original = original
        return trip

    class TrippedUnpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            calls.append("pickle.Unpickler")
            raise RuntimeError("pickle.Unpickler was used")

    for module in (pickle, _pickle):
        for name in ("load", "loads"):
            setattr(module, name, tripwire(f"pickle.{name}", getattr(module, name)))
        module.Unpickler = TrippedUnpickler
    sys.addaudithook(
        lambda event, args: calls.append(event) if event == "pickle.find_class" else None
    )

    import numpy
    import torch
    import torch._weights_only_unpickler as wou
    import torch.serialization

    torch.load = tripwire("torch.load", torch.load)
    torch.serialization.load = tripwire("torch.serialization.load", torch.serialization.load)
    wou.load = tripwire("torch weights-only load", wou.load)

    class TrippedWeightsOnlyUnpickler(wou.Unpickler):
        def __init__(self, *args, **kwargs):
            calls.append("torch weights-only Unpickler")
            raise RuntimeError("torch's weights-only Unpickler was used")

    wou.Unpickler = TrippedWeightsOnlyUnpickler

    imported, failed = [], []
    skip = {"tspace_core.catalogue.migrations.env"}  # runs inside alembic only
    for package in ("tspace_core", "coordinator", "worker"):
        imported.append(importlib.import_module(package).__name__)
        root = sys.modules[package]
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if info.name.endswith(".__main__") or info.name in skip:
                continue
            try:
                importlib.import_module(info.name)
                imported.append(info.name)
            except Exception as exc:
                failed.append(f"{info.name}: {exc!r}")

    from tspace_core.checkpoint import load_checkpoint, read_meta, save_checkpoint
    from tspace_core.data import load_dataset, load_shards, pack_shards
    from tspace_core.images import load_npz, save_npz
    from tspace_core.jobspec import resolve, spec_from_dict
    from tspace_core.runner import make_trainer, model_config_for, save_unit_checkpoint

    tmp = Path(tempfile.mkdtemp())
    exercised = []

    # A checkpoint written by tspace, read back whole and by its header.
    path = tmp / "plain.safetensors"
    digest = save_checkpoint(path, {"w": torch.arange(6.0).reshape(2, 3)}, {"step": 3})
    ckpt = load_checkpoint(path)
    assert ckpt.sha256 == digest and ckpt.meta == {"step": 3}, ckpt
    assert torch.equal(ckpt.tensors["w"], torch.arange(6.0).reshape(2, 3))
    assert read_meta(path) == {"step": 3}
    exercised.append("checkpoint")

    # A unit's training state (model, EMA, optimizer, RNG) saved and resumed.
    job = resolve(spec_from_dict({
        "name": "tiny", "states": {"count": 3}, "units": {"partition": "single"},
        "model": {"preset": "tiny"},
        "training": {"steps": 2, "batch_size": 8, "checkpoint_every": 1},
        "data": {"source": "digits"},
    }))
    data = load_dataset(job.spec.data)
    config = model_config_for(job, data)
    trainer = make_trainer(job, 0, data, config, "cpu")
    trainer.train_step()
    unit_path = tmp / "unit.safetensors"
    save_unit_checkpoint(trainer, job, 0, data, config, unit_path)
    resumed = make_trainer(job, 0, data, config, "cpu")
    unit_ckpt = load_checkpoint(unit_path)
    resumed.load_checkpoint_state(unit_ckpt.tensors, unit_ckpt.meta)
    assert resumed.step == trainer.step == 1
    exercised.append("unit checkpoint")

    # Data shards and an npz of samples.
    manifest = pack_shards(data, tmp / "shards", 2)
    assert len(load_shards(manifest)) == len(data)
    exercised.append("shards")
    images = numpy.zeros((2, 1, 4, 4), dtype=numpy.uint8)
    save_npz(tmp / "s.npz", images, numpy.array([1, 2]))
    assert load_npz(tmp / "s.npz")[1].tolist() == [1, 2]
    exercised.append("npz")

    clean = list(calls)
    if "--control" in sys.argv:
        # Each tripwire must fire when something does unpickle (after the real run above).
        torch.save({"w": torch.zeros(1)}, tmp / "t.pt")
        numpy.save(tmp / "o.npy", numpy.array([{"a": 1}], dtype=object), allow_pickle=True)
        attempts = [
            lambda: pickle.loads(pickle.dumps(1)),
            # Past the tripwire: the audit hook still sees the unpickler look up a class.
            lambda: pickle.loads.original(pickle.dumps(Path("x"))),
            lambda: pickle.load(open(tmp / "t.pt", "rb")),
            lambda: pickle.Unpickler(open(tmp / "t.pt", "rb")).load(),
            lambda: torch.load(tmp / "t.pt"),
            lambda: torch.serialization.load(tmp / "t.pt", weights_only=False),
            lambda: torch.serialization.load.original(tmp / "t.pt", weights_only=True),
            lambda: torch.serialization.load.original(tmp / "t.pt", weights_only=False),
            lambda: numpy.load(tmp / "o.npy", allow_pickle=True),
        ]
        for attempt in attempts:
            try:
                attempt()
            except Exception:
                pass

    print(json.dumps({
        "calls": clean,
        "control": calls[len(clean):],
        "imported": imported,
        "failed": failed,
        "exercised": exercised,
    }))
    """
)


@pytest.fixture(scope="module")
def runtime_report() -> dict[str, list[str]]:
    """One fresh interpreter: rig the unpicklers, import and exercise everything, then (as the
    control) unpickle on purpose."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", RUNTIME_SCRIPT, "--control"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report: dict[str, list[str]] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def test_importing_everything_and_loading_checkpoints_never_unpickles(
    runtime_report: dict[str, list[str]],
) -> None:
    report = runtime_report
    assert report["failed"] == [], report["failed"]
    assert {"tspace_core.checkpoint", "coordinator.server", "worker.agent"} <= set(
        report["imported"]
    )
    assert report["exercised"] == ["checkpoint", "unit checkpoint", "shards", "npz"]
    assert report["calls"] == [], f"something unpickled: {report['calls']}"


def test_the_runtime_tripwires_fire(runtime_report: dict[str, list[str]]) -> None:
    calls = set(runtime_report["control"])
    expected = {
        "pickle.loads",
        "pickle.load",
        "pickle.Unpickler",
        "torch.load",
        "torch.serialization.load",
        "torch weights-only Unpickler",
        "pickle.find_class",
    }
    assert expected <= calls, f"tripwires that did not fire: {sorted(expected - calls)}"
