"""Regenerate the checked-in protobuf and gRPC code under tspace_core/proto from protos/.

Usage (from anywhere; paths are relative to the repository):

    python tools/gen_protos.py           # rewrite tspace_core/proto/tspace/... in place
    python tools/gen_protos.py --check   # exit 1 and list the files that are stale

The output depends only on the .proto files and the grpcio-tools release, which is pinned
(GRPC_TOOLS_VERSION): its gencode targets protobuf 6, and imports under protobuf 7 as well.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "tspace_core" / "proto"
PACKAGE = "tspace_core.proto"
GRPC_TOOLS_VERSION = "1.80.0"
COMMAND = "python tools/gen_protos.py"

# protoc writes imports relative to `-I protos` ("from tspace.v1 import common_pb2"); ours live
# inside the tspace_core package, so every such import gets the package prefix.
_IMPORT = re.compile(r"^from (tspace(?:\.\w+)*) import ", re.MULTILINE)
# The module name the builder gives the generated classes (their __module__).
_MODULE_NAME = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'(tspace\.[\w.]+)'")
_GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_INIT_DOC = '"""Generated protobuf and gRPC code, {package}; regenerate: {command}."""\n'


def _check_grpc_tools() -> None:
    try:
        found = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        found = "not installed"
    if found != GRPC_TOOLS_VERSION:
        raise SystemExit(
            f"gen_protos needs grpcio-tools=={GRPC_TOOLS_VERSION} (found {found}); "
            "install the dev extra: pip install -e '.[dev]'"
        )


def _protoc(out: Path) -> None:
    protos = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        ".",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    done = subprocess.run(cmd, cwd=PROTO_DIR, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"protoc failed ({done.returncode}):\n{done.stderr}")


def _rewrite(text: str) -> str:
    text = _IMPORT.sub(rf"from {PACKAGE}.\1 import ", text)
    return _MODULE_NAME.sub(rf"\1'{PACKAGE}.\2'", text)


def render() -> dict[str, bytes]:
    """Generate every file into a temporary folder; return {path relative to OUT_DIR: bytes}."""
    _check_grpc_tools()
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _protoc(out)
        for path in sorted(out.rglob("*")):
            if path.is_file():
                rel = path.relative_to(out).as_posix()
                files[rel] = _rewrite(path.read_text(encoding="utf-8")).encode("utf-8")
    packages = {"."} | {str(Path(rel).parent.as_posix()) for rel in files}
    for package in sorted(packages):
        for parent in [Path(package), *Path(package).parents]:
            dotted = ".".join([PACKAGE, *parent.parts])
            doc = _INIT_DOC.format(package=dotted, command=COMMAND)
            files.setdefault((parent / "__init__.py").as_posix(), doc.encode("utf-8"))
    return dict(sorted(files.items()))


def _managed(out_dir: Path) -> set[str]:
    """Files under out_dir that this tool owns (so a stale one left behind is found)."""
    owned = set()
    for path in out_dir.rglob("*"):
        if path.is_file() and (
            path.name == "__init__.py" or path.name.endswith(_GENERATED_SUFFIXES)
        ):
            owned.add(path.relative_to(out_dir).as_posix())
    return owned


def stale(out_dir: Path = OUT_DIR, fresh: dict[str, bytes] | None = None) -> list[str]:
    """Paths (relative to out_dir) that differ from, are missing from, or are extra to `fresh`."""
    fresh = render() if fresh is None else fresh
    wrong = [rel for rel, data in fresh.items() if _read(out_dir / rel) != data]
    extra = _managed(out_dir) - set(fresh) if out_dir.is_dir() else set()
    return sorted({*wrong, *extra})


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def write(out_dir: Path = OUT_DIR) -> list[str]:
    """Bring out_dir up to date; return the paths that changed or were removed."""
    fresh = render()
    changed = stale(out_dir, fresh)
    for rel in changed:
        path = out_dir / rel
        if rel in fresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(fresh[rel])
        else:
            path.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="list stale files and exit 1")
    args = parser.parse_args(argv)
    shown = OUT_DIR.relative_to(ROOT).as_posix()
    if args.check:
        bad = stale()
        for rel in bad:
            print(f"stale: {shown}/{rel}")
        if bad:
            print(f"generated protobuf code is out of date; run: {COMMAND}")
        return 1 if bad else 0
    for rel in write():
        print(f"updated: {shown}/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
