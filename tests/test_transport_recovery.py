"""Leases, crashed consumers, forked children and dropped database sessions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from celery import Celery
from celery_workers import Worker, process_environment, wait_for
from transport_support import open_connection, pgbroker_url, publish, queue_named, rows


def terminate_sessions(db, application_name: str = "pg_broker") -> int:
    """Drop the transport's sessions server-side, as a database restart would."""
    return db.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = %s "
        "AND pid <> pg_backend_pid()", (application_name,),
    ).fetchone()[0]


def test_held_message_keeps_its_lease_past_the_lease_length(database_url, db):
    queue = queue_named("lease")
    for conn in open_connection(database_url, lease_seconds=0.6):
        publish(conn, queue, "long task")
        message = queue(conn.default_channel).get()
        time.sleep(1.5)  # more than two lease lengths
        assert db.execute("SELECT reclaim_stale_tasks()").fetchone()[0] == 0
        for other in open_connection(database_url):
            assert queue(other.default_channel).get() is None
        message.ack()
    assert rows(db, queue.name) == [("completed", 1, False)]


def test_messages_of_a_sigkilled_consumer_come_back_after_the_lease(database_url, db):
    queue = queue_named("killed")
    for conn in open_connection(database_url):
        publish(conn, queue, "survives")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, kombu, pg_broker
        conn = kombu.Connection({pgbroker_url(database_url)!r},
                                transport_options={{"lease_seconds": 1}})
        message = kombu.Queue({queue.name!r}, routing_key={queue.name!r})(conn.default_channel).get()
        print("held" if message else "none", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait(10)
    finally:
        holder.kill()
    assert rows(db, queue.name) == [("claimed", 1, True)]

    received = []
    for conn in open_connection(database_url, maintenance_interval=0.2):
        consumer = conn.Consumer(
            [queue], callbacks=[lambda body, m: (received.append(m.delivery_info), m.ack())]
        )
        conn.transport.leases.start()  # a live worker's maintenance reclaims the lease
        with consumer:
            deadline = time.monotonic() + 15
            while not received and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
    assert [info["redelivered"] for info in received] == [True]
    assert rows(db, queue.name) == [("completed", 2, False)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_leaves_the_parent_session_alone(database_url, db):
    queue = queue_named("fork")
    for conn in open_connection(database_url):
        parent_backend = conn.transport.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        pid = os.fork()
        if pid == 0:  # the child publishes on its own session, then closes everything
            status = 1
            try:
                publish(conn, queue, "from the child")
                conn.close()
                status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert conn.transport.conn.execute("SELECT pg_backend_pid()").fetchone()[0] == parent_backend
        publish(conn, queue, "from the parent")
    assert [status for status, _, _ in rows(db, queue.name)] == ["pending", "pending"]


def test_producer_publishes_again_after_its_session_is_terminated(database_url, db):
    queue = queue_named("outage")
    for conn in open_connection(database_url):
        publish(conn, queue, "before")
        assert terminate_sessions(db) >= 1
        publish(conn, queue, "after", retry=True)
    assert [status for status, _, _ in rows(db, queue.name)] == ["pending", "pending"]


@pytest.mark.slow
def test_worker_recovers_after_its_sessions_are_terminated(database_url, db, tmp_path):
    env = process_environment(database_url, E2E_TRANSPORT_OPTIONS='{"lease_seconds": 5}')
    worker = Worker(env, tmp_path, pool="solo").start()
    ran = tmp_path / "ran"
    try:
        producer = Celery(broker=pgbroker_url(database_url))
        producer.send_task("e2e.record", (str(ran), "before"), queue="e2e")
        wait_for(lambda: ran.exists() and "before" in ran.read_text(), 30,
                 lambda: worker.describe("the first task to run"))
        assert terminate_sessions(db) >= 2  # the worker's work and LISTEN sessions
        producer.send_task("e2e.record", (str(ran), "after"), queue="e2e")
        wait_for(lambda: "after" in ran.read_text(), 30,
                 lambda: worker.describe("a task sent after the sessions were dropped"))
    finally:
        worker.kill()
