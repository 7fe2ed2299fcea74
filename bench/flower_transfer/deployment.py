"""A Flower SuperLink and SuperNode on loopback, and one timed array reply per `flwr run`.

Flower lives in a virtual environment of its own (flwr 1.42 pins typer < 0.21 and rich < 15,
which tspace's environment is past), so this module only starts that environment's executables:
`flower-superlink --insecure` and `flower-supernode --insecure` on 127.0.0.1, each of which
starts its own `flower-superexec`, which starts the ServerApp and ClientApp processes of a run.
Telemetry and the update check are off, runtime dependency installation is off on both, and
FLWR_HOME is a folder of the benchmark's, so nothing is read from or written to ~/.flwr.

Each `transfer` is one `flwr run` of ./app: the ServerApp (app/flower_xfer/server_app.py) sends
the SuperNode a tiny request and then a big one, and the ClientApp replies with the file's bytes
as one numpy uint8 array in an ArrayRecord. Three spans are measured per reply:

- hop: SuperNode's "Sending" log line to its "Sent successfully" line, i.e. PushMessages plus
  every 5 MiB chunk's PushObject to the SuperLink: the array moving from SuperNode to SuperLink.
  The lines are stamped here as they arrive on the SuperNode's output pipe. The SuperNode starts
  once the reply message is registered and forwards chunks as they arrive from the ClientApp
  (polling 0.5 s for one not there yet), so the hop overlaps the ClientApp's upload to it.
- reply path: ClientApp returns (its time.time()) to the ServerApp holding the whole reply
  (its time.time()): ClientApp to SuperNode, the SuperNode's 0.5 s reply poll, the hop, the
  ServerApp's 50 ms pull loop and its PullObject calls (with Flower's 1 s pull back-off when a
  chunk is not there yet) and the array's reassembly.
- round trip: the ServerApp's push of the request to that same point; it adds the SuperNode's
  3 s poll for work, the SuperExec's 1 s task poll and a fresh ClientApp process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

APP = Path(__file__).with_name("app")
START_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 60.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SENDING = "Sending: query message (ID: {})"
SENT, SEND_FAILED = "Sent successfully", "Failed to send message"
CONFIG_TOML = """
[superlink]
default = "bench"

