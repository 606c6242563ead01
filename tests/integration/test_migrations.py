"""Migrations: applied in order, each once, safe when processes race."""

from __future__ import annotations

import multiprocessing
import shutil

import psycopg
import pytest

from pg_broker.migrate import MigrationFailed, applied_versions, discover, migrate


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
