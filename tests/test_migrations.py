"""Migrations: applied in order, each once, safe when processes race."""

from __future__ import annotations

import multiprocessing

import psycopg
import pytest
from psycopg import sql

from pg_broker.database import with_database
from pg_broker.migrate import applied_versions, discover, migrate


def test_every_migration_is_recorded_once(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        recorded = applied_versions(conn)
    assert [v for v, _ in recorded] == [m.version for m in discover()]


def test_rerunning_migrate_applies_nothing(database_url: str) -> None:
    assert migrate(database_url) == []


def _migrate_in_child(url: str, results) -> None:
    results.put([m.version for m in migrate(url)])


@pytest.fixture
def empty_database(server_url: str):
    name = "pg_broker_race_" + multiprocessing.current_process().name.lower().replace("-", "_")
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield with_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


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
