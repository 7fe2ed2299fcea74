"""The dependency direction of DESIGN.md: tspace_core imports neither coordinator nor worker,
and those two never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "tspace_core": {"coordinator", "worker"},
    "coordinator": {"worker"},
    "worker": {"coordinator"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_forbidden_layers(package: str) -> None:
    folder = ROOT / package
    if not folder.is_dir():
        pytest.skip(f"{package}/ does not exist yet")
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in folder.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_scanner_sees_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import worker.agent\nfrom coordinator.server import x\nfrom . import y\n")
    assert imported_packages(module) == {"worker", "coordinator"}
