"""Bounds on what a peer may send: formats, lengths and ranges of request fields, and the size of
a checkpoint relative to its job's model. Each check aborts the call with INVALID_ARGUMENT and
a message naming the field, before anything is read from or written to the catalogue."""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
import torch
from google.protobuf.message import Message

from coordinator.state import abort
from tspace_core.errors import TspaceError
from tspace_core.jobspec import resolve, spec_from_dict
from tspace_core.models import build_unet, count_parameters, unet_config

SHA256 = re.compile(r"[0-9a-f]{64}")
# Join tokens are secrets.token_urlsafe(32) (43 characters); older or hand-made ones may differ
# in length but never in alphabet.
TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
MAX_LABEL = 256  # device and hostname a worker reports
MAX_ERROR = 4096  # a failure message a worker reports
MAX_OFFSET = 2**62
MAX_STEP = 2**31 - 1  # the catalogue keeps steps in 32-bit INTEGER columns
MAX_RATE = 1e12  # images/s no machine reaches

# A checkpoint holds the weights, their EMA and two Adam moments: four float32 copies of the
# parameters. Anything much larger than that is not a checkpoint of this job's model.
CHECKPOINT_COPIES = 4
CHECKPOINT_SLACK = 1.25
CHECKPOINT_HEADER_BYTES = 16 * 2**20  # metadata, RNG state, optimizer step counters


def _invalid(context: grpc.ServicerContext, message: str) -> None:
    abort(context, grpc.StatusCode.INVALID_ARGUMENT, message)


def sha256_field(context: grpc.ServicerContext, value: str, name: str = "sha256") -> str:
    if not SHA256.fullmatch(value):
        _invalid(context, f"{name} must be 64 lowercase hex characters (a SHA-256 digest)")
    return value


def token_field(context: grpc.ServicerContext, value: str) -> str:
    if not TOKEN.fullmatch(value):
        _invalid(context, "the join token is malformed; copy it exactly as it was printed")
    return value


def label_field(context: grpc.ServicerContext, value: str, name: str) -> str:
    """A short free-text label: printable, no control characters, at most MAX_LABEL long."""
    if len(value) > MAX_LABEL or not value.isprintable():
        _invalid(context, f"{name} must be at most {MAX_LABEL} printable characters")
    return value


def message_field(context: grpc.ServicerContext, value: str, name: str) -> str:
    """Free text that may span lines (an error message), at most MAX_ERROR long."""
    if len(value) > MAX_ERROR or not value.replace("\n", " ").replace("\t", " ").isprintable():
        _invalid(context, f"{name} must be at most {MAX_ERROR} printable characters")
    return value


def int_field(context: grpc.ServicerContext, value: int, name: str, low: int, high: int) -> int:
    if not low <= value <= high:
        _invalid(context, f"{name} is {value}; it must be in [{low}, {high}]")
    return value


def rate_field(context: grpc.ServicerContext, value: float, name: str) -> float:
    if not (math.isfinite(value) and 0 <= value <= MAX_RATE):
        _invalid(context, f"{name} is {value}; it must be a finite number in [0, {MAX_RATE:g}]")
    return value


MAX_STRING = 2**20  # longer than any string field needs (a job spec is capped far lower)


def text_problem(message: Message) -> str | None:
    """Why a request's strings are unusable, or None: no string anywhere in it (nested
    messages, lists and maps included) may hold a NUL character, which PostgreSQL cannot
    store, or be longer than MAX_STRING."""
    for text in _strings(message):
        if "\x00" in text:
            return "text fields must not contain NUL characters"
        if len(text) > MAX_STRING:
            return f"a text field is longer than {MAX_STRING} characters"
    return None


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Message):
        for _, field_value in value.ListFields():
            yield from _strings(field_value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif not isinstance(value, bytes | int | float) and hasattr(value, "__iter__"):
        for item in value:  # a repeated field
            yield from _strings(item)


def loss_value(value: float) -> float:
    """A reported loss as stored: a diverged (NaN) loss reads as infinite, since SQLite stores
    NaN as NULL."""
    return math.inf if math.isnan(value) else value


@functools.lru_cache(maxsize=64)
def checkpoint_limit(spec_json: str) -> int:
    """The largest checkpoint a unit of this resolved job can produce, in bytes."""
    return CHECKPOINT_HEADER_BYTES + math.ceil(
        CHECKPOINT_SLACK * CHECKPOINT_COPIES * 4 * parameter_count(spec_json)
    )


def parameter_count(spec_json: str) -> int:
    """The number of parameters of the job's model, built without allocating its weights."""
    try:
        doc: Any = json.loads(spec_json)
        job = resolve(spec_from_dict(doc["spec"]))
        manifest = doc["dataset"]
        channels, height, _ = manifest["shape"]
        config = unet_config(job.spec.model, height, channels, manifest["num_classes"])
    except (KeyError, TypeError, ValueError, TspaceError) as exc:
        raise TspaceError(f"the recorded job cannot be read back ({exc})") from None
    with torch.device("meta"):
        return count_parameters(build_unet(config))
