"""Test fixtures: a real PostgreSQL for every test that touches the database.

The tests come in three tiers, each runnable alone (``python -m pytest
tests/unit``):

- ``unit/``: pure logic, no database (its conftest refuses the fixtures
  below), seconds for the whole tier;
- ``integration/``: real PostgreSQL, in this process;
- ``e2e/``: real Celery workers, Flower and CLI subprocesses.

Every fixture here is lazy: a server starts only when a test asks for one.
It is the embedded server (a throwaway data directory) unless
``PG_BROKER_TEST_URL`` names another; either way the session gets a fresh
database of its own, migrated, and dropped at the end. The helper modules
beside this file (``taskrows``, ``celery_workers``...) are importable from
every tier.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pg_broker.database import embedded_url, stop_embedded, with_database
from pg_broker.migrate import migrate

# Helper modules that are also fixture plugins: rewrite their asserts too.
pytest.register_assert_rewrite("transport_support", "pgbouncer")

TEST_URL_VARIABLE = "PG_BROKER_TEST_URL"
# Tables a test may fill; emptied before each test that asks for `db`.
DATA_TABLES = (
    "job_artifacts", "job_tasks", "job_tasks_history", "jobs",
    "broker_bindings", "broker_queues", "broker_transient_messages",
    "task_results", "task_result_chords", "task_result_chord_parts",
)


@pytest.fixture(scope="session")
def new_data_dir() -> Iterator[Callable[[], Path]]:
    """Makes data directories for embedded servers, outside pytest's own
    temporary directories: pytest deletes all but the last three sessions'
    ones, also while another session's server still runs there (PostgreSQL
    shuts down when its postmaster.pid vanishes). At the end of the session
    the servers are stopped and the directories removed."""
    made: list[Path] = []

    def make() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="pg_broker_test_")) / "pgdata")
        return made[-1]

    yield make
    for data_dir in made:
        stop_embedded(data_dir)
        shutil.rmtree(data_dir.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def server_url(new_data_dir: Callable[[], Path]) -> str:
    """A URL to the test server's maintenance database."""
    configured = os.environ.get(TEST_URL_VARIABLE, "").strip()
    if configured:
        return configured
    return embedded_url(new_data_dir())


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A fresh database for this test session, migrated with the Supabase layer."""
    name = f"pg_broker_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(server_url, name)
    migrate(url, supabase=True)
    yield url
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def new_database(server_url: str) -> Iterator[Callable[..., str]]:
    """Makes empty databases on the test server (unique names: other sessions
    may use the same server), optionally owned by a role; drops them when the
    test ends. Ask for it after a role fixture whose role owns one."""
    made: list[str] = []

    def make(owner: str | None = None) -> str:
        name = f"pg_broker_test_{uuid.uuid4().hex[:10]}"
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner:
            statement += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(statement)
        made.append(name)
        return with_database(server_url, name)

    yield make
    with psycopg.connect(server_url, autocommit=True) as admin:
        for name in made:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                          .format(sql.Identifier(name)))


SUPABASE_UID = """CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE
    AS $$ SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$"""


@pytest.fixture
def supabase_like_url(new_database: Callable[..., str], database_url: str) -> str:
    """A fresh database prepared as Supabase ships one: schema auth with an
    auth.uid() of its own (here the older `request.jwt.claim.sub` form, so it
    is told apart from ours), and default privileges that grant every new
    table, sequence and function in public to anon and authenticated.
    (database_url: the roles exist once the session database is migrated.)"""
    url = new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA auth")
        conn.execute(SUPABASE_UID)
        conn.execute("GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role")
        for kind in ("TABLES", "SEQUENCES", "FUNCTIONS"):
            conn.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public"
                         f" GRANT ALL ON {kind} TO anon, authenticated, service_role")
    return url


@pytest.fixture
def empty_database(new_database: Callable[..., str], database_url: str) -> str:
    """The URL of a fresh database that is not migrated, dropped after the test
    (database_url: the roles exist once the session database is migrated)."""
    return new_database()


@pytest.fixture
def own_database(empty_database: str) -> str:
    """A fresh migrated database of the test's own (one it may make read-only)."""
    migrate(empty_database)
    return empty_database


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
