"""Fuzzing the coordinator's gRPC API: whatever a peer sends, the coordinator answers with a
deliberate status, keeps serving, and keeps its catalogue and blob store consistent.

Every RPC of WorkerService and AdminService, read from the generated descriptors (so an RPC added
to the protos is fuzzed without touching this file), gets

- random bytes (garbage protobuf) on the raw channel;
- random messages built field by field from its request descriptor: text with unicode, control
  characters, path traversal and SQL, very long text, huge and negative integers, NaN and
  infinities, random bytes, nested messages, maps, and values taken from the live catalogue
  (job names, lease ids, digests and their prefixes, worker and token ids);
- mutations of valid messages from a real worker's flow (registering with a real join token,
  leasing, heartbeating its real lease, uploading real and forged checkpoints under signed
  headers with fields changed, bits flipped, chunks dropped or reordered), at field and at byte
  level;

under the right credential, another service's, a revoked worker's, none or garbage.

A failure is: a status UNKNOWN or INTERNAL (an exception that escaped a handler; the server's
log traceback is shown with it), an exception in the server's log, a handler still running well
after its caller hung up, a server that stops serving, and after the run a catalogue with rows
pointing at missing rows or a unit leased twice, a registered checkpoint that no longer verifies
against its file, or a blob store file that is neither a registered checkpoint, a job shard nor
a partial upload of an active lease.

Each run is bounded by TSPACE_FUZZ_SECONDS (default 20) per catalogue backend, plus one batch
per RPC first. A long run, with the inputs of a given seed:

    TSPACE_FUZZ_SECONDS=600 TSPACE_FUZZ_SEED=1 .venv/bin/pytest -q tests/integration/test_fuzz.py

The server's state depends on timing, so a seed repeats the inputs, not always the outcome.
TSPACE_FUZZ_VERBOSE=1 (with -s) prints every call and the status it got.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import struct
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import torch
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import FlakyStrategyDefinition
from sqlalchemy import create_engine, text

from tspace_core import serde
from tspace_core.blobs import BlobStore
from tspace_core.catalogue.records import (
    LEASE_ACTIVE,
    UNIT_LEASED,
    WORKER_REVOKED,
    CheckpointRecord,
    LeaseRecord,
)
from tspace_core.checkpoint import save_checkpoint
from tspace_core.errors import TspaceError
from tspace_core.proto.tspace.v1 import admin_pb2, worker_pb2
from tspace_core.rpc import ADMIN_HEADER, CHUNK_BYTES, CREDENTIAL_HEADER
from tspace_core.signing import generate_key, public_key_bytes, sign
from tspace_core.verification import checkpoint_problems

if TYPE_CHECKING:
    from conftest import CheckpointMaker, Harness, WorkerClient

FUZZ_SECONDS = float(os.environ.get("TSPACE_FUZZ_SECONDS", "20"))
FUZZ_SEED = os.environ.get("TSPACE_FUZZ_SEED")
VERBOSE = bool(os.environ.get("TSPACE_FUZZ_VERBOSE"))  # print every call and its status
CALL_TIMEOUT_S = 2.0
SETUP_TIMEOUT_S = 30.0
BATCH_EXAMPLES = 8  # inputs per hypothesis run; runs repeat until the time is up
MAX_STREAM_READ = 4  # responses read from a server stream before hanging up
MAX_NEW_JOBS = 8  # jobs the flow creates when it runs out of work
STEPS = 4  # the harness's tiny job: training.steps
ROOT = Path(__file__).resolve().parents[2]
SERVICES = ((worker_pb2, "WorkerService"), (admin_pb2, "AdminService"))
BAD_STATUSES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
# What grpc itself answers for bytes that do not parse as the request message; checked against
# our own parse of the same bytes, so the handler was never reached.
UNPARSEABLE = "Exception deserializing request!"


# --- the API, from the descriptors ---


@dataclass(frozen=True)
class Rpc:
    service: str
    name: str
    path: str
    request: Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def label(self) -> str:
        return f"{self.service}.{self.name}"

    @property
    def message(self) -> type[Message]:
        return message_factory.GetMessageClass(self.request)


def all_rpcs() -> list[Rpc]:
    found = []
    for module, service in SERVICES:
        desc = module.DESCRIPTOR.services_by_name[service]
        for method in desc.methods:
            found.append(
                Rpc(
                    service,
                    method.name,
                    f"/{desc.full_name}/{method.name}",
                    method.input_type,
                    method.client_streaming,
                    method.server_streaming,
                )
            )
    return found


RPCS = all_rpcs()


def test_every_rpc_of_both_services_is_fuzzed() -> None:
    names = {r.label for r in RPCS}
    assert {"WorkerService.Register", "WorkerService.UploadCheckpoint", "AdminService.Status"} <= (
        names
    )
    kinds = {(r.client_streaming, r.server_streaming) for r in RPCS}
    assert {(False, False), (True, False), (False, True)} <= kinds
    for module, service in SERVICES:
        assert len(module.DESCRIPTOR.services_by_name[service].methods) == sum(
            r.service == service for r in RPCS
        )


# --- values, by field type ---

F = FieldDescriptor
INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
EDGE_INTS = (
    *(0, 1, -1, 2, 3, 4, 5, 8, 64, 255, 256, 1000, 2**20, 2**31 - 1, 2**31, 2**32),
    *(2**53, 2**53 + 1, 2**62, 2**63 - 1, 2**64 - 1, -(2**31), -(2**63)),
)
EDGE_DOUBLES = (
    *(0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, 5e-324, 1e-300, 0.05, 0.1, 1.0),
    *(2.5, 3600.0, 30 * 24 * 3600.0, 30 * 24 * 3600.0 + 1, 1e9, 1e18, 2.0**63, 1e308, -1.0),
    -1e308,
)
PROBE_STRINGS = (
    *("", " ", ".", "..", "../../etc/passwd", "/etc/passwd", "..\\..\\boot.ini", "~", "C:\\"),
    *("\x00", "a\x00b", "\n", "\r\n", "\t", "\x7f", "%s%s%n", "{}", "{0}", "$(id)", "`id`"),
    *("'; DROP TABLE jobs; --", '" OR 1=1 --', "%", "_", "*", "\\", "\u202e", "\ufeff", "é"),
    *("\U0001f600", "\uffff", "NaN", "inf", "-1", "0", "1e999", "null", "true", "[]", '{"a":1}'),
    *("0" * 64, "f" * 64, "F" * 64, "g" * 64, "0" * 63, "0" * 65, "l-" + "0" * 16, "l-", "w-"),
    *("tiny", "tiny:final", "final", "newest", "best:", "best:loss", "best:val_loss"),
    *("best:../x", "pause", "resume", "cancel", "PAUSE", "active", "site-a", "production"),
    *("a" * 64, "a" * 65, "a" * 128, "a" * 129, "a" * 257, "-" * 8),
)
LONG_SIZES = (257, 4097, 65_537, 300_001)
PROBE_BYTES = (
    *(b"", b"\x00", b"\x00" * 32, b"\xff" * 32, b"\x01" * 31, b"\x01" * 33, b"\x00" * 64),
    *(b"{}", b'{"format":"tspace-statement/1"}', b"\x80\x04K\x01.", b"PK\x03\x04"),
    b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n",
)
MAX_DEPTH = 3


@dataclass
class Live:
    """Values the catalogue holds now, so random requests also name things that exist."""

    strings: list[str] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    ensembles: list[str] = field(default_factory=list)


def pick(data: st.DataObject, values: Sequence[Any], default: Any = None) -> Any:
    """One of `values` (which depend on the server's state) by an index drawn from a fixed
    range, so that what is drawn does not depend on that state."""
    index = data.draw(st.integers(0, 2**16 - 1))
    return values[index % len(values)] if values else default


def between(data: st.DataObject, low: int, high: int) -> int:
    """An integer in [low, high], bounds that depend on the server's state, drawn as `pick`."""
    return low + data.draw(st.integers(0, 2**16 - 1)) % (high - low + 1)


def string_value(data: st.DataObject, live: Live) -> str:
    value = pick(data, live.strings, "tiny")
    choices = [
        st.just(value),
        st.sampled_from(
            [
                *(value.upper(), value[:-1], value[1:], value[:8], value + "0", " " + value),
                *(value + "\x00", value + "/../x"),
            ]
        ),
        st.sampled_from(PROBE_STRINGS),
        st.text(max_size=24),
        st.builds(
            lambda ch, n: ch * n,
            st.sampled_from(["a", "0", "é", "\U0001f600", "/", "\x00"]),
            st.sampled_from(LONG_SIZES),
        ),
    ]
    return str(data.draw(st.one_of(choices)))


def bytes_value(data: st.DataObject, live: Live) -> bytes:
    choices = [
        st.binary(max_size=96),
        st.sampled_from(PROBE_BYTES),
        st.builds(
            lambda b, n: b * n, st.sampled_from([b"\x00", b"A"]), st.sampled_from(LONG_SIZES)
        ),
    ]
    choices.insert(0, st.just(pick(data, live.blobs, b"")))
    return bytes(data.draw(st.one_of(choices)))


def scalar_value(data: st.DataObject, fd: FieldDescriptor, live: Live) -> Any:
    kind = fd.type
    if kind in INT_RANGES:
        low, high = INT_RANGES[kind]
        edges = [v for v in EDGE_INTS if low <= v <= high]
        return data.draw(st.one_of(st.sampled_from(edges), st.integers(low, high)))
    if kind == F.TYPE_DOUBLE:
        return data.draw(st.one_of(st.sampled_from(EDGE_DOUBLES), st.floats()))
    if kind == F.TYPE_FLOAT:
        edges32 = [v for v in EDGE_DOUBLES if not math.isfinite(v) or abs(v) < 3e38]
        return data.draw(st.one_of(st.sampled_from(edges32), st.floats(width=32)))
    if kind == F.TYPE_BOOL:
        return data.draw(st.booleans())
    if kind == F.TYPE_STRING:
        return string_value(data, live)
    if kind == F.TYPE_BYTES:
        return bytes_value(data, live)
    if kind == F.TYPE_ENUM:
        numbers = [v.number for v in fd.enum_type.values]
        return data.draw(st.one_of(st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1)))
    raise AssertionError(f"no strategy for field {fd.full_name} of type {kind}")


