"""Behind PgBouncer (issue 16): Debian's ``pgbouncer``, started by the test
on a free port in front of the test server, in transaction mode — where
consecutive transactions of one client may run on different server
sessions, so session state (advisory locks, prepared statements, LISTEN)
does not follow the client — and in session mode, for the LISTEN
connection. Skipped, saying why, where the binary is absent."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import time

import kombu
import pgbouncer
import psycopg
import pytest
from pgbouncer import through
from transport_support import unique

from pg_broker import doctor
from pg_broker.migrate import discover, migrate
from pg_broker.urls import broker_url

pytestmark = pytest.mark.skipif(not pgbouncer.available(), reason=pgbouncer.MISSING)
pytest_plugins = ["pgbouncer"]

PROCESSES = 4
MESSAGES = 100


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


LISTENER_LOG = "pg_broker.transport.listener"


def _consume_one(url: str, queue: str, options: dict, timeout: float) -> tuple[list, float]:
    """Start consuming ``queue``, publish one message once listening, and
    drain until it arrives: (bodies received, seconds it took)."""
    received = []
    with kombu.Connection(url, transport_options=options) as consumer_connection, \
            kombu.Connection(url, transport_options={"prepared_statements": False}) as producer:
        with consumer_connection.Consumer(kombu.Queue(queue), accept=["json"],
                                          callbacks=[lambda body, m: (received.append(body),
                                                                      m.ack())]):
            with pytest.raises(TimeoutError):  # nothing yet; now it listens
                consumer_connection.drain_events(timeout=0.5)
            producer.Producer().publish({"n": 1}, routing_key=queue, declare=[kombu.Queue(queue)])
            started = time.monotonic()
            consumer_connection.drain_events(timeout=timeout)
            return received, time.monotonic() - started


def test_a_listen_url_through_a_session_pooler_wakes_a_consumer_on_a_transaction_pooler(
        transaction_pooler: str, session_pooler: str, database_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    url = broker_url(through(transaction_pooler, database_url))
    # The safety poll is a minute away: only a notification delivers sooner.
    options = {"prepared_statements": False, "polling_interval": 60,
               "listen_url": through(session_pooler, database_url)}

    with caplog.at_level(logging.INFO, logger=LISTENER_LOG):
        received, waited = _consume_one(url, unique("woken"), options, timeout=60)

    assert received == [{"n": 1}]
    assert waited < 30, f"woken by the safety poll after {waited:.1f} s, not by a notification"
    assert "do not arrive" not in caplog.text


def test_a_listener_on_a_transaction_pooler_says_its_notifications_are_lost(
        transaction_pooler: str, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    url = broker_url(through(transaction_pooler, database_url))
    options = {"prepared_statements": False, "polling_interval": 1}
    with caplog.at_level(logging.WARNING, logger=LISTENER_LOG), \
            kombu.Connection(url, transport_options=options) as connection, \
            connection.Consumer(kombu.Queue(unique("deaf")), callbacks=[]):
        deadline = time.monotonic() + 60
        while "do not arrive" not in caplog.text and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=1)

    assert "notifications do not arrive on the LISTEN connection" in caplog.text
    assert "listen_url" in caplog.text and "PG_BROKER_LISTEN_URL" in caplog.text


def test_doctor_finds_notifications_lost_through_a_transaction_pooler_and_fixed_by_a_listen_url(
        transaction_pooler: str, session_pooler: str, database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_BROKER_URL", through(transaction_pooler, database_url))
    monkeypatch.delenv("PG_BROKER_LISTEN_URL", raising=False)
    checks = [("configuration", doctor.check_configuration), ("database", doctor.check_database),
              ("listen/notify", doctor.check_listen)]

    lost = dict(doctor.run(doctor.Context(notify_timeout=2), checks))["listen/notify"]
    monkeypatch.setenv("PG_BROKER_LISTEN_URL", through(session_pooler, database_url))
    fixed = dict(doctor.run(doctor.Context(notify_timeout=10), checks))["listen/notify"]

    assert lost.status == "FAIL" and "PG_BROKER_LISTEN_URL" in lost.fix
    assert fixed.status == "ok" and "PG_BROKER_LISTEN_URL" in fixed.message
