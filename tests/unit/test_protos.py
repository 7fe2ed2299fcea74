"""The checked-in generated protobuf code is current, importable, and targets protobuf 6."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "tspace_core" / "proto"

pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the code")


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    return _load_tool()


@pytest.fixture(scope="module")
def fresh(tool: ModuleType) -> dict[str, bytes]:
    return tool.render()


def _generated_modules() -> list[str]:
    v1 = OUT_DIR / "tspace" / "v1"
    return sorted(f"tspace_core.proto.tspace.v1.{p.stem}" for p in v1.glob("*_pb2*.py"))


def test_checked_in_code_is_current(tool: ModuleType, fresh: dict[str, bytes]) -> None:
    bad = tool.stale(OUT_DIR, fresh)
    assert not bad, f"stale generated files {bad}; run: {tool.COMMAND}"


def test_generation_is_deterministic(tool: ModuleType, fresh: dict[str, bytes]) -> None:
    assert tool.render() == fresh


def test_covers_every_proto(fresh: dict[str, bytes]) -> None:
    protos = sorted((ROOT / "protos").rglob("*.proto"))
    assert protos
    for proto in protos:
        stem = proto.relative_to(ROOT / "protos").with_suffix("").as_posix()
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert f"{stem}{suffix}" in fresh


def test_stale_detection_names_changed_missing_and_extra(
    tool: ModuleType, fresh: dict[str, bytes], tmp_path: Path
) -> None:
    copy = tmp_path / "proto"
    for rel, data in fresh.items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    (copy / "tspace/v1/__pycache__").mkdir()
    (copy / "tspace/v1/__pycache__/worker_pb2.cpython-311.pyc").write_bytes(b"")
    assert tool.stale(copy, fresh) == []
    (copy / "tspace/v1/worker_pb2.py").write_bytes(b"# edited\n")
    (copy / "tspace/v1/admin_pb2.pyi").unlink()
    (copy / "tspace/v1/gone_pb2.py").write_text("")
    assert tool.stale(copy, fresh) == [
        "tspace/v1/admin_pb2.pyi",
        "tspace/v1/gone_pb2.py",
        "tspace/v1/worker_pb2.py",
    ]


def test_check_command_passes_on_the_checkout() -> None:
    done = subprocess.run(
        [sys.executable, "tools/gen_protos.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_imports_are_rewritten_into_the_package(fresh: dict[str, bytes]) -> None:
    for rel, data in fresh.items():
        text = data.decode()
        assert not re.search(r"^(from|import) tspace\.", text, re.MULTILINE), rel


@pytest.mark.parametrize("name", _generated_modules())
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_at_least_the_three_services_are_generated() -> None:
    names = _generated_modules()
    for proto in ("common", "worker", "admin"):
        assert f"tspace_core.proto.tspace.v1.{proto}_pb2" in names
        assert f"tspace_core.proto.tspace.v1.{proto}_pb2_grpc" in names


def test_gencode_targets_protobuf_6(fresh: dict[str, bytes]) -> None:
    # Flower pins protobuf < 7, so the gencode must not demand 7 at runtime.
    pb2 = [rel for rel in fresh if rel.endswith("_pb2.py")]
    assert pb2
    call = re.compile(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),"
    )
    for rel in pb2:
        found = call.search(fresh[rel].decode())
        assert found is not None, f"{rel} has no runtime version check"
        assert found.group(1) == "6", f"{rel} gencode targets protobuf {found.group(1)}"
