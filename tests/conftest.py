"""Test fixtures: a real PostgreSQL for every test that touches the database.

The server is the embedded one (a throwaway data directory) unless
``PG_BROKER_TEST_URL`` names another; either way the session gets a fresh
database of its own, migrated, and dropped at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pg_broker.database import embedded_url, stop_embedded, with_database
from pg_broker.migrate import migrate

TEST_URL_VARIABLE = "PG_BROKER_TEST_URL"
# Tables a test may fill; emptied before each test that asks for `db`.
DATA_TABLES = (
    "job_artifacts", "job_tasks", "jobs",
    "broker_bindings", "broker_queues", "broker_transient_messages",
)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A URL to the test server's maintenance database (an embedded server is
    stopped at the end: pytest deletes old temporary directories under it)."""
    configured = os.environ.get(TEST_URL_VARIABLE, "").strip()
    if configured:
        yield configured
        return
    data_dir = Path(tmp_path_factory.mktemp("embedded")) / "pgdata"
    yield embedded_url(data_dir)
    stop_embedded(data_dir)


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test session."""
    name = f"pg_broker_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(server_url, name)
    migrate(url)
    yield url
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to an emptied test database."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
                sql.SQL(", ").join(sql.Identifier(t) for t in DATA_TABLES)
            )
        )
        yield conn


@pytest.fixture
def broker_env(database_url: str) -> dict[str, str]:
    """Environment for a subprocess (worker, beat, CLI) using the test database."""
    env = dict(os.environ)
    env["PG_BROKER_URL"] = database_url
    env.pop("DATABASE_URL", None)
    return env
