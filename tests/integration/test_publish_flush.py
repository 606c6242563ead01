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