[superlink.bench]
address = "127.0.0.1:{port}"
insecure = true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LineClock(threading.Thread):
    """A process's output line by line, each stamped with time.time() when it arrives."""

    def __init__(self, stream: IO[bytes], log: Path) -> None:
        super().__init__(name=f"lines-{log.stem}", daemon=True)
        self.stream, self.log = stream, log
        self.lines: list[tuple[float, str]] = []
        self.closed = False
        self.changed = threading.Condition()

    def run(self) -> None:
        with self.log.open("w") as log:
            for raw in self.stream:
                stamp = time.time()
                line = ANSI.sub("", raw.decode(errors="replace")).rstrip()
                log.write(f"{stamp:.3f} {line}\n")
                log.flush()
                with self.changed:
                    self.lines.append((stamp, line))
                    self.changed.notify_all()
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def wait_for(self, texts: tuple[str, ...], start: int = 0, timeout_s: float = 60.0) -> int:
        """The index of the first line from `start` on that contains one of `texts`."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                for i in range(start, len(self.lines)):
                    if any(text in self.lines[i][1] for text in texts):
                        return i
                start = len(self.lines)
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    why = "the process exited" if self.closed else f"{timeout_s:.0f} s passed"
                    raise TimeoutError(f"no line with {texts} in {self.log}: {why}")
                self.changed.wait(left)


def spawn(command: list[str], env: dict[str, str], log: Path) -> tuple[Any, LineClock]:
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    lines = LineClock(process.stdout, log)
    lines.start()
    return process, lines


def wait_gone(pids: list[int], timeout_s: float) -> None:
    """Wait for other processes of the run (not our children) to exit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and not is_zombie(p)]
        if not alive:
            return
        time.sleep(0.05)


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@dataclasses.dataclass
class FlowerDeployment:
    """A running SuperLink and SuperNode, and the environment `flwr run` needs to reach them."""

    bin: Path
    home: Path
    env: dict[str, str]
    link: subprocess.Popen[bytes]
    node: subprocess.Popen[bytes]
    link_lines: LineClock
    node_lines: LineClock
    runs: int = 0

    @classmethod
    def start(cls, venv: Path, root: Path) -> FlowerDeployment:
        home, bin_ = root / "flwr-home", venv / "bin"
        home.mkdir()
        link_port, node_port = free_port(), free_port()
        (home / "config.toml").write_text(CONFIG_TOML.format(port=link_port))
        env = os.environ | {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # SuperExec finds flwr-serverapp and flwr-clientapp on PATH.
            "PATH": f"{bin_}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(venv),
        }
        link_cmd = [str(bin_ / "flower-superlink"), "--insecure", "--host", "127.0.0.1"]
        link_cmd += ["--port", str(link_port), "--disable-runtime-dependency-installation"]
        link, link_lines = spawn(link_cmd, env, root / "flower-superlink.log")
        link_lines.wait_for(("Uvicorn running",), timeout_s=START_TIMEOUT_S)
        node_cmd = [str(bin_ / "flower-supernode"), "--insecure", "--host", "127.0.0.1"]
        node_cmd += ["--port", str(node_port), "--superlink", f"127.0.0.1:{link_port}"]
        node, node_lines = spawn(node_cmd, env, root / "flower-supernode.log")
        node_lines.wait_for(("SuperNode ID:",), timeout_s=START_TIMEOUT_S)
        return cls(bin_, home, env, link, node, link_lines, node_lines)

    def transfer(self, payload: Path, sha256: str, timeout_s: float) -> dict[str, Any]:
        """One `flwr run`: the ServerApp's JSON plus the SuperNode-to-SuperLink hops."""
        self.runs += 1
        out = self.home / f"result-{self.runs}.json"
        config = {"payload": str(payload), "sha256": sha256, "out": str(out)}
        overrides = self.home / f"run-{self.runs}.toml"
        overrides.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        command = [str(self.bin / "flwr"), "run", str(APP), "bench", "--run-config"]
        started = subprocess.run(
            [*command, str(overrides)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        if started.returncode != 0:
            raise SystemExit(f"flwr run failed:\n{started.stdout}{started.stderr}")
        deadline = time.monotonic() + timeout_s
        while not out.exists():
            if time.monotonic() > deadline:
                return {"error": f"no reply within {timeout_s:.0f} s (see the Flower logs)"}
            if self.link.poll() is not None or self.node.poll() is not None:
                raise SystemExit("a Flower process exited; see flower-*.log")
            time.sleep(0.05)
        result: dict[str, Any] = json.loads(out.read_text())
        if "error" in result:
            return result
        result["hop_s"] = {k: self.hop_s(result[k]["reply_id"]) for k in ("tiny", "big")}
        # Let the run's processes finish before the next configuration is timed.
        pids = [result["serverapp_pid"], result["tiny"]["clientapp_pid"]]
        wait_gone([*pids, result["big"]["clientapp_pid"]], EXIT_TIMEOUT_S)
        return result

    def hop_s(self, reply_id: str) -> float:
        """Seconds from the SuperNode's "Sending" line for `reply_id` to its "Sent" line."""
        lines = self.node_lines
        sending = lines.wait_for((SENDING.format(reply_id),))
        sent = lines.wait_for((SENT, SEND_FAILED), start=sending + 1)
        if SEND_FAILED in lines.lines[sent][1]:
            raise SystemExit(f"the SuperNode could not send {reply_id}: {lines.lines[sent][1]}")
        return lines.lines[sent][0] - lines.lines[sending][0]

    def close(self) -> None:
        for process in (self.node, self.link):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
