"""A forked child forgets what its parent holds (pg_broker/forking.py): every
session the parent has — the transport's work and LISTEN connections, the
publish pipeline, the result store, the worker app's bookkeeping connection
— outlives a child that used, closed and collected its copies, and the child
works on sessions of its own."""

from __future__ import annotations

import gc
import os
from functools import partial

import psycopg
import pytest
from forks import in_child
from transport_support import open_connection, queue_named, rows

from pg_broker.results.store import shared_store
from pg_broker.transport import confirm_publishes, pipeline, transport
from tasks import lifecycle

pytest_plugins = ["transport_support"]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def live_sessions(db: psycopg.Connection) -> set[int]:
    return {row[0] for row in db.execute("SELECT pid FROM pg_stat_activity")}


def sessions_of(conn, store, bookkeeping: psycopg.Connection) -> dict[str, int]:
    """Backend pids of every kind of session a worker process holds."""
    kombu_transport = conn.transport
    with store.connection() as results:
        results_pid = results.info.backend_pid
    return {
        "work": kombu_transport.conn.info.backend_pid,
        "listen": kombu_transport._listener.conn.info.backend_pid,
        "pipeline": kombu_transport.pipeline._conn.info.backend_pid,
        "results": results_pid,
        "bookkeeping": bookkeeping.info.backend_pid,
    }


def use_and_close_everything(conn, store, queue) -> dict:
    """In the child: publish, store a result, LISTEN, take the bookkeeping
    connection, then close it all as a process on its way out does (kombu's
    pool cleanup, closing, the library's exit hooks, finalisers)."""
    with conn.Producer() as producer:
        producer.publish("from the child", routing_key=queue.name)
    confirmed = confirm_publishes(10)
    store.set("fork-child", b"child", "SUCCESS", 600)
    conn.transport._listener.connect()
    sessions = sessions_of(conn, store, lifecycle.connection())
    conn.collect()
    conn.close()
    store.close()
    lifecycle.connection().close()
    transport._settle_at_exit()
    pipeline._confirm_at_exit()
    gc.collect()
    return {"confirmed": confirmed, "sessions": sessions}


def test_a_forked_child_opens_its_own_sessions_and_leaves_every_parent_session_alive(
    database_url, db, monkeypatch
):
    monkeypatch.setenv("PG_BROKER_URL", database_url)
    queue = queue_named("fork-all")
    store = shared_store(database_url, None)
    try:
        received = []
        for conn in open_connection(database_url, confirm_publish=False, polling_interval=3600):
            with conn.Consumer([queue], callbacks=[lambda body, m: received.append((body, m))]):
                # The parent holds one delivery, unacked, and every kind of session.
                with conn.Producer() as producer:
                    producer.publish("held by the parent", routing_key=queue.name, declare=[queue])
                assert confirm_publishes(10)
                conn.drain_events(timeout=10)
                assert [body for body, _ in received] == ["held by the parent"]
                store.set("fork-parent", b"parent", "SUCCESS", 600)
                assert store.get("fork-parent") == b"parent"
                parent = sessions_of(conn, store, lifecycle.connection())
                assert len(set(parent.values())) == len(parent)

                report = in_child(partial(use_and_close_everything, conn, store, queue))
                assert report["confirmed"]

                # The child worked on sessions of its own, never on the parent's.
                assert set(report["sessions"].values()).isdisjoint(parent.values())
                # Every session of the parent is alive, and still the one in use.
                assert set(parent.values()) <= live_sessions(db)
                assert sessions_of(conn, store, lifecycle.connection()) == parent
                assert store.get("fork-child") == b"child"
                # The parent's LISTEN session still wakes it (no safety poll here):
                # the child's message arrives by notification.
                conn.drain_events(timeout=10)
                assert [body for body, _ in received] == ["held by the parent", "from the child"]
                # The child neither returned nor settled the parent's delivery: the
                # parent's ack settles it.
                received[0][1].ack()
                received[1][1].ack()
    finally:  # the store and the bookkeeping connection are this process's: leave none open
        store.close()
        lifecycle.connection().close()
    assert rows(db, queue.name) == []  # both acked by the parent: deleted
