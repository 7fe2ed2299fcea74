"""A fault-injecting TCP proxy for the reliability tests: delay, jitter, a bandwidth cap, random
resets, a blackhole and a cut, in a thread of the test or as a process of its own.

In a thread::

    with FaultProxy("127.0.0.1:0", "127.0.0.1:7443", Faults(delay_s=0.2, seed=1)) as proxy:
        proxy.blackhole(True); ...; proxy.blackhole(False)
        print(proxy.stats())

As a process (e.g. under `ip netns exec NS`), controlled through files in --control DIR: it
reads DIR/control.json (any Faults field, "blackhole" and "cut" as booleans, "reset_all" as a
counter: each increase resets every connection) and writes DIR/stats.json::

    python tests/reliability/faultproxy.py --listen 10.0.0.1:7443 --target 127.0.0.1:7443 \\
        --delay 0.2 --jitter 0.05 --rate 4000000 --reset-probability 0.001 --control DIR

ProxyProcess starts and drives such a process with the same methods as FaultProxy.

Each chunk read (up to 64 KiB) waits for the bandwidth cap (bytes_per_s per direction, shared
by all connections, as on one link), then is delivered after delay_s +- a uniform jitter_s, in
order. A chunk draws a reset (RST, via SO_LINGER 0) with reset_probability, from a seeded
generator. A blackhole passes no bytes and holds new connections unconnected; lifted, the held
bytes flow, as on a link that recovers. A cut resets every connection, and new ones at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

CHUNK_BYTES = 64 * 1024
QUEUE_CHUNKS = 64  # chunks in flight per direction of a connection: the proxy's own buffer
CONNECT_TIMEOUT_S = 10.0
CONTROL_FILE, STATS_FILE = "control.json", "stats.json"
T = TypeVar("T")


@dataclass(frozen=True)
class Faults:
    """What the proxy does to the traffic it carries; the defaults do nothing."""

    delay_s: float = 0.0
    jitter_s: float = 0.0
    bytes_per_s: float | None = None  # per direction, over all connections; None: no cap
    reset_probability: float = 0.0  # per chunk forwarded
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.delay_s >= 0 or not self.jitter_s >= 0:  # NaN fails these too
            raise ValueError(
                f"delay_s and jitter_s must be >= 0, not {self.delay_s}, {self.jitter_s}"
            )
        if self.bytes_per_s is not None and not self.bytes_per_s > 0:
            raise ValueError(
                f"bytes_per_s must be > 0 (or None for no cap), not {self.bytes_per_s}"
            )
        if not 0 <= self.reset_probability <= 1:
            raise ValueError(f"reset_probability must be in [0, 1], not {self.reset_probability}")


@dataclass(frozen=True)
class ProxyStats:
    """What a proxy has done so far. bytes_up runs client to target, bytes_down back."""

    address: str = ""
    connections: int = 0
    active: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    resets: int = 0  # connections reset by reset_probability or reset_all
    blackholed: int = 0  # connections held by a blackhole (open when it began, or new in it)
    cut: int = 0  # connections reset by a cut, or refused during one
    upstream_failures: int = 0  # connections whose target could not be reached

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def parse_address(text: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"; ValueError with the reason otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not an address of the form HOST:PORT")
    return host, int(port)


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST, not FIN: SO_LINGER on with a zero timeout, then close."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Reset(Exception):
    """This connection drew a random reset."""


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    task: asyncio.Task[None] | None = None
    upstream: asyncio.StreamWriter | None = None

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.upstream)
        if self.task is not None:
            self.task.cancel()


class FaultProxy:
    """A TCP proxy from `listen` to `target` that applies `faults`, served by an event loop in a
    thread of its own between start() and stop(). Every method may be called from any thread."""

    def __init__(self, listen: str, target: str, faults: Faults | None = None) -> None:
        self.listen, self.target = parse_address(listen), parse_address(target)
        self.faults = faults or Faults()
        self._rng = random.Random(self.faults.seed)
        self._counts: Counter[str] = Counter()  # named as ProxyStats' fields
        self._next_free = {"up": 0.0, "down": 0.0}  # when each way's bandwidth budget is free
        self._conns: set[_Conn] = set()
        self._cut = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self.address = ""

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind and serve; returns once the proxy accepts connections (OSError if it cannot)."""
        ready: list[BaseException | None] = []
        started = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
                ready.append(None)
            except BaseException as exc:  # handed to start()'s caller
                ready.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=serve, name=f"faultproxy {self.listen}", daemon=True)
        self._thread.start()
        started.wait()
        if ready[0] is not None:
            raise ready[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _open(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, *self.listen)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = _format(host, port)

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = [conn.task for conn in self._conns if conn.task is not None]
        for conn in list(self._conns):
            conn.reset()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # -- control -------------------------------------------------------------------------------

    def _in_loop(self, work: Callable[[], T]) -> T:
        """Run `work` on the proxy's loop (its state is the loop's alone) and return its result."""
        assert self._loop is not None, "start() the proxy first"

        async def run() -> T:
            return work()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def set_faults(self, faults: Faults) -> None:
        """Apply new faults from now on (the random generator keeps its state unless `faults`
        brings another seed)."""

        def apply() -> None:
            if faults.seed != self.faults.seed:
                self._rng = random.Random(faults.seed)
            self.faults = faults

        self._in_loop(apply)

    def blackhole(self, on: bool = True) -> None:
        """Hold every connection, old and new, passing no bytes; or let them flow again."""

        def apply() -> None:
            assert self._flowing is not None
            if on and self._flowing.is_set():
                self._counts["blackholed"] += len(self._conns)
            (self._flowing.clear if on else self._flowing.set)()

        self._in_loop(apply)

    def cut(self, on: bool = True) -> None:
        """Reset every connection, and reset new ones at once until lifted."""

        def apply() -> None:
            self._cut = on
            self._counts["cut"] += self._reset_conns() if on else 0

        self._in_loop(apply)

    def reset_all(self) -> int:
        """Reset every connection now; how many there were."""

        def apply() -> int:
            count = self._reset_conns()
            self._counts["resets"] += count
            return count

        return self._in_loop(apply)

    def _reset_conns(self) -> int:
        conns = list(self._conns)
        for conn in conns:
            conn.reset()
        return len(conns)

    def stats(self) -> ProxyStats:
        """The figures so far (plain reads of counters only the proxy's loop writes)."""
        return ProxyStats(address=self.address, active=len(self._conns), **self._counts)

    # -- traffic -------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._counts["connections"] += 1
        if self._cut:
            self._counts["cut"] += 1
            _reset(writer)
            return
        conn = _Conn(writer, asyncio.current_task())
        self._conns.add(conn)
        try:
            await self._relay(conn, reader)
        except asyncio.CancelledError:
            pass  # reset by a cut, reset_all or stop()
        finally:
            self._conns.discard(conn)
            conn.task = None
            conn.reset()

    async def _relay(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        assert self._flowing is not None
        if not self._flowing.is_set():
            self._counts["blackholed"] += 1
        await self._flowing.wait()
        try:
            up_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(*self.target), CONNECT_TIMEOUT_S
            )
        except (TimeoutError, OSError):
            self._counts["upstream_failures"] += 1
            return
        conn.upstream = upstream
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(reader, upstream, "up"))
                group.create_task(self._pump(up_reader, conn.client, "down"))
        except* (_Reset, OSError):
            pass  # drawn here, or a peer's: the caller resets both ends

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, way: str) -> None:
        """Read from `src` and hand each chunk on with its due time; a chunk may draw a reset."""
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        sender = asyncio.create_task(self._deliver(queue, dst, way))
        due = 0.0
        try:
            while True:
                await self._flowing.wait()
                data = await src.read(CHUNK_BYTES)
                f = self.faults
                if data and f.reset_probability and self._rng.random() < f.reset_probability:
                    self._counts["resets"] += 1
                    raise _Reset
                if data and f.bytes_per_s:
                    now = loop.time()
                    self._next_free[way] = (
                        max(self._next_free[way], now) + len(data) / f.bytes_per_s
                    )
                    await asyncio.sleep(self._next_free[way] - now)
                jitter = self._rng.uniform(-f.jitter_s, f.jitter_s) if f.jitter_s else 0.0
                due = max(due, loop.time() + max(f.delay_s + jitter, 0.0))
                await queue.put((due, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter, way: str
    ) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(due - loop.time(), 0.0))
            await self._flowing.wait()
            if not data:  # the source half-closed: so does the destination
                if dst.can_write_eof():
                    dst.write_eof()
                return
            dst.write(data)
            await dst.drain()
            self._counts[f"bytes_{way}"] += len(data)


