"""A private PostgreSQL server for reliability tests: made with initdb in a temporary folder,
served on a free loopback port, and stopped (cleanly or like a crash) and started at will.

The machine's shared server on port 5432 is never touched. As root, the server runs as the
`postgres` OS user, since initdb and the postmaster refuse to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg

START_TIMEOUT_S = 60
STOP_MODES = ("smart", "fast", "immediate")


def _bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(found[-1]).parent if found else None


def unavailable_reason() -> str | None:
    """Why a private server cannot run here (for pytest.skip), or None when it can."""
    if _bin_dir() is None:
        return "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no `postgres` OS user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root without runuser(1) to drop to the `postgres` user"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One private server: `start()`, `stop(mode)`, `restart()`, `url`; `cleanup()` (or leaving
    the `with` block) stops it and removes its folder. Trust authentication, loopback only."""

    def __init__(self, database: str = "postgres") -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        self.bin = _bin_dir()
        self.database = database
        self.root = Path(tempfile.mkdtemp(prefix="tspace-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.running = False
        self._as_postgres = os.geteuid() == 0
        try:
            self._init()
        except BaseException:
            self.cleanup()
            raise

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the server's database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        assert self.bin is not None
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        with (self.root / "ctl.log").open("a") as out:
            # Never a pipe: the postmaster pg_ctl starts would inherit it and hold it open.
            done = subprocess.run(
                command, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            )
        if done.returncode != 0:
            raise RuntimeError(
                f"{args[0]} {args[1] if len(args) > 1 else ''} failed ({done.returncode}): "
                + self.tail()
            )

    def create_database(self, name: str) -> str:
        """Create an empty database `name` (letters, digits, _) on the running server; its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and _ only")
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=10",
            autocommit=True,
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def tail(self, lines: int = 20) -> str:
        """The end of the server's and pg_ctl's logs, for failure messages."""
        text = ""
        for path in (self.root / "ctl.log", self.log):
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def _init(self) -> None:
        self.sockets.mkdir()
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sockets}'",
            "max_connections": "60",
            "shared_buffers": "16MB",
            # Throwaway data on a machine that does not crash: skip the disk flushes. Commits
            # stay synchronous, so a stop in "immediate" mode, like a crash, loses none of them.
            "fsync": "off",
            "full_page_writes": "off",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_S),
            "start",
        )  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" rolls back and disconnects every client, "immediate" quits
        at once like a crash (the next start recovers from the WAL)."""
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode {mode!r}; expected one of {STOP_MODES}")
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until the port accepts TCP connections (the server may still be recovering)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"the private PostgreSQL on port {self.port} did not come up")

    def cleanup(self) -> None:
        """Stop the server if it runs (like a crash: its data is thrown away) and remove it."""
        try:
            if self.data.joinpath("postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # removing the folder below is still worth doing
        finally:
            self.running = False
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
