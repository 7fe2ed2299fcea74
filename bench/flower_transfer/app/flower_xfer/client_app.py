"""The ClientApp: replies with the bytes of the file it is asked for, as a uint8 array."""

from __future__ import annotations

import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def reply(msg: Message, context: Context) -> Message:
    """Read `payload` (a path; empty for a tiny reply) and send it back as one array."""
    start = time.time()
    path = str(msg.content.config_records["config"]["payload"])
    content = RecordDict()
    if path:
        content["payload"] = ArrayRecord({"data": Array(np.fromfile(path, dtype=np.uint8))})
    # Wall clock, not a monotonic one: the ServerApp, another process on the same host,
    # subtracts it from its own time.time().
    ready = time.time()
    content["times"] = ConfigRecord({"start": start, "ready": ready, "pid": os.getpid()})
    return Message(content, reply_to=msg)