def is_map(fd: FieldDescriptor) -> bool:
    return fd.type == F.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def is_repeated(fd: FieldDescriptor) -> bool:
    return bool(fd.is_repeated)


def set_random(
    msg: Message, fd: FieldDescriptor, data: st.DataObject, live: Live, depth: int
) -> None:
    """Give field `fd` of `msg` a random value (a few for repeated fields and maps)."""
    msg.ClearField(fd.name)
    target = getattr(msg, fd.name)
    if is_map(fd):
        key_fd, value_fd = (fd.message_type.fields_by_name[n] for n in ("key", "value"))
        for _ in range(data.draw(st.integers(0, 4))):
            key = scalar_value(data, key_fd, live)
            if value_fd.type == F.TYPE_MESSAGE:
                target[key].CopyFrom(random_message(data, value_fd.message_type, live, depth + 1))
            else:
                target[key] = scalar_value(data, value_fd, live)
    elif is_repeated(fd):
        for _ in range(data.draw(st.integers(0, 5))):
            if fd.type == F.TYPE_MESSAGE:
                target.add().CopyFrom(random_message(data, fd.message_type, live, depth + 1))
            else:
                target.append(scalar_value(data, fd, live))
    elif fd.type == F.TYPE_MESSAGE:
        target.CopyFrom(random_message(data, fd.message_type, live, depth + 1))
    else:
        setattr(msg, fd.name, scalar_value(data, fd, live))


def random_message(data: st.DataObject, desc: Descriptor, live: Live, depth: int = 0) -> Message:
    msg = message_factory.GetMessageClass(desc)()
    for fd in desc.fields:
        if depth < MAX_DEPTH and data.draw(st.booleans()):
            set_random(msg, fd, data, live, depth)
    return msg


def _fields(msg: Message) -> list[tuple[Message, FieldDescriptor]]:
    """Every field of `msg` and of its set submessages, as (owner, field)."""
    found = [(msg, fd) for fd in msg.DESCRIPTOR.fields]
    for fd, value in msg.ListFields():
        if fd.type == F.TYPE_MESSAGE and not is_repeated(fd):
            found.extend(_fields(value))
    return found


