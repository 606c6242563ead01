"""Where the database is: the embedded server (started once however many
processes ask), the configured URL and the error a user sees when it cannot be
reached; and a fresh server where the migrating role is no superuser."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from taskrows import add_job, add_tasks, claim

from pg_broker.database import (
    DatabaseUnavailable,
    connect,
    database_url,
    embedded_url,
    mask_url,
    stop_embedded,
    with_database,
)
from pg_broker.migrate import LayerFailed, applied_versions, discover, migrate

PROCESSES = 4


def _ask_for_embedded(data_dir: str, results) -> None:
    url = embedded_url(Path(data_dir))
    with psycopg.connect(url) as conn:
        (database,) = conn.execute("SELECT current_database()").fetchone()
    results.put((url, database))


@pytest.fixture(scope="module")
def fresh_server(new_data_dir: Callable[[], Path]) -> Iterator[tuple[Path, list]]:
    """A data directory nobody initialised, asked for by several processes at
    once (as worker, beat and a producer starting together do); the directory
    and what each process got. The server is stopped afterwards."""
    data_dir = new_data_dir()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    children = [ctx.Process(target=_ask_for_embedded, args=(str(data_dir), results))
                for _ in range(PROCESSES)]
    for child in children:
        child.start()
    try:
        for child in children:
            child.join(120)
        answers = [results.get(timeout=5) for child in children if child.exitcode == 0]
        yield data_dir, answers
    finally:
        stop_embedded(data_dir)


def test_processes_asking_at_once_for_the_embedded_server_share_one(fresh_server) -> None:
    data_dir, answers = fresh_server
    assert len(answers) == PROCESSES
    urls = {url for url, _ in answers}
    assert len(urls) == 1
    assert {database for _, database in answers} == {"pg_broker"}
    (url,) = urls
    assert str(data_dir) in url, "the server listens on a socket in its data directory"
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'pg_broker'"
                            ).fetchone() == (1,)


def test_with_nothing_configured_everything_uses_the_embedded_server(
    fresh_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, answers = fresh_server
    monkeypatch.delenv("PG_BROKER_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("PG_BROKER_DATA_DIR", str(data_dir))
    assert database_url() == answers[0][0]


def test_an_embedded_server_that_cannot_start_is_reported_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.delenv("PG_BROKER_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("PG_BROKER_DATA_DIR", str(blocker / "pgdata"))
    with pytest.raises(DatabaseUnavailable) as raised:
        database_url()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"could not start the embedded PostgreSQL in {blocker / 'pgdata'}")
    assert "PG_BROKER_DATA_DIR" in message and "PG_BROKER_URL" in message


def test_a_configured_url_wins_pg_broker_url_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db.example/app")
    assert database_url() == "postgresql://app@db.example/app"
    monkeypatch.setenv("PG_BROKER_URL", "postgresql://broker@db.example/broker")
    assert database_url() == "postgresql://broker@db.example/broker"


UNREACHABLE = "postgresql://broker:s3cret-pw@127.0.0.1:1/broker"


def test_an_unreachable_configured_url_gives_one_line_naming_it_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PG_BROKER_URL", UNREACHABLE)
    with pytest.raises(DatabaseUnavailable) as raised:
        migrate(database_url())
    message = str(raised.value)
    assert "\n" not in message
    assert "s3cret-pw" not in message
    assert "postgresql://broker:***@127.0.0.1:1/broker" in message
    assert "Connection refused" in message
    assert "unset PG_BROKER_URL" in message


@pytest.mark.parametrize("url", ["postgresql://u:pw@127.0.0.1:notaport/db", "nonsense"])
def test_a_malformed_url_is_reported_the_same_way(url: str) -> None:
    with pytest.raises(DatabaseUnavailable, match="no database reachable at"):
        connect(url)


@pytest.mark.parametrize(("url", "masked"), [
    ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u:p%40ss:w@h1:1,h2:2/db", "postgresql://u:***@h1:1,h2:2/db"),
    ("postgresql://u@h/db?sslmode=require&password=pw", "postgresql://u@h/db?sslmode=require&password=***"),
    ("postgres://u@h/db", "postgres://u@h/db"),
    ("postgresql://postgres:@/pg_broker?host=/tmp/x", "postgresql://postgres:@/pg_broker?host=/tmp/x"),
    ("host=h user=u password=pw dbname=d", "host=h user=u password=*** dbname=d"),
    ("host=h password='p w' dbname=d", "host=h password=*** dbname=d"),
])
def test_mask_url_hides_every_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def _admin(url: str, *statements: sql.Composable | str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def test_a_role_created_meanwhile_by_another_database_migration_is_tolerated(
    fresh_server,
) -> None:
    # Roles are per server, migrations per database: another database's 001
    # may create `anon` while ours waits to create it too. Held open here so
    # the race happens every time; the server is left without the roles.
    _, answers = fresh_server
    admin_url = answers[0][0]
    _admin(admin_url, "CREATE DATABASE racing")
    url = with_database(admin_url, "racing")
    outcome: list = []
    try:
        with psycopg.connect(admin_url) as other_migration, \
                psycopg.connect(admin_url, autocommit=True) as watcher:
            other_migration.execute("CREATE ROLE anon NOLOGIN NOINHERIT")
            migrating = threading.Thread(
                target=lambda: outcome.append(_migrate_or_error(url)))
            migrating.start()
            deadline = time.monotonic() + 60
            while not watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'racing'"
                " AND wait_event_type = 'Lock'"
            ).fetchone()[0]:
                assert time.monotonic() < deadline, "the migration never waited for the role"
                time.sleep(0.02)
            other_migration.commit()
        migrating.join(60)
        assert outcome and outcome[0] is None, outcome
        with psycopg.connect(url) as conn:
            assert [v for v, _ in applied_versions(conn)] == [m.version for m in discover()]
    finally:
        _admin(admin_url, "DROP DATABASE IF EXISTS racing WITH (FORCE)",
               "DROP ROLE IF EXISTS anon, authenticated, service_role")


def _migrate_or_error(url: str) -> BaseException | None:
    try:
        migrate(url, supabase=True)
    except Exception as exc:
        return exc
    return None


def test_on_a_server_without_the_supabase_roles_a_non_superuser_owner_can_migrate(
    fresh_server,
) -> None:
    # The roles anon/authenticated/service_role do not exist on this new
    # server. A database owner that may not create roles installs the core
    # schema, and asking it for the Supabase layer tells it what a superuser
    # must run; one with CREATEROLE (but no superuser, so no BYPASSRLS to hand
    # out) installs the layer, and service_role still sees every row through
    # its policies.
    _, answers = fresh_server
    admin_url = answers[0][0]
    for role, option in (("plain_owner", ""), ("creating_owner", " CREATEROLE")):
        _admin(admin_url,
               sql.SQL("CREATE ROLE {} LOGIN" + option).format(sql.Identifier(role)),
               sql.SQL("CREATE DATABASE {} OWNER {}").format(
                   sql.Identifier(role + "_db"), sql.Identifier(role)))

    plain = make_conninfo(with_database(admin_url, "plain_owner_db"), user="plain_owner")
    assert {m.track for m in migrate(plain)} == {"core"}
    with pytest.raises(LayerFailed) as raised:
        migrate(plain, supabase=True)
    message = str(raised.value)
    assert message.startswith("migration 101_supabase_layer.sql failed and was rolled back:")
    assert 'role "anon" does not exist and role "plain_owner" may not create it' in message
    assert "CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS" in message
    with psycopg.connect(admin_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname IN"
                            " ('anon', 'authenticated', 'service_role')").fetchone() == (0,)

    creating = make_conninfo(with_database(admin_url, "creating_owner_db"), user="creating_owner")
    assert [m.version for m in migrate(creating, supabase=True)] == [
        m.version for m in discover()]
    with psycopg.connect(admin_url) as conn:
        assert conn.execute(
            "SELECT rolname, rolbypassrls FROM pg_roles"
            " WHERE rolname IN ('anon', 'authenticated', 'service_role') ORDER BY 1"
        ).fetchall() == [("anon", False), ("authenticated", False), ("service_role", False)]

    with psycopg.connect(creating, autocommit=True) as owner:
        job_id = add_job(owner)
        add_tasks(owner, 2, job_id=job_id)
    with psycopg.connect(with_database(admin_url, "creating_owner_db"), autocommit=True) as conn:
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL ROLE service_role")
            assert len(claim(conn, batch=5)) == 2
            assert conn.execute("SELECT status FROM jobs").fetchall() == [("processing",)]
