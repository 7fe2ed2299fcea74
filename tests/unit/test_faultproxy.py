"""The reliability suite's fault proxy, measured over loopback: its delay, jitter, bandwidth cap,
resets, blackhole and cut really happen, in a thread and as a process of its own."""

from __future__ import annotations

import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from faultproxy import FaultProxy, Faults, ProxyProcess

PROXY = Path(__file__).resolve().parents[1] / "reliability" / "faultproxy.py"


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with self.request:
            while data := self.request.recv(65536):
                self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[str]:
    """An echo server on loopback: HOST:PORT."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    started = time.perf_counter()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed"
        got += chunk
    assert got == payload
    return time.perf_counter() - started


def silent(sock: socket.socket, wait_s: float) -> bool:
    """Whether nothing arrives on `sock` for `wait_s` seconds."""
    sock.settimeout(wait_s)
    try:
        return not sock.recv(1)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(10.0)


def test_delay_applies_each_way_and_jitter_spreads_it(echo: str) -> None:
    with FaultProxy("127.0.0.1:0", echo, Faults(delay_s=0.2)) as proxy, connect(proxy.address) as s:
        rtts = [round_trip(s) for _ in range(3)]
    assert all(0.39 <= t < 2.0 for t in rtts), rtts  # 0.2 s out and 0.2 s back
    faults = Faults(delay_s=0.1, jitter_s=0.05, seed=3)
    with FaultProxy("127.0.0.1:0", echo, faults) as proxy, connect(proxy.address) as s:
        rtts = [round_trip(s) for _ in range(8)]
    assert all(0.099 <= t < 2.0 for t in rtts), rtts  # each way within 0.1 +- 0.05 s
    assert statistics.pstdev(rtts) > 0.01, rtts


def test_the_bandwidth_cap_paces_every_connection_together(echo: str) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    with FaultProxy("127.0.0.1:0", echo, Faults(bytes_per_s=2_000_000)) as proxy:
        with connect(proxy.address) as a, connect(proxy.address) as b:
            started = time.perf_counter()
            threads = [threading.Thread(target=round_trip, args=(s, payload)) for s in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            took = time.perf_counter() - started
        # The proxy counts a chunk once its write returns, which may be just after the client
        # has read it.
        deadline = time.monotonic() + 5
        while (stats := proxy.stats()).bytes_down < 2 * len(payload):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
    # 2 MiB each way through one 2 MB/s budget: at least ~1 s, whatever the split.
    assert took >= 0.95, took
    assert stats.bytes_up == stats.bytes_down == 2 * len(payload)
    assert stats.connections == 2


def test_resets_are_rsts_drawn_per_chunk_from_a_seeded_generator(echo: str) -> None:
    with FaultProxy("127.0.0.1:0", echo, Faults(reset_probability=1.0)) as proxy:
        with connect(proxy.address) as s, pytest.raises(ConnectionResetError):
            round_trip(s)
        assert proxy.stats().resets == 1

    def outcomes(seed: int) -> list[bool]:
        survived = []
        with FaultProxy("127.0.0.1:0", echo, Faults(reset_probability=0.5, seed=seed)) as proxy:
            for _ in range(16):
                with connect(proxy.address) as s:
                    try:
                        round_trip(s)
                        survived.append(True)
                    except (ConnectionResetError, AssertionError):
                        survived.append(False)
            assert proxy.stats().resets == survived.count(False)
        return survived

    first = outcomes(seed=11)
    assert 0 < first.count(False) < 16
    assert outcomes(seed=11) == first  # the same draws again


def test_a_blackhole_holds_old_and_new_connections_until_lifted(echo: str) -> None:
    with FaultProxy("127.0.0.1:0", echo) as proxy, connect(proxy.address) as old:
        round_trip(old)
        proxy.blackhole(True)
        old.sendall(b"held")
        with connect(proxy.address) as new:  # accepted, but nothing passes
            new.sendall(b"also")
            assert silent(old, 0.5) and silent(new, 0.5)
            before = proxy.stats()
            proxy.blackhole(False)
            assert old.recv(4) == b"held" and new.recv(4) == b"also"
    assert before.blackholed == 2 and before.bytes_up == before.bytes_down == 4


def test_a_cut_resets_everything_until_lifted(echo: str) -> None:
    with FaultProxy("127.0.0.1:0", echo) as proxy:
        with connect(proxy.address) as old:
            round_trip(old)
            proxy.cut(True)
            with pytest.raises((ConnectionResetError, AssertionError, BrokenPipeError)):
                round_trip(old)
        # The reset may come before connect() returns (a loaded machine), or on the first read.
        with pytest.raises((ConnectionResetError, AssertionError)), connect(proxy.address) as new:
            round_trip(new)
        proxy.cut(False)
        with connect(proxy.address) as again:
            round_trip(again)
        assert proxy.stats().cut == 2


def test_as_a_process_it_is_driven_through_its_control_folder(echo: str, tmp_path: Path) -> None:
    proxy = ProxyProcess(tmp_path / "p", "127.0.0.1:0", echo, Faults(delay_s=0.05)).start()
    try:
        with connect(proxy.address) as s:
            assert round_trip(s) >= 0.099
            proxy.blackhole(True)
            s.sendall(b"x")
            assert silent(s, 0.5)
            proxy.blackhole(False)
            assert s.recv(1) == b"x"
            proxy.reset_all()
            with pytest.raises((ConnectionResetError, AssertionError)):
                round_trip(s)
    finally:
        stats = proxy.stop()
    assert proxy.process is not None and proxy.process.returncode == 0
    assert (stats.bytes_up, stats.blackholed, stats.resets) == (5, 1, 1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--listen", "nowhere", "--target", "127.0.0.1:1"], "HOST:PORT"),
        (["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--delay", "-1"], "delay_s"),
        (["--listen", "127.0.0.1:0", "--target", "x:1", "--reset-probability", "2"], "[0, 1]"),
    ],
)
def test_bad_arguments_are_refused_clearly(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, str(PROXY), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_faults_check_their_fields() -> None:
    with pytest.raises(ValueError, match="bytes_per_s"):
        Faults(bytes_per_s=0)
    with pytest.raises(ValueError, match="jitter_s"):
        Faults(jitter_s=float("nan"))