def tweak(data: st.DataObject, value: Any) -> Any:
    """A near miss of a valid scalar."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return data.draw(st.sampled_from([value + 1, value - 1, -value, value * 2**31, 2**63 - 1]))
    if isinstance(value, float):
        return data.draw(st.sampled_from([-value, value * 1e300, math.nan, math.inf, 0.0]))
    if isinstance(value, str):
        return data.draw(
            st.sampled_from(
                [
                    *(value * 2, value[:-1], value[1:], value.upper(), value + "\x00"),
                    *("../" + value, value[::-1], value[:300] * 1000, value + "é", value[:1]),
                ]
            )
        )
    if isinstance(value, bytes):
        return flip_bits(data, value) if value else b"\x00"
    return value


def mutate_message(data: st.DataObject, msg: Message, live: Live) -> Message:
    """`msg` with one to three fields set to random values, near misses, or cleared."""
    out = type(msg)()
    out.CopyFrom(msg)
    for _ in range(data.draw(st.integers(1, 3))):
        fields = _fields(out)
        if not fields:
            break
        owner, fd = pick(data, fields)
        how = data.draw(st.sampled_from(["random", "tweak", "clear"]))
        if how == "clear":
            owner.ClearField(fd.name)
        elif how == "tweak" and not is_repeated(fd) and fd.type != F.TYPE_MESSAGE:
            try:
                setattr(owner, fd.name, tweak(data, getattr(owner, fd.name)))
            except (ValueError, TypeError):  # out of the field's range
                set_random(owner, fd, data, live, MAX_DEPTH - 1)
        else:
            set_random(owner, fd, data, live, MAX_DEPTH - 1)
    return out


def flip_bits(data: st.DataObject, raw: bytes) -> bytes:
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = between(data, 0, len(out) - 1)
        out[i] ^= 1 << data.draw(st.integers(0, 7))
    return bytes(out)


def mutate_bytes(data: st.DataObject, raw: bytes) -> bytes:
    how = data.draw(st.sampled_from(["flip", "truncate", "insert", "duplicate"]))
    if how == "flip" and raw:
        return flip_bits(data, raw)
    if how == "truncate":
        return raw[: between(data, 0, max(len(raw) - 1, 0))]
    at = between(data, 0, len(raw))
    if how == "duplicate":
        return raw[:at] + raw[at // 2 : at] + raw[at:]
    return raw[:at] + data.draw(st.binary(min_size=1, max_size=16)) + raw[at:]


def shown(item: Message | bytes) -> str:
    if isinstance(item, bytes):
        return f"<{len(item)} raw bytes {item[:48]!r}>"
    body = text_format.MessageToString(item, as_one_line=True, as_utf8=True)
    if len(body) > 500:
        body = f"{body[:500]}... ({len(body)} characters)"
    return f"{item.DESCRIPTOR.name}({body})"


# --- the server's log ---


class ServerLog(logging.Handler):
    """Errors the server logs (an exception in a handler, a failed lease check), each with the
    label of the call under way when it was logged."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[tuple[str, str]] = []
        self.current = "setup"
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        message = f"[{record.name}] {record.getMessage()}"
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info))
        with self._lock:
            self.records.append((self.current, message))

    def since(self, index: int) -> list[tuple[str, str]]:
        with self._lock:
            return self.records[index:]


# --- a real worker's flow: the valid messages that mutations start from ---


