#!/usr/bin/env bash
# Check that the checked-in protobuf-6 gencode imports and round-trips under protobuf 7.x.
#
# Usage: tools/check_protobuf7.sh [PROTOBUF_REQUIREMENT]   (default: "protobuf>=7,<8")
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3); it must
# have grpcio installed and this repository importable (an editable install, or run from the root).
# protobuf 7 goes into a temporary folder that shadows the installed one via PYTHONPATH, so the
# environment itself is left untouched. Exits non-zero on any failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirement="${1:-protobuf>=7,<8}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp/site" \
  "$requirement"

check='
import importlib, pkgutil, sys
import google.protobuf
from google.protobuf.internal import api_implementation

version = google.protobuf.__version__
assert version.split(".")[0] == "7", f"expected protobuf 7.x, imported {version} from {google.protobuf.__file__}"
import tspace_core.proto.tspace.v1 as v1
names = sorted(m.name for m in pkgutil.iter_modules(v1.__path__))
assert any(n.endswith("_pb2_grpc") for n in names) and any(n.endswith("_pb2") for n in names), names
modules = {n: importlib.import_module(f"{v1.__name__}.{n}") for n in names}
common, worker = modules["common_pb2"], modules["worker_pb2"]
ref = common.CheckpointRef(sha256="ab" * 32, size=7, step=3, unit=2, statement=b"{}", final=True)
sent = worker.Assignment(lease_id="l", timesteps=[0, 5, 9], alphas_cumprod=[0.9, 0.5, 0.1],
                         shards=[common.ShardRef(name="s", sha256="cd" * 32, size=1, count=1)],
                         resume_from=ref)
got = worker.Assignment.FromString(sent.SerializeToString())
assert got == sent and got.HasField("resume_from") and list(got.timesteps) == [0, 5, 9], got
assert not worker.Assignment().HasField("resume_from")
stub = modules["worker_pb2_grpc"].WorkerServiceStub
print(f"ok: protobuf {version} ({api_implementation.Type()}): {len(names)} modules, {stub.__name__}")
'
cd "$root"
for impl in upb python; do
  PYTHONPATH="$tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}" PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="$impl" \
    "$PYTHON" -W error -c "$check"
done