class ProxyProcess:
    """faultproxy.py as a process of its own (after `prefix`, e.g. ip netns exec NS), driven
    through the files in `folder`, with FaultProxy's control methods."""

    def __init__(
        self,
        folder: Path,
        listen: str,
        target: str,
        faults: Faults | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.folder, self.faults = folder, faults or Faults()
        self.command = [*prefix, sys.executable, str(Path(__file__).resolve())]
        self.command += ["--listen", listen, "--target", target, "--control", str(folder)]
        self.command += _fault_args(self.faults)
        self.process: subprocess.Popen[bytes] | None = None
        self._control: dict[str, Any] = {"reset_all": 0}

    def start(self, timeout: float = 60.0) -> ProxyProcess:
        """Start it and wait until it accepts connections (it has written its stats)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_control()
        log = (self.folder / "proxy.log").open("ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while not (self.folder / STATS_FILE).exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_text = (self.folder / "proxy.log").read_text(errors="replace")
                raise RuntimeError(f"the fault proxy did not start: {log_text}")
            time.sleep(0.05)
        return self

    def stop(self) -> ProxyStats:
        """SIGTERM, wait, and the final figures."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        return self.stats()

    @property
    def address(self) -> str:
        return self.stats().address

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self._control.update(dataclasses.asdict(faults))
        self._apply()

    def blackhole(self, on: bool = True) -> None:
        self._control["blackhole"] = on
        self._apply()

    def cut(self, on: bool = True) -> None:
        self._control["cut"] = on
        self._apply()

    def reset_all(self) -> None:
        self._control["reset_all"] += 1
        self._apply()

    def stats(self) -> ProxyStats:
        return ProxyStats(**json.loads((self.folder / STATS_FILE).read_text()))

    def _write_control(self) -> None:
        _write_atomic(self.folder / CONTROL_FILE, json.dumps(self._control))

    def _applied(self) -> int:
        try:
            return int((self.folder / "applied").read_text())
        except (FileNotFoundError, ValueError):
            return -1

    def _apply(self, timeout: float = 30.0) -> None:
        """Write the control file and wait until the process has acted on it."""
        self._control["serial"] = self._control.get("serial", 0) + 1
        self._write_control()
        deadline = time.monotonic() + timeout
        while self._applied() < self._control["serial"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the fault proxy did not act on its control file")
            time.sleep(0.02)


def _fault_args(f: Faults) -> list[str]:
    args = ["--delay", str(f.delay_s), "--jitter", str(f.jitter_s)]
    args += ["--reset-probability", str(f.reset_probability)]
    if f.bytes_per_s is not None:
        args += ["--rate", str(f.bytes_per_s)]
    return args + (["--seed", str(f.seed)] if f.seed is not None else [])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class _Controller:
    """The process side of ProxyProcess: acts on control.json, writes stats.json."""

    def __init__(self, proxy: FaultProxy, folder: Path) -> None:
        self.proxy, self.folder = proxy, folder
        self.seen = ""
        self.reset_all = 0

    def poll(self) -> None:
        try:
            text = (self.folder / CONTROL_FILE).read_text()
        except FileNotFoundError:
            return
        if text == self.seen:
            return
        self.seen = text
        try:
            control = json.loads(text)
            changes = {k: control[k] for k in Faults.__dataclass_fields__ if k in control}
            faults = dataclasses.replace(self.proxy.faults, **changes)
        except (ValueError, TypeError) as exc:
            print(f"faultproxy: ignoring {CONTROL_FILE}: {exc}", file=sys.stderr, flush=True)
            return
        self.proxy.set_faults(faults)
        if "blackhole" in control:
            self.proxy.blackhole(bool(control["blackhole"]))
        if "cut" in control:
            self.proxy.cut(bool(control["cut"]))
        if int(control.get("reset_all", 0)) > self.reset_all:
            self.reset_all = int(control["reset_all"])
            self.proxy.reset_all()
        _write_atomic(self.folder / "applied", str(int(control.get("serial", 0))))

    def write_stats(self) -> None:
        _write_atomic(self.folder / STATS_FILE, self.proxy.stats().to_json())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on (port 0: any)")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to each chunk")
    parser.add_argument("--jitter", type=float, default=0.0, help="+- seconds, uniform")
    parser.add_argument("--rate", type=float, default=None, help="bytes/s per direction")
    parser.add_argument("--reset-probability", type=float, default=0.0, help="per chunk")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--control", type=Path, help="folder of control.json and stats.json")
    args = parser.parse_args(argv)
    try:
        faults = Faults(args.delay, args.jitter, args.rate, args.reset_probability, args.seed)
        proxy = FaultProxy(args.listen, args.target, faults).start()
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    controller = _Controller(proxy, args.control) if args.control else None
    print(f"faultproxy listening on {proxy.address}, forwarding to {args.target}", flush=True)
    try:
        while not stop.wait(0.05):
            if controller is not None:
                controller.poll()
                controller.write_stats()
    finally:
        proxy.stop()
        if controller is not None:
            controller.write_stats()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
