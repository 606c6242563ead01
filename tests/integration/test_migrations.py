"""Migrations: applied in order, each once, safe when processes race."""

from __future__ import annotations

import multiprocessing
import shutil
from concurrent.futures import ThreadPoolExecutor

import kombu
import psycopg
import pytest

from pg_broker.migrate import (
    ADVISORY_LOCK_KEY,
    MigrationFailed,
    applied_versions,
    discover,
    migrate,
)
from pg_broker.urls import broker_url


def test_every_migration_is_recorded_once(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        recorded = applied_versions(conn)
    assert [v for v, _ in recorded] == [m.version for m in discover()]


def test_rerunning_migrate_applies_nothing(database_url: str) -> None:
    assert migrate(database_url) == []


def _migrate_in_child(url: str, results) -> None:
    results.put([m.version for m in migrate(url, supabase=True)])


def test_two_processes_migrating_at_once_apply_each_migration_once(empty_database: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    children = [ctx.Process(target=_migrate_in_child, args=(empty_database, results)) for _ in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    applied = sorted(v for _ in children for v in results.get(timeout=5))
    assert applied == [m.version for m in discover()]
    with psycopg.connect(empty_database) as conn:
        assert [v for v, _ in applied_versions(conn)] == [m.version for m in discover()]


def test_a_failing_migration_is_rolled_back_whole_and_named(empty_database: str, tmp_path) -> None:
    for migration in discover():
        (tmp_path / migration.track).mkdir(exist_ok=True)
        shutil.copy(migration.path, tmp_path / migration.track)
    broken = tmp_path / "core" / "999_broken.sql"
    broken.write_text("CREATE TABLE half_done (id int);\nSELECT no_such_column FROM jobs;\n")

    with pytest.raises(MigrationFailed) as raised:
        migrate(empty_database, tmp_path, supabase=True)

    assert str(raised.value).startswith("migration 999_broken.sql failed and was rolled back:")
    assert 'column "no_such_column" does not exist' in str(raised.value)
    with psycopg.connect(empty_database) as conn:
        assert [v for v, _ in applied_versions(conn)] == [m.version for m in discover()]
        assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)

    broken.write_text("CREATE TABLE half_done (id int);\n")
    assert [m.version for m in migrate(empty_database, tmp_path)] == [999]


def test_the_files_also_run_by_hand_in_order(empty_database: str) -> None:
    # The Supabase way: pasted into the SQL editor, no pg_broker_migrations.
    with psycopg.connect(empty_database) as conn:
        for migration in discover():
            with conn.transaction():
                conn.execute(migration.sql)
        assert conn.execute("SELECT to_regclass('pg_broker_migrations')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM claim_tasks('w', ARRAY['q'])").fetchone() == (0,)


def _hold_migrations_lock(url: str) -> psycopg.Connection:
    """A session holding the migrations' advisory lock, as a pooled server
    session left holding it (issue 16) did."""
    holder = psycopg.connect(url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
    return holder


def test_a_migrated_database_is_checked_without_waiting_for_the_lock(database_url: str) -> None:
    with _hold_migrations_lock(database_url), ThreadPoolExecutor(1) as pool:
        checked = pool.submit(migrate, database_url)
        # Generous: the check is one read; waiting for the lock would never end.
        assert checked.result(timeout=30) == []


def test_a_pending_migration_waits_for_the_lock_and_releases_it_at_commit(
        empty_database: str, tmp_path) -> None:
    for migration in discover():
        (tmp_path / migration.track).mkdir(exist_ok=True)
        shutil.copy(migration.path, tmp_path / migration.track)
    migrate(empty_database, tmp_path, supabase=True)
    (tmp_path / "core" / "999_later.sql").write_text("CREATE TABLE later (id int);\n")

    with ThreadPoolExecutor(1) as pool:
        with _hold_migrations_lock(empty_database):
            pending = pool.submit(migrate, empty_database, tmp_path)
            with pytest.raises(TimeoutError):
                pending.result(timeout=1)
        assert [m.version for m in pending.result(timeout=30)] == [999]
    with psycopg.connect(empty_database) as conn:
        held = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                            "(SELECT oid FROM pg_database WHERE datname = current_database())"
                            ).fetchone()
    assert held == (0,)


def test_a_transport_told_not_to_migrate_connects_without_touching_the_schema(
        empty_database: str) -> None:
    with kombu.Connection(broker_url(empty_database),
                          transport_options={"migrate": "false"}) as connection:
        connection.connect()
        assert connection.connected
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT to_regclass('pg_broker_migrations')").fetchone() == (None,)