def canonical(fields: dict[str, Any]) -> bytes:
    """Statement bytes as tspace signs them, for any field values (valid or not)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# Keys of a job spec the fuzzer sets; ("", key) is a top-level key. Schedule sizes and
# data.resize stay out: they scale what the coordinator computes and holds in memory.
SPEC_KEYS = (
    *(("data", "source"), ("model", "kwargs"), ("states", "count"), ("states", "spacing")),
    *(("states", "indices"), ("states", "mapping"), ("units", "partition"), ("units", "groups")),
    *(("model", "preset"), ("model", "prediction_type"), ("model", "class_conditional")),
    *(("model", "kwargs"), ("training", "steps"), ("training", "batch_size")),
    *(("training", "lr"), ("training", "checkpoint_every"), ("training", "validation_images")),
    *(("training", "assignment"), ("training", "seed"), ("data", "source"), ("data", "shards")),
    *(("data", "channels"), ("data", "source"), ("", "name"), ("", "fuzz"), ("nowhere", "key")),
)
UNET_KWARGS = (
    *("block_out_channels", "layers_per_block", "norm_num_groups", "attention_head_dim"),
    *("down_block_types", "up_block_types", "dropout", "num_class_embeds", "sample_size"),
)


def to_toml(spec: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        assert isinstance(v, dict)
        return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"

    top = [f"{k} = {value(v)}" for k, v in spec.items() if not isinstance(v, dict)]
    tables = [
        f"[{k}]\n" + "".join(f"{json.dumps(kk)} = {value(vv)}\n" for kk, vv in v.items())
        for k, v in spec.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n" + "\n".join(tables)


def bad_data_sources(root: Path) -> list[str]:
    """Data sources a job may name on the coordinator's host that are not usable data: a corrupt
    image, a PNG that claims 100000 x 100000 pixels, an empty folder, a manifest that is not
    one, class folders mixed with loose images; and the bundled digits."""
    png = b"\x89PNG\r\n\x1a\n"

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    bomb = png + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
    bomb += chunk(b"IEND", b"")
    files = {
        "corrupt/a.png": png + b"\x00" * 40,
        "bomb/a.png": bomb,
        "empty/.keep": b"",
        "manifest/manifest.json": b'{"format": 7, "shards": "x"}',
        "manifest-list/manifest.json": b"[1, 2]",
        "manifest-file.json": b'{"format": "tspace-shards/1", "shards": [{"file": "../../x"}]}',
        "mixed/a.png": bomb,
        "mixed/class/b.png": png,
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    folders = sorted({str(root / n.split("/")[0]) for n in files})
    return ["digits", *folders, str(root / "nothing"), str(root / "manifest-file.json"), "~"]


class Flow:
    """A worker that registers, leases, heartbeats and uploads for real; when its lease or its
    registration is gone (failed, completed, revoked by the fuzzer), it gets new ones."""

    def __init__(
        self, coord: Harness, maker: CheckpointMaker, folder: Path, note: Callable[..., object]
    ) -> None:
        self.coord, self.maker, self.folder, self.note = coord, maker, folder, note
        self.jobs_made = 0
        self.tokens: list[str] = []
        coord.create_job()
        self.worker = coord.register("site-a")
        self.other = coord.register("site-b")
        self.revoked = coord.register("site-c")
        coord.admin.RevokeWorker(
            admin_pb2.RevokeWorkerRequest(worker_id=self.revoked.worker_id),
            metadata=coord.admin_metadata,
            timeout=SETUP_TIMEOUT_S,
        )
        # Unit 0 done with real checkpoints; unit 1 leased, with a checkpoint and half an upload.
        a = coord.assignment(self.worker)
        coord.upload_file(self.worker, a, maker.path(a, 2), 2)
        final = maker.path(a, STEPS)
        coord.upload_file(self.worker, a, final, STEPS, final=True)
        coord.complete(self.worker, a, hashlib.sha256(final.read_bytes()).hexdigest())
        b = coord.assignment(self.worker)
        coord.upload_file(self.worker, b, maker.path(b, 2), 2)
        data = maker.path(b, STEPS).read_bytes()
        header = coord.signed_header(b, self.worker, data, STEPS, final=True)
        try:
            coord.upload(self.worker, header, coord.chunks(data[: len(data) // 2]))
            raise AssertionError("half an upload was accepted")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
        self.tokens.append(coord.enroll("site-a"))
        self.data_sources = bad_data_sources(folder / "data")

    # -- state

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """A call of the flow itself; a valid request that fails oddly is a finding too."""
        try:
            return fn()
        except grpc.RpcError as err:
            if err.code() in BAD_STATUSES:
                self.note(f"flow {what}", err.code(), err.details() or "", "(the flow's own)")
            return None

    def current_worker(self) -> WorkerClient:
        try:
            status = self.coord.catalogue.get_worker(self.worker.worker_id).status
        except TspaceError:
            status = WORKER_REVOKED
        if status == WORKER_REVOKED:
            fresh = self.call("register", lambda: self.coord.register("site-a"))
            if fresh is not None:
                self.worker = fresh
        return self.worker

    def lease(self) -> tuple[WorkerClient, LeaseRecord | None]:
        """The worker's active lease; a new one (on a new job if need be) when it has none."""
        worker = self.current_worker()
        catalogue = self.coord.catalogue
        for u in catalogue.units():
            if u.worker_id == worker.worker_id and u.status == UNIT_LEASED and u.lease_id:
                return worker, catalogue.get_lease(u.lease_id)
        for _ in range(2):
            response = self.call("acquire", lambda: self.coord.acquire(worker))
            if response is not None and response.WhichOneof("result") == "assignment":
                return worker, catalogue.get_lease(response.assignment.lease_id)
            if self.jobs_made >= MAX_NEW_JOBS:
                break
            self.jobs_made += 1
            self.call(
                "create job", functools.partial(self.coord.create_job, f"fuzz-{self.jobs_made}")
            )
        return worker, None

    def job_spec(self, data: st.DataObject) -> str:
        """The tiny job's TOML with one to three values replaced (or added): odd numbers,
        strings, arrays and tables, unknown keys, and data sources that are broken folders."""
        spec: dict[str, Any] = {
            "name": f"fuzz-{self.jobs_made + 1}",
            "states": {"count": 3},
            "units": {"partition": "single"},
            "model": {"preset": "tiny"},
            "training": {"steps": STEPS, "batch_size": 8, "checkpoint_every": 2},
            "data": {"source": "digits"},
        }
        scalars = st.one_of(
            st.sampled_from(EDGE_INTS),
            st.sampled_from(EDGE_DOUBLES),
            st.sampled_from(PROBE_STRINGS),
            st.booleans(),
            st.lists(st.sampled_from(EDGE_INTS[:12]), max_size=4),
            st.lists(st.sampled_from(PROBE_STRINGS[:30]), max_size=3),
        )
        if data.draw(st.booleans()):
            spec["data"]["source"] = pick(data, self.data_sources)
        for _ in range(data.draw(st.integers(1, 3))):
            section, key = data.draw(st.sampled_from(SPEC_KEYS))
            if section == "data" and key == "source":
                value: Any = data.draw(st.sampled_from(self.data_sources))
            elif section == "model" and key == "kwargs":
                value = data.draw(
                    st.dictionaries(
                        st.sampled_from(UNET_KWARGS),
                        scalars | st.lists(st.sampled_from([0, 1, 8, 32, 2**31]), max_size=4),
                        max_size=3,
                    )
                )
            else:
                value = data.draw(scalars)
            if section:
                table = spec.setdefault(section, {})
                if isinstance(table, dict):
                    table[key] = value
            else:
                spec[key] = value
        return to_toml(spec)

    def token(self) -> str:
        token = self.call("enroll", lambda: self.coord.enroll("site-a")) or "no-token"
        self.tokens.append(token)
        return str(token)

    def live(self) -> Live:
        catalogue = self.coord.catalogue
        jobs = catalogue.list_jobs()
        checkpoints = catalogue.list_checkpoints()
        live = Live(
            jobs=[j.name for j in jobs],
            checkpoints=[c.sha256 for c in checkpoints],
            shards=[s.sha256 for j in jobs for s in j.shards],
            workers=[w.worker_id for w in catalogue.list_workers()],
            tokens=[t.token_id for t in catalogue.list_tokens(time.time())],
            ensembles=[e.name for e in catalogue.list_ensembles()]
            + [a.alias for a in catalogue.list_aliases()],
        )
        leases = [u.lease_id for u in catalogue.units() if u.lease_id]
        live.strings = [
            *live.jobs,
            *live.checkpoints,
            *(c[:12] for c in live.checkpoints),
            *(c[:8] for c in live.checkpoints),
            *live.shards,
            *live.workers,
            *live.tokens,
            *live.ensembles,
            *leases,
            *self.tokens[-4:],
        ]
        live.blobs = [public_key_bytes(self.worker.key)]
        for c in checkpoints[:4]:
            live.blobs += [c.statement, c.signature, c.public_key]
        return live

    # -- valid requests, one per RPC where the flow knows one

    def seed(self, rpc: Rpc, data: st.DataObject, live: Live) -> Message:
        """A valid request for `rpc` as the flow would send it now (an empty one for an RPC
        the flow does not know)."""
        job = pick(data, live.jobs, "tiny")
        ckpt = pick(data, live.checkpoints, "0" * 64)
        worker_id = pick(data, live.workers, self.worker.worker_id)
        ensemble = pick(data, live.ensembles, "tiny:final")
        action = data.draw(st.sampled_from(["pause", "resume", "cancel"]))
        select = data.draw(st.sampled_from(["final", "newest", "best:val_loss"]))

        def lease_id() -> str:
            _, lease = self.lease()
            return "l-" + "0" * 16 if lease is None else lease.lease_id

        builders: dict[str, Callable[[], dict[str, Any]]] = {
            "Register": lambda: {
                "token": self.token(),
                "public_key": public_key_bytes(generate_key()),
                "device": "cpu",
                "hostname": "fuzz",
            },
            "Heartbeat": lambda: {
                "lease_id": lease_id(),
                "step": 1,
                "loss": 0.5,
                "images_per_s": 80.0,
            },
            "UploadStatus": lambda: {"lease_id": lease_id(), "sha256": ckpt},
            "CompleteUnit": lambda: {"lease_id": lease_id(), "sha256": ckpt},
            "FailUnit": lambda: {"lease_id": lease_id(), "error": "CUDA out of memory"},
            "FetchCheckpoint": lambda: {"sha256": ckpt, "offset": 0},
            "FetchShard": lambda: {"sha256": pick(data, live.shards, "0" * 64), "offset": 0},
            "CreateJob": lambda: {"spec_toml": self.job_spec(data)},
            "GetJob": lambda: {"name": job},
            "ChangeJob": lambda: {"name": job, "action": action},
            "ListUnits": lambda: {"job": job},
            "RetryUnit": lambda: {"job": job, "unit": 1},
            "ResetUnit": lambda: {"job": job, "unit": 0, "checkpoint": ckpt[:12]},
            "Enroll": lambda: {"site": "site-a", "ttl_s": 60.0},
            "RevokeToken": lambda: {"token_id": pick(data, live.tokens, "0" * 12)},
            "GetWorker": lambda: {"worker_id": worker_id},
            "RevokeWorker": lambda: {"worker_id": worker_id},
            "ListCheckpoints": lambda: {"job": job, "unit": 0},
            "VerifyCheckpoints": lambda: {"job": job, "checkpoints": [ckpt[:12]]},
            "GetEnsemble": lambda: {"name": ensemble},
            "RegisterEnsemble": lambda: {
                "name": "fuzz-ensemble",
                "job": job,
                "select": select,
                "checkpoints": {0: ckpt[:10]},
            },
            "SetAlias": lambda: {"alias": "production", "ensemble": ensemble},
            "Status": lambda: {"interval_s": 0.0},
        }
        build = builders.get(rpc.name)
        try:
            return rpc.message(**(build() if build else {}))
        except (ValueError, TypeError):  # the request changed shape: start from an empty one
            return rpc.message()

    # -- uploads, built the way a worker builds them, then bent

    def held(self, lease_id: str, sha256: str) -> int:
        part = self.coord.blobs / "uploads" / f"{lease_id}.{sha256}.part"
        return part.stat().st_size if part.is_file() else 0

    def payload(self, data: st.DataObject, lease: LeaseRecord, step: int, clean: bool) -> bytes:
        """Checkpoint bytes for `lease` at `step`: a real one, a forged one (with odd metadata
        unless `clean`), or junk."""
        kind = data.draw(st.sampled_from(["forged", "real"] if clean else ["forged", "junk"]))
        job = self.coord.catalogue.get_job(lease.job)
        if kind == "real" and job.name == "tiny" and 1 <= step <= STEPS:
            timesteps = tuple(json.loads(job.spec_json)["units"][lease.unit])
            a = serde.Assignment(
                lease.lease_id, job.name, job.job_hash, job.spec_json, lease.unit, timesteps,
                (), lease.attempt, 0.0, job.shards,
            )  # fmt: skip
            return self.maker.path(a, step).read_bytes()
        if kind == "junk":
            return bytes(data.draw(st.binary(min_size=1, max_size=4096)))
        meta: dict[str, Any] = {"job": lease.job, "unit": lease.unit, "step": step}
        meta["metrics"] = data.draw(
            st.fixed_dictionaries({"loss": st.floats(0, 10), "val_loss": st.floats(0, 10)})
            if clean
            else st.one_of(
                st.dictionaries(
                    st.text(max_size=8) | st.just("x" * 300),
                    st.one_of(
                        st.floats(),
                        st.integers(),
                        st.sampled_from([10**400, -(10**400), 2**64]),
                        st.booleans(),
                        st.none(),
                        st.text(max_size=8),
                        st.lists(st.integers(), max_size=3),
                    ),
                    max_size=70,
                ),
                st.lists(st.integers(), max_size=3),
                st.text(max_size=8),
            )
        )
        meta["shards_seen"] = data.draw(
            st.just([s.name for s in job.shards])
            if clean
            else st.one_of(
                st.lists(st.text(max_size=8) | st.just("s" * 300), max_size=5),
                st.integers(),
                st.lists(st.integers(), max_size=3),
            )
        )
        if not clean and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(["job", "unit", "step", "metrics", "shards_seen"]))
            meta[key] = data.draw(
                st.one_of(st.integers(), st.text(max_size=12), st.none(), st.floats())
            )
        path = self.folder / f"forged-{hashlib.sha256(repr(meta).encode()).hexdigest()[:16]}"
        tensors = {"w": torch.zeros(data.draw(st.integers(1, 64)))}
        save_checkpoint(path, tensors, meta)
        return path.read_bytes()

    def upload(self, data: st.DataObject, live: Live) -> tuple[list[bytes], str]:
        """One UploadCheckpoint stream (serialized chunks) and its description."""
        worker, lease = self.lease()
        if lease is None:
            return [], "no lease to upload to"
        # A third go through unchanged, so the checks past the first ones see inputs too.
        clean = data.draw(st.integers(0, 2)) == 0

        def bend(odds: int) -> bool:
            return not clean and data.draw(st.integers(0, odds - 1)) == 0

        total = self.coord.catalogue.get_job(lease.job).total_steps
        step = data.draw(st.sampled_from([total, 1, total // 2, total, 0, total + 1]))
        if bend(4):
            step = data.draw(st.integers(0, 2**63 - 1))
        payload = self.payload(data, lease, step, clean)
        digest = hashlib.sha256(payload).hexdigest()
        job = self.coord.catalogue.get_job(lease.job)
        fields: dict[str, Any] = {
            "format": "tspace-statement/1",
            "job": lease.job,
            "job_hash": job.job_hash,
            "unit": lease.unit,
            "attempt": lease.attempt,
            "step": step,
            "final": (step == total) != bend(4),
            "sha256": digest,
            "size": len(payload),
            "key_id": worker.key_id,
            "time": time.time(),
        }
        if bend(4):
            key = data.draw(st.sampled_from(sorted(fields)))
            fields[key] = data.draw(
                st.one_of(
                    st.integers(-(2**64), 2**64),
                    st.floats(),
                    st.text(max_size=70),
                    st.booleans(),
                    st.none(),
                )
            )
        statement = canonical(fields)
        signer = generate_key() if bend(6) else worker.key
        signature = sign(signer, statement)
        header = worker_pb2.UploadHeader(
            lease_id=lease.lease_id,
            sha256=digest,
            size=len(payload),
            offset=self.held(lease.lease_id, digest),
            statement=statement,
            signature=signature,
        )
        if bend(3):
            mutated = mutate_message(data, header, live)
            assert isinstance(mutated, worker_pb2.UploadHeader)
            header = mutated
        start = min(max(header.offset, 0), len(payload))
        rest = payload[start:]
        cuts = sorted(
            [between(data, 0, len(rest)) for _ in range(data.draw(st.integers(0, 3)))]
            + list(range(0, len(rest), CHUNK_BYTES))
        )
        pieces = [rest[a:b] for a, b in zip([0, *cuts], [*cuts, len(rest)], strict=True) if b > a]
        chunks = [worker_pb2.UploadChunk(header=header)]
        chunks += [worker_pb2.UploadChunk(data=p) for p in pieces]
        how = "as is"
        if not clean:
            how = data.draw(
                st.sampled_from(
                    [
                        *("as is", "drop tail", "flip data", "no header", "header twice"),
                        *("empty chunk", "swap", "big chunk", "random chunk"),
                    ]
                )
            )
        if how == "drop tail" and len(chunks) > 1:
            chunks = chunks[: between(data, 1, len(chunks) - 1)]
        elif how == "flip data" and len(chunks) > 1:
            i = between(data, 1, len(chunks) - 1)
            chunks[i] = worker_pb2.UploadChunk(data=flip_bits(data, chunks[i].data))
        elif how == "no header":
            chunks = chunks[1:]
        elif how == "header twice":
            chunks.insert(between(data, 1, len(chunks)), chunks[0])
        elif how == "empty chunk":
            chunks.insert(between(data, 1, len(chunks)), worker_pb2.UploadChunk(data=b""))
        elif how == "swap" and len(chunks) > 2:
            chunks[1], chunks[-1] = chunks[-1], chunks[1]
        elif how == "big chunk":
            chunks.append(worker_pb2.UploadChunk(data=b"\x00" * (CHUNK_BYTES + 128 * 1024)))
        elif how == "random chunk":
            chunks.insert(
                between(data, 0, len(chunks)),
                random_message(data, worker_pb2.UploadChunk.DESCRIPTOR, live),
            )
        raw = [c.SerializeToString() for c in chunks]
        if raw and bend(6):
            i = between(data, 0, len(raw) - 1)
            raw[i] = mutate_bytes(data, raw[i])
        summary = (
            f"{'clean' if clean else 'bent'} upload to {lease.lease_id} (job {lease.job} "
            f"unit {lease.unit}) {how}: "
            f"{shown(header)} then {len(chunks) - 1} chunks of {len(payload)} bytes, "
            f"statement {statement[:400]!r}"
        )
        return raw, summary


# --- sending and judging ---


@dataclass
class Finding:
    rpc: str
    code: str
    details: str
    request: str
    credential: str
    log: list[str] = field(default_factory=list)
    count: int = 1

    def __str__(self) -> str:
        lines = [
            f"{self.rpc}: {self.code} {self.details[:600]!r} (seen {self.count}x)",
            f"  credential: {self.credential}",
            f"  request: {self.request[:1500]}",
        ]
        lines += ["  server log: " + entry.replace("\n", "\n    ") for entry in self.log[:2]]
        return "\n".join(lines)


def _shape(details: str) -> str:
    """Details with ids and numbers blanked, so one bug is one finding."""
    return re.sub(r"[0-9a-f]{8,}|\d+", "#", details)[:160]


def parses(message: type[Message], raw: bytes) -> bool:
    try:
        message.FromString(raw)
    except DecodeError:
        return False
    return True


class Fuzzer:
    def __init__(self, coord: Harness, checkpoints: CheckpointMaker, folder: Path) -> None:
        self.coord = coord
        assert coord.channel is not None
        self.channel = coord.channel
        self.log = ServerLog()
        self.findings: dict[tuple[str, str, str], Finding] = {}
        self.calls: dict[str, int] = {r.label: 0 for r in RPCS}
        self.codes: dict[str, int] = {}
        self.cut_short = 0  # batches hypothesis ended early
        self.seconds: dict[str, float] = {r.label: 0.0 for r in RPCS}
        self.outcomes: dict[str, dict[str, int]] = {}
        self.flow = Flow(coord, checkpoints, folder, self.note)
        logging.getLogger().addHandler(self.log)
        self.seed = int(FUZZ_SEED) if FUZZ_SEED else random.randrange(2**32)

    def close(self) -> None:
        logging.getLogger().removeHandler(self.log)

    def note(
        self, rpc: str, code: grpc.StatusCode | str, details: str, request: str, cred: str = ""
    ) -> Finding:
        name = code.name if isinstance(code, grpc.StatusCode) else code
        key = (rpc, name, _shape(details))
        if key in self.findings:
            self.findings[key].count += 1
        else:
            self.findings[key] = Finding(rpc, name, details, request, cred)
        return self.findings[key]

    # -- credentials

    def metadata(
        self, data: st.DataObject, rpc: Rpc, own_weight: int = 3
    ) -> tuple[tuple[tuple[str, str], ...], str]:
        own = "admin" if rpc.service == "AdminService" else "worker"
        choice = data.draw(
            st.sampled_from([own] * own_weight + ["worker", "admin", "none", "revoked", "garbage"])
        )
        if choice == "worker":
            return self.flow.current_worker().metadata, choice
        if choice == "admin":
            return self.coord.admin_metadata, choice
        if choice == "revoked":
            return self.flow.revoked.metadata, choice
        if choice == "none":
            return (), choice
        printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
        pairs = data.draw(
            st.lists(
                st.tuples(
                    st.sampled_from([CREDENTIAL_HEADER, ADMIN_HEADER]),
                    printable | st.just(self.flow.other.credential),
                ),
                min_size=1,
                max_size=3,
            )
        )
        return tuple(pairs), f"garbage {pairs!r}"[:300]

    # -- one input

    def request(self, data: st.DataObject, rpc: Rpc, live: Live) -> tuple[bytes, str]:
        how = data.draw(
            st.sampled_from(["seed", "mutated", "mutated", "random", "random", "raw", "bytes"])
        )
        if how == "raw":
            raw = bytes(data.draw(st.binary(max_size=256)))
            return raw, shown(raw)
        if how == "random":
            msg = random_message(data, rpc.request, live)
        else:
            seed = self.flow.seed(rpc, data, live)
            msg = seed if how == "seed" else mutate_message(data, seed, live)
        raw = msg.SerializeToString()
        if how == "bytes":
            raw = mutate_bytes(data, raw)
            return raw, f"{shown(raw)} (bytes of {shown(msg)} mutated)"
        return raw, shown(msg)

    def one(self, rpc: Rpc, data: st.DataObject, live: Live) -> None:
        flow_upload = rpc.name == "UploadCheckpoint" and data.draw(st.integers(0, 3)) > 0
        metadata, credential = self.metadata(data, rpc, 12 if flow_upload else 3)
        if rpc.client_streaming:
            if flow_upload:
                requests, description = self.flow.upload(data, live)
            else:
                items = [
                    self.request(data, rpc, live)
                    for _ in range(data.draw(st.sampled_from([2, 1, 3, 4, 0])))
                ]
                requests = [raw for raw, _ in items]
                description = "stream of [" + ", ".join(d for _, d in items) + "]"
        else:
            raw, description = self.request(data, rpc, live)
            requests = [raw]
        self.send(rpc, requests, metadata, description, credential)

    def send(
        self,
        rpc: Rpc,
        requests: list[bytes],
        metadata: tuple[tuple[str, str], ...],
        description: str,
        credential: str,
    ) -> None:
        self.calls[rpc.label] += 1
        self.log.current = rpc.label
        logged = len(self.log.records)
        code, details = self._invoke(rpc, requests, metadata)
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        if VERBOSE:
            print(f"{rpc.label} [{credential[:20]}] -> {code.name} {details[:200]!r}", flush=True)
            print(f"    {description[:300]}", flush=True)
        per_rpc = self.outcomes.setdefault(rpc.label, {})
        per_rpc[code.name] = per_rpc.get(code.name, 0) + 1
        unparseable = not all(parses(rpc.message, raw) for raw in requests)
        excused = code == grpc.StatusCode.INTERNAL and details == UNPARSEABLE and unparseable
        finding = None
        if code in BAD_STATUSES and not excused:
            finding = self.note(rpc.label, code, details, description, credential)
            time.sleep(0.05)  # let the server finish logging the exception
        for label, message in self.log.since(logged):
            if unparseable and "Exception deserializing" in message:
                continue
            if finding is None or label != rpc.label:
                finding = self.note(label, "LOGGED", message.split("\n")[0], description)
            finding.log.append(message)

    def _invoke(
        self, rpc: Rpc, requests: list[bytes], metadata: tuple[tuple[str, str], ...]
    ) -> tuple[grpc.StatusCode, str]:
        kind = (
            ("stream" if rpc.client_streaming else "unary")
            + "_"
            + ("stream" if rpc.server_streaming else "unary")
        )
        multicallable = getattr(self.channel, kind)(
            rpc.path, request_serializer=None, response_deserializer=None
        )
        argument: bytes | Iterable[bytes] = iter(requests) if rpc.client_streaming else requests[0]
        try:
            if not rpc.server_streaming:
                multicallable(argument, metadata=metadata, timeout=CALL_TIMEOUT_S)
                return grpc.StatusCode.OK, ""
            responses = multicallable(argument, metadata=metadata, timeout=CALL_TIMEOUT_S)
            for count, _ in enumerate(responses, 1):
                if count >= MAX_STREAM_READ:
                    responses.cancel()
                    return grpc.StatusCode.CANCELLED, "hung up"
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            return err.code(), err.details() or ""

    # -- the run

    def batch(self, rpc: Rpc, index: int, stop: float | None) -> None:
        started = time.monotonic()
        try:
            self._batch(rpc, index, stop)
        finally:
            self.seconds[rpc.label] += time.monotonic() - started

    def _batch(self, rpc: Rpc, index: int, stop: float | None) -> None:
        live = self.flow.live()

        @hypothesis_seed(self.seed + index)
        @settings(
            max_examples=BATCH_EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(st.data())
        def examples(data: st.DataObject) -> None:
            if stop is None or time.monotonic() < stop:
                self.one(rpc, data, live)

        try:
            examples()
        except FlakyStrategyDefinition:
            # The same drawn prefix met another server state and drew differently; the inputs
            # sent so far were judged already, and the next batch starts afresh.
            self.cut_short += 1

    def run(self, seconds: float) -> None:
        """Every RPC once, then RPCs at random until `seconds` are up."""
        stop = time.monotonic() + seconds
        chooser = random.Random(self.seed)
        index = 0
        for rpc in RPCS:
            self.batch(rpc, index, None)
            index += 1
        # Uploads hold the most checks, so they come up more often than the rest.
        weighted = [r for r in RPCS for _ in range(4 if r.client_streaming else 1)]
        while time.monotonic() < stop:
            self.batch(chooser.choice(weighted), index, stop)
            index += 1
        self.log.current = "after the run"


# --- after the run ---


def stuck_handlers(grace_s: float) -> list[str]:
    """Stacks of gRPC handler threads still inside coordinator code `grace_s` after the last
    call (each call had a deadline of CALL_TIMEOUT_S). Such a thread cannot be stopped; it is
    left out of interpreter shutdown so the test process can still exit."""
    deadline = time.monotonic() + grace_s
    while True:
        frames = sys._current_frames()
        stuck = []
        for thread in threading.enumerate():
            frame = frames.get(thread.ident or -1)
            if thread is threading.current_thread() or frame is None:
                continue
            stack = traceback.extract_stack(frame)
            files = [Path(f.filename) for f in stack]
            handler = any(f.parts[-2:] == ("grpc", "_server.py") for f in files)
            if handler and any(f.is_relative_to(ROOT / "coordinator") for f in files):
                stuck.append((thread, "".join(traceback.format_list(stack[-8:]))))
        if not stuck or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for thread, _ in stuck:
        _let_exit_without(thread)
    return [f"thread {t.name} still in a handler:\n{s}" for t, s in stuck]


def _let_exit_without(thread: threading.Thread) -> None:
    import concurrent.futures.thread as pool

    getattr(pool, "_threads_queues", {}).pop(thread, None)
    locks = getattr(threading, "_shutdown_locks", None)
    lock = getattr(thread, "_tstate_lock", None)
    if locks is not None and lock is not None:
        with threading._shutdown_locks_lock:  # type: ignore[attr-defined]
            locks.discard(lock)


def serving_problems(coord: Harness) -> list[str]:
    problems = []
    try:
        health = coord.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            problems.append(f"health check says {health.status}")
        coord.admin.ListJobs(admin_pb2.ListJobsRequest(), metadata=coord.admin_metadata, timeout=5)
    except grpc.RpcError as err:
        problems.append(f"the coordinator no longer serves: {err.code()} {err.details()}")
    return problems


ORPHANS = {
    "lease of a missing unit": "SELECT l.lease_id FROM leases l "
    "LEFT JOIN units u ON u.id = l.unit_id WHERE u.id IS NULL",
    "lease of a missing worker": "SELECT l.lease_id FROM leases l "
    "LEFT JOIN workers w ON w.worker_id = l.worker_id WHERE w.worker_id IS NULL",
    "lease naming a missing checkpoint": "SELECT l.lease_id FROM leases l "
    "LEFT JOIN checkpoints c ON c.sha256 = l.checkpoint_sha256 "
    "WHERE l.checkpoint_sha256 IS NOT NULL AND c.sha256 IS NULL",
    "checkpoint of a missing unit": "SELECT c.sha256 FROM checkpoints c "
    "LEFT JOIN units u ON u.id = c.unit_id WHERE u.id IS NULL",
    "checkpoint of a missing worker": "SELECT c.sha256 FROM checkpoints c "
    "LEFT JOIN workers w ON w.worker_id = c.worker_id WHERE w.worker_id IS NULL",
    "ensemble member of a missing ensemble": "SELECT m.ensemble FROM ensemble_members m "
    "LEFT JOIN ensembles e ON e.name = m.ensemble WHERE e.name IS NULL",
    "ensemble member of a missing unit": "SELECT m.ensemble FROM ensemble_members m "
    "LEFT JOIN units u ON u.id = m.unit_id WHERE u.id IS NULL",
    "ensemble member with a missing checkpoint": "SELECT m.ensemble FROM ensemble_members m "
    "LEFT JOIN checkpoints c ON c.sha256 = m.checkpoint_sha256 WHERE c.sha256 IS NULL",
    "ensemble member whose checkpoint is another unit's": "SELECT m.ensemble "
    "FROM ensemble_members m JOIN checkpoints c ON c.sha256 = m.checkpoint_sha256 "
    "WHERE c.unit_id <> m.unit_id",
    "ensemble member of another job's unit": "SELECT m.ensemble FROM ensemble_members m "
    "JOIN ensembles e ON e.name = m.ensemble JOIN units u ON u.id = m.unit_id "
    "WHERE u.job_id <> e.job_id",
    "ensemble of a missing job": "SELECT e.name FROM ensembles e "
    "LEFT JOIN jobs j ON j.id = e.job_id WHERE j.id IS NULL",
    "alias of a missing ensemble": "SELECT a.name FROM aliases a "
    "LEFT JOIN ensembles e ON e.name = a.ensemble WHERE e.name IS NULL",
    "unit of a missing job": "SELECT u.id FROM units u "
    "LEFT JOIN jobs j ON j.id = u.job_id WHERE j.id IS NULL",
    "shard of a missing job": "SELECT s.id FROM shards s "
    "LEFT JOIN jobs j ON j.id = s.job_id WHERE j.id IS NULL",
    "token used by a missing worker": "SELECT t.site FROM tokens t "
    "LEFT JOIN workers w ON w.worker_id = t.worker_id "
    "WHERE t.worker_id IS NOT NULL AND w.worker_id IS NULL",
    "unit with two active leases": "SELECT unit_id FROM leases WHERE status = :active "
    "GROUP BY unit_id HAVING COUNT(*) > 1",
    "active lease of a unit that is not leased": "SELECT l.lease_id FROM leases l "
    "JOIN units u ON u.id = l.unit_id WHERE l.status = :active AND u.status <> :leased",
    "leased unit without an active lease": "SELECT u.id FROM units u WHERE u.status = :leased "
    "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.unit_id = u.id AND l.status = :active)",
    "active lease of a revoked worker": "SELECT l.lease_id FROM leases l "
    "JOIN workers w ON w.worker_id = l.worker_id "
    "WHERE l.status = :active AND w.status = :revoked",
}
PARAMS = {"active": LEASE_ACTIVE, "leased": UNIT_LEASED, "revoked": WORKER_REVOKED}
CHECKPOINTS_SQL = (
    "SELECT c.sha256, c.size, j.name, u.unit, c.step, c.final, c.statement, c.signature, "
    "c.worker_id, w.key_id, w.public_key, c.created_at FROM checkpoints c "
    "JOIN units u ON u.id = c.unit_id JOIN jobs j ON j.id = u.job_id "
    "JOIN workers w ON w.worker_id = c.worker_id"
)


def catalogue_problems(coord: Harness) -> tuple[list[str], set[str]]:
    """Orphans, double leases, checkpoints that do not verify; and the blobs the catalogue
    references. Read through an engine of its own, not the coordinator's."""
    problems: list[str] = []
    engine = create_engine(coord.config.catalogue_url)
    try:
        with engine.connect() as conn:
            for what, sql in ORPHANS.items():
                params = {k: v for k, v in PARAMS.items() if f":{k}" in sql}
                rows = conn.execute(text(sql), params).all()
                if rows:
                    problems.append(f"{what}: {[r[0] for r in rows][:10]}")
            shards = {r[0] for r in conn.execute(text("SELECT sha256 FROM shards"))}
            rows = conn.execute(text(CHECKPOINTS_SQL)).all()
            count = conn.execute(text("SELECT COUNT(*) FROM checkpoints")).scalar_one()
    finally:
        engine.dispose()
    if count != len(rows):
        problems.append(f"{count - len(rows)} checkpoints lack their unit, job or worker")
    store = BlobStore(coord.blobs)
    for row in rows:
        record = CheckpointRecord(
            sha256=row[0],
            size=row[1],
            job=row[2],
            unit=row[3],
            step=row[4],
            final=bool(row[5]),
            statement=bytes(row[6]),
            signature=bytes(row[7]),
            worker_id=row[8],
            key_id=row[9],
            public_key=bytes(row[10]),
            created_at=row[11],
        )  # trusted: a revoked signer is the operator's decision, not an inconsistency
        try:
            found = checkpoint_problems(record, store.path(record.sha256))
        except TspaceError as exc:
            found = [str(exc)]
        problems += [f"checkpoint {record.sha256[:16]}: {p}" for p in found]
    return problems, shards | {r[0] for r in rows}


def blob_problems(coord: Harness, referenced: set[str]) -> list[str]:
    """Every object is referenced, hashes to its name and sits where its name says; every
    shard is there; uploads/ holds only partial uploads of active leases."""
    root = coord.blobs
    problems = []
    objects = {}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        relative = path.relative_to(root)
        if relative.parts[0] == "objects":
            objects[path.name] = path
            if relative.parts != ("objects", path.name[:2], path.name):
                problems.append(f"object {relative} is not where its name says")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
                problems.append(f"object {path.name[:16]} does not hash to its name")
            elif path.name not in referenced:
                problems.append(
                    f"blob {path.name[:16]} ({path.stat().st_size} bytes) is neither a registered "
                    "checkpoint nor a job shard"
                )
        elif relative.parts[0] == "uploads" and len(relative.parts) == 2:
            lease_id, _, rest = path.name.partition(".")
            if not rest.endswith(".part"):
                problems.append(f"stray file in uploads/: {path.name}")
                continue
            try:
                status = coord.catalogue.get_lease(lease_id).status
            except TspaceError:
                status = "unknown"
            if status != LEASE_ACTIVE:
                problems.append(
                    f"partial upload {path.name[:40]} ({path.stat().st_size} bytes) of a lease "
                    f"that is {status}"
                )
        else:
            problems.append(f"stray file in the blob store: {relative}")
    problems += [f"shard {s[:16]} is missing from the store" for s in referenced - set(objects)]
    return problems


def test_fuzz_the_coordinator_api(
    coord: Harness, checkpoints: CheckpointMaker, tmp_path: Path
) -> None:
    fuzzer = Fuzzer(coord, checkpoints, tmp_path)
    started = time.monotonic()
    try:
        fuzzer.run(FUZZ_SECONDS)
    finally:
        fuzzer.close()
    elapsed = time.monotonic() - started
    problems = [str(f) for f in fuzzer.findings.values()]
    problems += stuck_handlers(grace_s=CALL_TIMEOUT_S + 1.0)
    problems += serving_problems(coord)
    consistency, referenced = catalogue_problems(coord)
    problems += consistency
    # The lease reaper drops partial uploads of ended leases on its next round.
    deadline = time.monotonic() + coord.config.lease_check_interval_s + 2.0
    while (blobs := blob_problems(coord, referenced)) and time.monotonic() < deadline:
        time.sleep(0.2)
    problems += blobs
    summary = (
        f"{sum(fuzzer.calls.values())} calls in {elapsed:.0f} s (seed {fuzzer.seed}); "
        f"statuses {dict(sorted(fuzzer.codes.items()))}; {fuzzer.cut_short} batches cut short"
    )
    print(summary)
    for label, seconds in sorted(fuzzer.seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {label}: {seconds:.1f} s, {fuzzer.outcomes.get(label)}")
    assert all(fuzzer.calls.values()), f"RPCs never called: {fuzzer.calls}"
    assert not problems, f"{summary}\n\n" + "\n\n".join(problems)


def test_the_consistency_checks_see_damage(
    coord: Harness, checkpoints: CheckpointMaker, tmp_path: Path
) -> None:
    """The checks after the run can fail: an orphan row, a corrupt checkpoint file, a stray
    blob and a partial upload of an ended lease are each reported."""
    noted: list[Any] = []
    flow = Flow(coord, checkpoints, tmp_path, lambda *args: noted.append(args))
    problems, referenced = catalogue_problems(coord)
    assert problems == [] and noted == []
    assert blob_problems(coord, referenced) == []

    ckpt = coord.catalogue.list_checkpoints()[0].sha256
    path = BlobStore(coord.blobs).path(ckpt)
    path.chmod(0o644)
    content = path.read_bytes()
    path.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    stray = BlobStore(coord.blobs).put_bytes(b"nobody's")
    _, lease = flow.lease()
    assert lease is not None
    coord.worker.FailUnit(
        worker_pb2.FailUnitRequest(lease_id=lease.lease_id, error="gone"),
        metadata=flow.worker.metadata,
        timeout=SETUP_TIMEOUT_S,
    )
    engine = create_engine(coord.config.catalogue_url)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SET session_replication_role = replica"))  # no FK checks
            conn.execute(text("UPDATE leases SET worker_id = 'w-nobody'"))
    finally:
        engine.dispose()
    coord.stop()  # the reaper would drop the partial upload of the failed lease

    problems, referenced = catalogue_problems(coord)
    assert any(p.startswith("lease of a missing worker") for p in problems), problems
    assert any(f"checkpoint {ckpt[:16]}" in p and "corrupt" in p for p in problems), problems
    found = blob_problems(coord, referenced)
    assert any(f"blob {stray[:16]}" in p for p in found), found
    assert any("partial upload" in p and "failed" in p for p in found), found
