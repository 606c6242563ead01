"""With the transport option ``visible_before_flush``, a confirmed publish is
visible to consumers before its WAL flush, and returns to its producer only
after it (pg_broker.transport.store.Store.publish).

The flush is made to wait for ever on a server of the test's own: with
``synchronous_standby_names`` naming a standby that never connects, every
synchronous commit waits, asynchronous ones do not. Cancelling the waiting
session ends the wait (PostgreSQL then reports the commit as done locally).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
from chaos.servers import PostgresServer
from transport_support import open_connection, unique

from pg_broker.migrate import migrate

WAIT = 30.0  # seconds to wait for a condition that should hold at once


@pytest.fixture
def stalled_flush_url():
    """A migrated database on a private server whose synchronous commits never end."""
    server = PostgresServer("publish_flush").start()
    try:
        url = server.create_database("broker")
        migrate(url)
        with server.admin() as admin:
            admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'never_connects'")
            admin.execute("SELECT pg_reload_conf()")
        yield url, server
    finally:
        server.destroy()


def _wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT:.0f} s")
        time.sleep(0.05)
    return found


def test_a_publish_is_claimable_before_its_flush_and_returns_only_after_it(stalled_flush_url):
    url, server = stalled_flush_url
    queue = unique("flush")
    outcome: list[object] = []

    def produce() -> None:
        try:
            for conn in open_connection(url, visible_before_flush=True):
                with conn.Producer() as producer:
                    producer.publish("x", exchange="", routing_key=queue)
            outcome.append("returned")
        except Exception as exc:  # reported by the assertion below
            outcome.append(exc)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    with server.admin("broker") as db:
        # The message is there for a consumer to claim while its WAL flush waits...
        _wait_for(lambda: db.execute("SELECT count(*) FROM job_tasks WHERE queue = %s"
                                     " AND status = 'pending'", (queue,)).fetchone()[0],
                  "the published row visible")
        waiting = _wait_for(lambda: db.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'").fetchall(),
            "the producer's session waiting for its flush")
        # ... and the producer has not been told it is stored.
        assert producer.is_alive() and not outcome
        db.execute("SELECT pg_cancel_backend(%s)", (waiting[0][0],))
    producer.join(WAIT)
    assert outcome == ["returned"]


def _published_rows(db, queue: str) -> int:
    return db.execute("SELECT count(*) FROM job_tasks WHERE queue = %s", (queue,)).fetchone()[0]


def _flush_waiting(db) -> list[tuple[int]]:
    return db.execute("SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'").fetchall()


@contextmanager
def _pipelined_publish_awaiting_its_flush(stalled_flush_url):
    """One message published with confirm_publish=False on the server whose
    synchronous commits never end; yields (the pipeline, a connection to the
    database, the queue, the pid of the session whose flush waits) once the
    message's row is visible and its flush waits."""
    url, server = stalled_flush_url
    queue = unique("pipelined")
    for conn in open_connection(url, confirm_publish=False):
        pipeline = conn.default_channel.connection.pipeline
        with conn.Producer() as producer:
            producer.publish("x", exchange="", routing_key=queue)
        with server.admin("broker") as db:
            _wait_for(lambda: _published_rows(db, queue), "the published row visible")
            waiting = _wait_for(lambda: _flush_waiting(db), "a flush waiting")
            yield pipeline, db, queue, waiting[0][0]


def test_a_pipelined_publish_is_claimable_at_once_and_confirmed_only_by_a_flush(
        stalled_flush_url):
    # Without confirm_publish a message commits asynchronously (its consumer
    # claims it before any flush) and stays unconfirmed, kept to be sent
    # again, until a flush after it returns.
    with _pipelined_publish_awaiting_its_flush(stalled_flush_url) as (pipeline, db, queue, flush):
        assert not pipeline.confirm(timeout=0.5)
        assert pipeline.unconfirmed == 1
        db.execute("SELECT pg_cancel_backend(%s)", (flush,))
        assert pipeline.confirm(timeout=WAIT)
        assert _published_rows(db, queue) == 1


def test_a_pipelined_message_committed_but_not_flushed_is_sent_again_after_a_lost_session(
        stalled_flush_url):
    # A server crash takes away what was committed asynchronously and not yet
    # flushed: until its flush returned, a lost session sends the message again
    # (at-least-once: here, where the first copy stayed, it is stored twice).
    with _pipelined_publish_awaiting_its_flush(stalled_flush_url) as (pipeline, db, queue, flush):
        db.execute("SELECT pg_terminate_backend(%s)", (flush,))
        _wait_for(lambda: _published_rows(db, queue) == 2, "the message sent again")
        waiting = _wait_for(lambda: _flush_waiting(db), "the next flush waiting")
        db.execute("SELECT pg_cancel_backend(%s)", (waiting[0][0],))
        assert pipeline.confirm(timeout=WAIT)
