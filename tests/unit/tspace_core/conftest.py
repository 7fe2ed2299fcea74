"""Catalogue fixtures shared by the catalogue's contract tests: `cat` runs each test against a
fresh SQLite file and a fresh schema in a real PostgreSQL database."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import make_url

from tspace_core.catalogue import Catalogue, sqlite_url

PG_ADMIN_URL = os.environ.get(
    "TSPACE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


# --- one SQLite file per test; one PostgreSQL database per module, reset per test ---


def _pg_conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    try:
        admin = psycopg.connect(_pg_conninfo(PG_ADMIN_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        reason = f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {e}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"tspace_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "catalogue.db")
    database: str = request.getfixturevalue("pg_database")
    with psycopg.connect(_pg_conninfo(database), autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return database


@pytest.fixture
def cat(url: str) -> Iterator[Catalogue]:
    with Catalogue(url) as catalogue:
        yield catalogue
