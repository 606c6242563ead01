"""Behind PgBouncer (issue 16): Debian's ``pgbouncer``, started by the test
on a free port in front of the test server, in transaction mode — where
consecutive transactions of one client may run on different server
sessions, so session state (advisory locks, prepared statements, LISTEN)
does not follow the client. Skipped, saying why, where the binary is absent."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator

import kombu
import pgbouncer
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from transport_support import unique

from pg_broker.database import with_database
from pg_broker.migrate import discover, migrate
from pg_broker.urls import broker_url

pytestmark = pytest.mark.skipif(not pgbouncer.available(), reason=pgbouncer.MISSING)

PROCESSES = 4
MESSAGES = 100


@pytest.fixture(scope="module")
def transaction_pooler(server_url: str) -> Iterator[str]:
    # A small pool, so that clients share server sessions as they would in production.
    with pgbouncer.pgbouncer(server_url, "transaction", pool_size=4) as url:
        yield url


def through(pooler_url: str, database_url: str) -> str:
    """``database_url``'s database, reached through the pooler."""
    return with_database(pooler_url, conninfo_to_dict(database_url)["dbname"])


def _migrate_in_child(url: str, results) -> None:
    results.put([m.version for m in migrate(url, supabase=True)])


def _run_children(target, args_of) -> list:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    children = [ctx.Process(target=target, args=(*args_of(i), results)) for i in range(PROCESSES)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
        assert child.exitcode == 0, "a process hung or failed behind the pooler"
    return [results.get(timeout=5) for _ in children]


def test_processes_migrating_at_once_through_a_transaction_pooler_never_hang(
        transaction_pooler: str, empty_database: str) -> None:
    url = through(transaction_pooler, empty_database)

    first = _run_children(_migrate_in_child, lambda i: (url,))
    again = _run_children(_migrate_in_child, lambda i: (url,))

    assert sorted(v for applied in first for v in applied) == [m.version for m in discover()]
    assert again == [[]] * PROCESSES
    with psycopg.connect(empty_database) as conn:
        held = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND "
                            "database = (SELECT oid FROM pg_database "
                            "WHERE datname = current_database())").fetchone()
    assert held == (0,), "no advisory lock is left behind on a pooled session"


def _publish_in_child(url: str, queue: str, first: int, options: dict, results) -> None:
    with kombu.Connection(url, transport_options=options) as connection, \
            connection.Producer() as producer:
        for i in range(first, first + MESSAGES):
            producer.publish({"n": i}, routing_key=queue, declare=[kombu.Queue(queue)],
                             retry=False)
    results.put(MESSAGES)


@pytest.mark.parametrize("options", [
    {"prepared_statements": False},
    {"prepared_statements": False, "confirm_publish": False},
    {},  # prepared statements turned off by the first one the pooler loses
], ids=["unprepared", "unprepared-pipelined", "found-out"])
def test_producers_through_a_transaction_pooler_store_every_message_once(
        transaction_pooler: str, database_url: str, db: psycopg.Connection,
        options: dict) -> None:
    url = broker_url(through(transaction_pooler, database_url))
    queue = unique("pooled")

    _run_children(_publish_in_child, lambda i: (url, queue, i * MESSAGES, options))

    stored = db.execute("SELECT (payload->>'body') FROM job_tasks WHERE queue = %s",
                        (queue,)).fetchall()
    assert len(stored) == PROCESSES * MESSAGES
    assert len(set(stored)) == PROCESSES * MESSAGES
