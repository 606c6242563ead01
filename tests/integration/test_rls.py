"""Row-level security of the Supabase layer (migrations/supabase/), exercised the way PostgREST does it:
inside a transaction, `SET LOCAL ROLE` plus the JWT claims in
`request.jwt.claims`. Also: the same migrations on a Supabase-like database
(its own auth.uid() and default privileges) and as a non-superuser owner."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo
from taskrows import add_job, add_tasks, claim

from pg_broker.migrate import discover, migrate

JOB_TABLES = ("jobs", "job_tasks", "job_artifacts")
BROKER_TABLES = ("broker_queues", "broker_bindings", "broker_transient_messages",
                 "pg_broker_migrations", "task_results", "task_result_chords",
                 "task_result_chord_parts")
USER_A = str(uuid.uuid4())
USER_B = str(uuid.uuid4())


@contextmanager
def acting_as(conn: psycopg.Connection, role: str, sub: str | None = None) -> Iterator[None]:
    """A PostgREST request: a transaction with the role and JWT claims set
    locally, rolled back at the end."""
    with conn.transaction(force_rollback=True):
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
        if sub is not None:
            claims = json.dumps({"sub": sub, "role": role})
            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims,))
        yield


def _add_artifact(conn: psycopg.Connection, job_id: str, user_id: str | None, name: str) -> None:
    conn.execute(
        "INSERT INTO job_artifacts (job_id, task_id, user_id, kind, storage_backend,"
        " storage_path, content_type, bytes, sha256)"
        " VALUES (%s, %s, %s, 'audio', 'local', %s, 'audio/mpeg', 1, repeat('0', 64))",
        (job_id, name, user_id, f"{user_id}/{job_id}/audio/{name}.mp3"),
    )


@pytest.fixture
def two_users(db: psycopg.Connection) -> dict[str | None, set[str]]:
    """Jobs (with tasks and artifacts) of user A, user B and of nobody; the
    job ids per owner."""
    owned: dict[str | None, set[str]] = {}
    for user, count in ((USER_A, 2), (USER_B, 1), (None, 1)):
        for n in range(count):
            job_id = add_job(db, user)
            add_tasks(db, 2, job_id=job_id, user_id=user)
            _add_artifact(db, job_id, user, f"task-{n}")
            owned.setdefault(user, set()).add(job_id)
    return owned


def _visible_job_ids(conn: psycopg.Connection) -> dict[str, set[str]]:
    return {
        table: {r[0] for r in conn.execute(
            sql.SQL("SELECT {}::text FROM {}").format(
                sql.Identifier("id" if table == "jobs" else "job_id"), sql.Identifier(table)))}
        for table in JOB_TABLES
    }


def test_row_level_security_is_enabled_and_forced_on_the_job_tables(
    db: psycopg.Connection,
) -> None:
    rows = db.execute(
        "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class"
        " WHERE oid = ANY (ARRAY['jobs', 'job_tasks', 'job_artifacts']::regclass[])"
        " ORDER BY relname"
    ).fetchall()
    assert rows == [("job_artifacts", True, True), ("job_tasks", True, True), ("jobs", True, True)]


@pytest.mark.parametrize("user", [USER_A, USER_B], ids=["user_a", "user_b"])
def test_a_user_sees_exactly_their_own_jobs_tasks_and_artifacts(
    db: psycopg.Connection, two_users: dict, user: str
) -> None:
    with acting_as(db, "authenticated", user):
        visible = _visible_job_ids(db)
        (uid,) = db.execute("SELECT auth.uid()::text").fetchone()
    assert uid == user
    assert visible == {table: two_users[user] for table in JOB_TABLES}
    assert db.execute("SELECT count(*) FROM job_tasks").fetchone() == (8,)


def test_an_authenticated_request_without_a_user_sees_nothing(
    db: psycopg.Connection, two_users: dict
) -> None:
    with acting_as(db, "authenticated"):
        assert _visible_job_ids(db) == {table: set() for table in JOB_TABLES}


@pytest.mark.parametrize("table", JOB_TABLES + BROKER_TABLES)
def test_anon_is_refused_every_table(db: psycopg.Connection, two_users: dict, table: str) -> None:
    # Not zero rows but no privilege at all: anon holds no grant on them.
    with pytest.raises(errors.InsufficientPrivilege):
        with acting_as(db, "anon", USER_A):
            db.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))


@pytest.mark.parametrize("table", BROKER_TABLES)
def test_users_are_refused_the_broker_tables(db: psycopg.Connection, table: str) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        with acting_as(db, "authenticated", USER_A):
            db.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))


@pytest.mark.parametrize("statement", [
    "INSERT INTO jobs (user_id) VALUES (%(me)s)",
    "UPDATE jobs SET status = 'cancelled' WHERE user_id = %(me)s",
    "DELETE FROM jobs WHERE user_id = %(me)s",
    "UPDATE job_tasks SET status = 'completed' WHERE user_id = %(me)s",
    "INSERT INTO job_tasks (queue, payload, user_id) VALUES ('default', '{}', %(me)s)",
    "DELETE FROM job_artifacts WHERE user_id = %(me)s",
])
def test_users_cannot_write_even_their_own_rows(
    db: psycopg.Connection, two_users: dict, statement: str
) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        with acting_as(db, "authenticated", USER_A):
            db.execute(statement, {"me": USER_A})


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize("call", [
    "SELECT * FROM claim_tasks('w', ARRAY['default'], 10)",
    "SELECT reclaim_stale_tasks()",
    "SELECT heartbeat_task('w')",
    "SELECT complete_task(1, gen_random_uuid())",
    "SELECT fail_task(1, gen_random_uuid(), 'x')",
    "SELECT start_task(1, gen_random_uuid())",
    "SELECT pg_broker_probe(ARRAY['default'])",
])
def test_users_cannot_call_the_worker_functions(
    db: psycopg.Connection, two_users: dict, role: str, call: str
) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        with acting_as(db, role, USER_A):
            db.execute(call)


def test_service_role_reads_and_writes_everything(db: psycopg.Connection, two_users: dict) -> None:
    with acting_as(db, "service_role"):
        assert _visible_job_ids(db) == {
            table: set().union(*two_users.values()) for table in JOB_TABLES}
        job_id = add_job(db, USER_B)
        add_tasks(db, 1, job_id=job_id, user_id=USER_B)
        assert len(claim(db, batch=20)) == 9
        assert db.execute("SELECT reclaim_stale_tasks()").fetchone() == (0,)
        db.execute("INSERT INTO broker_queues (name) VALUES ('celery')")


def test_a_service_role_without_bypassrls_gets_everything_through_its_policies(
    db: psycopg.Connection, two_users: dict,
) -> None:
    """Where the migrating role could not grant BYPASSRLS (an owner that is no
    superuser), service_role has none: its policies give it the job tables.
    A role of the test's own that inherits service_role stands for it (the
    shared role's attributes stay as they are)."""
    role = f"broker_test_service_{uuid.uuid4().hex[:8]}"
    db.execute(sql.SQL("CREATE ROLE {} NOLOGIN INHERIT NOBYPASSRLS IN ROLE service_role")
               .format(sql.Identifier(role)))
    try:
        with acting_as(db, role):
            everything = set().union(*two_users.values())
            assert _visible_job_ids(db) == {table: everything for table in JOB_TABLES}
            assert len(claim(db, batch=20)) == 8
    finally:
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_on_a_supabase_like_database_its_auth_uid_is_kept_and_grants_are_tightened(
    supabase_like_url: str,
) -> None:
    uid_source = "SELECT prosrc FROM pg_proc WHERE oid = 'auth.uid()'::regprocedure"
    with psycopg.connect(supabase_like_url, autocommit=True) as conn:
        (before,) = conn.execute(uid_source).fetchone()
    migrate(supabase_like_url)

    with psycopg.connect(supabase_like_url, autocommit=True) as conn:
        assert conn.execute(uid_source).fetchone() == (before,)
        mine, theirs = add_job(conn, USER_A), add_job(conn, USER_B)
        assert {r[0] for r in conn.execute("SELECT id::text FROM jobs")} == {mine, theirs}
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL ROLE authenticated")
            conn.execute("SELECT set_config('request.jwt.claim.sub', %s, true)", (USER_A,))
            assert {r[0] for r in conn.execute("SELECT id::text FROM jobs")} == {mine}

        refused = [
            ("anon", "SELECT * FROM jobs"),
            ("anon", "SELECT * FROM pg_broker_migrations"),
            ("anon", "SELECT nextval('job_tasks_sequence_seq')"),
            ("anon", "SELECT * FROM claim_tasks('w', ARRAY['default'])"),
            ("authenticated", "INSERT INTO jobs (user_id) VALUES (auth.uid())"),
            ("authenticated", "SELECT * FROM broker_bindings"),
            ("authenticated", "SELECT reclaim_stale_tasks()"),
        ]
        for role, statement in refused:
            with pytest.raises(errors.InsufficientPrivilege):
                with conn.transaction(force_rollback=True):
                    conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
                    conn.execute(statement)


@pytest.fixture
def owner_role(server_url: str, database_url: str) -> Iterator[str]:
    """A login role that is no superuser and cannot create roles."""
    name = f"broker_owner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_a_non_superuser_database_owner_migrates_and_works_through_the_owner_policy(
    owner_role: str, new_database: Callable[..., str],
) -> None:
    # As on Supabase: the roles exist already, the migrating role owns the
    # database but is no superuser, so forced RLS applies to it.
    url = new_database(owner=owner_role)
    as_owner = make_conninfo(url, user=owner_role)
    assert [m.version for m in migrate(as_owner, supabase=True)] == [
        m.version for m in discover()]
    with psycopg.connect(as_owner, autocommit=True) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
                            ).fetchone() == (False,)
        job_id = add_job(conn, USER_A)
        add_tasks(conn, 3, job_id=job_id, user_id=USER_A)
        rows = claim(conn, batch=3)
        assert len(rows) == 3
        for row in rows:
            conn.execute("SELECT complete_task(%s, %s)", (row["id"], row["lease_token"]))
        assert conn.execute("SELECT status FROM jobs").fetchall() == [("completed",)]

