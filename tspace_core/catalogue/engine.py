"""Opening a catalogue database (SQLite tuned for one multi-threaded writer, or PostgreSQL) and
migrating it to the newest schema with the Alembic scripts shipped in this package."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ArgumentError, DBAPIError

from tspace_core.catalogue.errors import CatalogueError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 30_000
# Execution option marking an engine whose SQLite transactions take the write lock up front.
WRITE_OPTION = "tspace_write"
# libpq settings unless the URL sets them: give up on a server that does not answer a connect,
# and notice a silently vanished one (no FIN, no RST) within about a minute, not hours.
POSTGRES_CONNECT_ARGS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    # Sent data unacknowledged this long (a link that went dark mid-statement) drops the
    # connection, so an attempt cannot outlast the retry budget by TCP's retransmissions.
    "tcp_user_timeout": 20_000,
}
# PostgreSQL errors that mean the connection is gone, not that the statement was wrong:
# class 08 (connection exception) and the server shutting down or starting up (57P01 admin
# shutdown, 57P02 crash shutdown, 57P03 cannot connect now).
DISCONNECT_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """The URL of a SQLite catalogue file, the default store."""
    return f"sqlite:///{Path(path).resolve()}"


def make_engine(url: str) -> Engine:
    """An engine for `url`: a SQLite file (WAL, busy timeout, foreign keys) or PostgreSQL."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise CatalogueError("invalid_argument", f"bad catalogue URL {url!r}: {e}") from e
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise CatalogueError(
                "invalid_argument",
                "an in-memory SQLite catalogue cannot be shared between threads; "
                "use a file URL such as sqlite:///catalogue.db",
            )
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"check_same_thread": False})
        _tune_sqlite(engine)
        return engine
    if backend == "postgresql":
        # pool_pre_ping replaces a pooled connection the server dropped before it is used; a
        # disconnect met mid-transaction invalidates the whole pool (SQLAlchemy's default), so
        # the next transaction opens fresh connections.
        defaults = {k: v for k, v in POSTGRES_CONNECT_ARGS.items() if k not in parsed.query}
        return create_engine(parsed, pool_pre_ping=True, connect_args=defaults)
    raise CatalogueError(
        "invalid_argument",
        f"unsupported catalogue database {backend!r}; use sqlite:///PATH or postgresql+psycopg://...",
    )


def is_disconnect(exc: DBAPIError, backend: str) -> bool:
    """Whether `exc` means the database connection was lost or could not be made (the server
    stopped, restarted or is unreachable), as opposed to a statement the database refused."""
    if exc.connection_invalidated:
        return True
    if backend != "postgresql":
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is None:
        # psycopg raises OperationalError without an SQLSTATE only when it has no working
        # connection: it could not connect, or the server vanished.
        return type(exc.orig).__name__ in ("OperationalError", "InterfaceError")
    return sqlstate in DISCONNECT_SQLSTATES or sqlstate.startswith("08")


def is_busy(exc: DBAPIError, backend: str) -> bool:
    """Whether `exc` is SQLite still finding the database locked after its busy timeout."""
    return backend == "sqlite" and "database is locked" in str(exc.orig)


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling defers BEGIN and cannot take the write lock
        # early; turn it off and issue BEGIN ourselves (SQLAlchemy's documented recipe).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # A deferred transaction that reads and then writes fails at once with SQLITE_BUSY
        # when another writer committed in between; IMMEDIATE waits for the lock instead.
        write = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for the shipped scripts; no alembic.ini is needed."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine) -> None:
    """Bring the database behind `engine` to the newest schema (a no-op when it is there)."""
    with engine.execution_options(**{WRITE_OPTION: True}).begin() as connection:
        command.upgrade(alembic_config(connection), "head")


def migrate(url: str) -> None:
    """Run `alembic upgrade head` on the catalogue at `url`."""
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
