"""The ServerApp: a tiny and a big request to the one SuperNode, each timed to its reply."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

# Grid.send_and_receive sleeps 3 s between pulls; a shorter pull loop of our own keeps that
# fixed wait out of the figures (Flower's own polling inside the reply path stays in).
PULL_INTERVAL_S = 0.05

app = ServerApp()


def wait_for_node(grid: Grid, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if nodes := list(grid.get_node_ids()):
            return int(nodes[0])
        time.sleep(0.2)
    raise RuntimeError(f"no SuperNode connected within {timeout_s:.0f} s")


def exchange(grid: Grid, node: int, payload: str) -> tuple[dict[str, Any], Message]:
    """Push one query asking for `payload`, pull until its reply is whole; the times."""
    request = RecordDict({"config": ConfigRecord({"payload": payload})})
    message = Message(request, dst_node_id=node, message_type="query")
    sent = time.time()
    ids = {i for i in grid.push_messages([message]) if i}
    if not ids:
        raise RuntimeError("the SuperLink did not accept the request")
    while not (replies := list(grid.pull_messages(ids))):
        time.sleep(PULL_INTERVAL_S)
    received = time.time()
    reply = replies[0]
    if reply.has_error():
        raise RuntimeError(f"the ClientApp replied with an error: {reply.error}")
    times = reply.content.config_records["times"]
    start, ready = cast(float, times["start"]), cast(float, times["ready"])
    return {
        "reply_id": reply.metadata.message_id,
        "round_trip_s": received - sent,
        "request_to_clientapp_s": start - sent,
        "clientapp_load_s": ready - start,
        "reply_path_s": received - ready,
        "clientapp_pid": times["pid"],
    }, reply


def verify(reply: Message, expected_sha256: str) -> dict[str, Any]:
    """Digest the received array (after the clock stopped) against the file's digest."""
    array = reply.content.array_records["payload"]["data"]
    chunks = array.slice_array()
    values = array.numpy()
    digest = hashlib.sha256(values.data).hexdigest()
    return {
        "bytes": int(values.nbytes),
        "serialized_bytes": len(array.data),
        "chunks": len(chunks),
        "unique_chunks": len({object_id for object_id, _ in chunks}),
        "sha256": digest,
        "intact": digest == expected_sha256,
    }


def measure(grid: Grid, context: Context) -> dict[str, Any]:
    config = context.run_config
    node = wait_for_node(grid, float(config["node-wait-s"]))
    tiny, _ = exchange(grid, node, "")
    big, reply = exchange(grid, node, str(config["payload"]))
    check = verify(reply, str(config["sha256"]))
    return {"node": node, "serverapp_pid": os.getpid(), "tiny": tiny, "big": big, "check": check}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Write the times (or the error) as JSON to the run config's `out`."""
    out = Path(str(context.run_config["out"]))
    try:
        result = measure(grid, context)
    except Exception as error:  # the benchmark must see any failure, not wait for a file
        result = {"error": f"{type(error).__name__}: {error}"}
    partial = out.with_suffix(".part")
    partial.write_text(json.dumps(result, indent=2))
    os.replace(partial, out)
