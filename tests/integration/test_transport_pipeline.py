"""Publishes sent without waiting for each commit (pg_broker/transport/pipeline.py):
transient messages always, every message with ``confirm_publish=False``."""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
import uuid

import kombu
import psycopg
import pytest
from celery_workers import wait_for
from kombu.exceptions import ChannelError
from test_transport_recovery import terminate_sessions
from transport_support import (
    listen_as_waiter,
    open_connection,
    publish,
    queue_named,
    rows,
    wait_again,
)

from pg_broker.transport import confirm_publishes, pipeline
from pg_broker.transport.pipeline import MAX_UNCONFIRMED, QUIET

pytest_plugins = ["transport_support"]


def bodies(db, queue: str) -> list:
    """The bodies of a queue's rows as sent (text; a number is its JSON), in publish order."""
    return [base64.b64decode(row[0]).decode() for row in db.execute(
        "SELECT payload ->> 'body' FROM job_tasks WHERE queue = %s ORDER BY sequence", (queue,)
    )]


def test_unconfirmed_publishes_are_stored_in_order_once_confirmed(database_url, db):
    queue = queue_named("pipelined")
    for conn in open_connection(database_url, confirm_publish=False):
        for n in range(500):
            publish(conn, queue, n)
            assert conn.transport._pipeline.unconfirmed <= MAX_UNCONFIRMED + 1
        assert confirm_publishes(30)
        assert conn.transport._pipeline.unconfirmed == 0
    assert bodies(db, queue.name) == [str(n) for n in range(500)]
    assert {status for status, _, _ in rows(db, queue.name)} == {"pending"}


def test_closing_the_connection_waits_for_every_confirm(database_url, db):
    queue = queue_named("close")
    for conn in open_connection(database_url, confirm_publish=False):
        for n in range(200):
            publish(conn, queue, n)
    # Closed by open_connection: no confirm_publishes() call was needed.
    assert len(rows(db, queue.name)) == 200


def test_consumer_receives_pipelined_messages(database_url, db):
    queue = queue_named("consume")
    received = []
    for conn in open_connection(database_url, confirm_publish=False):
        for n in range(20):
            publish(conn, queue, {"n": n})
        with conn.Consumer([queue], callbacks=[lambda body, m: (received.append(body["n"]),
                                                                m.ack())]):
            while len(received) < 20:
                conn.drain_events(timeout=10)
    assert sorted(received) == list(range(20))
    assert rows(db, queue.name) == []  # every one acked, so deleted


def _publishing_while_locked(conn, queue, bodies: list, table: str, **options):
    """Publish ``bodies`` from a thread while ``table`` is locked against
    inserts; returns (the thread, the connection holding the lock: roll it
    back to let the inserts through)."""
    locker = psycopg.connect(conn.transport.conninfo)
    locker.execute(f"LOCK TABLE {table} IN SHARE MODE")
    sender = threading.Thread(target=lambda: [publish(conn, queue, body, **options)
                                              for body in bodies])
    sender.start()
    return sender, locker


def _stored_transient(db, queue: kombu.Queue) -> int:
    return db.execute("SELECT count(*) FROM broker_transient_messages WHERE queue = %s",
                      (queue.name,)).fetchone()[0]


def test_transient_messages_are_pipelined_even_with_confirms_on(database_url, db, monkeypatch):
    # Every publish after the first is part of a burst (a lone one runs on
    # the work connection: the next test).
    monkeypatch.setattr(pipeline, "BURST_GAP", 3600.0)
    queue = queue_named("events", durable=False, auto_delete=True)
    durable = queue_named("confirmed")
    for conn in open_connection(database_url):
        for declared in (queue, durable):
            declared(conn.default_channel).declare()
        # The pipeline's connection is open and its statement prepared.
        publish(conn, queue, "first", delivery_mode="transient")
        assert confirm_publishes(10)

        # While no message can be stored, transient publishes return: they
        # do not wait for their commit.
        sender, locker = _publishing_while_locked(
            conn, queue, list(range(50)), "broker_transient_messages",
            delivery_mode="transient")
        try:
            sender.join(15)
            assert not sender.is_alive(), "a transient publish waited for its commit"
            assert _stored_transient(db, queue) == 1
        finally:
            locker.close()  # the inserts go through
            sender.join(30)
        assert confirm_publishes(10)
        assert _stored_transient(db, queue) == 51

        # A durable publish with confirms on returns only once committed.
        sender, locker = _publishing_while_locked(conn, durable, ["waits"], "job_tasks")
        try:
            wait_for(lambda: db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND application_name = 'pg_broker'"
            ).fetchone()[0], 30, "the durable publish to wait for the lock")
            assert sender.is_alive() and rows(db, durable.name) == []
        finally:
            locker.close()
            sender.join(30)
        assert not sender.is_alive()
        assert conn.transport._pipeline.unconfirmed == 0
    assert len(rows(db, durable.name)) == 1


def test_a_lone_transient_publish_runs_on_the_work_connection_and_an_idle_pipeline_closes(
        database_url, db, monkeypatch):
    # Celery's heartbeat events (one every 2 s) and remote-control replies
    # are lone messages: they open no connection of their own, so an idle
    # worker holds its work and LISTEN connections only. A burst opens the
    # pipeline's connection, which closes once idle.
    monkeypatch.setattr(pipeline, "IDLE_CLOSE", 0.5)
    events = queue_named("heartbeats", durable=False, auto_delete=True)
    for conn in open_connection(database_url):
        events(conn.default_channel).declare()
        shared = conn.transport.pipeline  # the process's: an earlier test's may be open
        wait_for(lambda shared=shared: shared._conn is None, 30,
                 "an earlier burst's connection to close")
        for n in range(3):
            time.sleep(pipeline.BURST_GAP * 2)
            publish(conn, events, f"heartbeat {n}", delivery_mode="transient")
            # Stored when the publish returned: it waited for its commit.
            assert _stored_transient(db, events) == n + 1
        assert shared._conn is None, "a lone publish opened the pipeline's connection"

        for n in range(20):  # a burst: pipelined
            publish(conn, events, f"event {n}", delivery_mode="transient")
        assert shared._conn is not None
        assert confirm_publishes(10)
        assert _stored_transient(db, events) == 23
        wait_for(lambda shared=shared: shared._conn is None, 30,
                 "the idle pipeline to close its connection")
        time.sleep(pipeline.BURST_GAP * 2)
        publish(conn, events, "after", delivery_mode="transient")
        assert _stored_transient(db, events) == 24


@pytest.mark.parametrize("confirm_publish", [True, False], ids=["confirmed", "pipelined"])
def test_what_the_database_would_refuse_is_refused_at_publish(database_url, db, confirm_publish):
    queue = queue_named("refused")
    for conn in open_connection(database_url, confirm_publish=confirm_publish):
        with pytest.raises(ChannelError, match="job_id is not a UUID"):
            publish(conn, queue, "bad header", headers={"job_id": "not-a-uuid"})
        for attempts in (0, -1, "three", True, 2**31, 2.5):
            with pytest.raises(ChannelError, match="max_attempts must be a whole number"):
                publish(conn, queue, "bad attempts", headers={"max_attempts": attempts})
        with pytest.raises(ChannelError, match="at most 1024 characters"):
            with conn.Producer() as producer:
                producer.publish("long", exchange="", routing_key="q" * 2000)
        with pytest.raises(ChannelError, match="NUL|refused by the database"):
            publish(conn, queue, "body", headers={"note": "nul \x00 inside"})
        publish(conn, queue, "text", headers={"note": "a backslash and u0000: \\u0000",
                                              "max_attempts": "5"})
        assert confirm_publishes(10)
    assert bodies(db, queue.name) == ["text"]


def test_a_refused_confirmed_publish_names_the_reason_without_the_payload(connection, db):
    queue = queue_named("refused-confirmed")
    with pytest.raises(ChannelError) as refused:
        publish(connection, queue, "secret-payload", headers={"job_id": str(uuid.uuid4())})
    assert "SQLSTATE 23503" in str(refused.value)
    assert "secret" not in str(refused.value) and "Failing row" not in str(refused.value)


def test_a_pipelined_message_refused_later_fails_the_next_publish(database_url, db, caplog):
    queue = queue_named("refused-later")
    task_id = str(uuid.uuid4())
    for conn in open_connection(database_url, confirm_publish=False):
        publish(conn, queue, "before")
        with caplog.at_level(logging.INFO, logger="pg_broker.transport"):
            # A job that does not exist: only the database can tell.
            publish(conn, queue, "secret-payload",
                    headers={"id": task_id, "job_id": str(uuid.uuid4())})
            pipeline = conn.transport._pipeline
            wait_for(lambda p=pipeline: p._refusals, 10, "the refusal to be read")
            with pytest.raises(ChannelError, match=f"{task_id} for {queue.name} "
                                                   r"\(SQLSTATE 23503: .*job_tasks") as refused:
                publish(conn, queue, "not sent: the producer must learn first")
            publish(conn, queue, "after")
            assert confirm_publishes(10)  # each refusal is reported once
    assert "this message was not sent" in str(refused.value)
    assert bodies(db, queue.name) == ["before", "after"]
    assert any(task_id in r.getMessage() and "SQLSTATE 23503" in r.getMessage()
               for r in caplog.records)
    assert "secret-payload" not in caplog.text and "Failing row" not in caplog.text


@pytest.mark.parametrize("closed", [False, True], ids=["open", "after-close"])
def test_confirm_publishes_raises_for_a_refusal_no_publish_reported(database_url, db, closed):
    queue = queue_named("refused-confirm")
    task_id = str(uuid.uuid4())
    for conn in open_connection(database_url, confirm_publish=False):
        publish(conn, queue, "refused", headers={"id": task_id, "job_id": str(uuid.uuid4())})
        if not closed:
            with pytest.raises(ChannelError, match=task_id):
                confirm_publishes(10)
            assert confirm_publishes(10)  # reported once
    if closed:  # closing did not raise it: it waits for the producer
        with pytest.raises(ChannelError, match=task_id):
            confirm_publishes(10)
    assert bodies(db, queue.name) == []


def test_a_pipeline_whose_idle_session_was_ended_sends_on_a_fresh_one(database_url, db):
    queue = queue_named("events-after-loss", durable=False)
    for conn in open_connection(database_url):
        queue(conn.default_channel).declare()
        publish(conn, queue, "first", delivery_mode="transient")
        assert confirm_publishes(10)
        assert terminate_sessions(db) >= 1
        wait_for(lambda: not db.execute(  # the backends are gone: their sockets closed
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'pg_broker'").fetchone()[0], 10, "the sessions to end")
        publish(conn, queue, "second", delivery_mode="transient")
        assert confirm_publishes(10)
        stored = db.execute("SELECT count(*) FROM broker_transient_messages WHERE queue = %s",
                            (queue.name,)).fetchone()[0]
    # A transient message sent into the dead session would be dropped with it.
    assert stored == 2


def test_no_message_is_lost_when_the_sessions_are_dropped_mid_stream(database_url, db):
    queue = queue_named("outage")
    total = 3000
    sent = threading.Event()
    for conn in open_connection(database_url, confirm_publish=False):

        def producer(conn: kombu.Connection = conn) -> None:
            for n in range(total):
                publish(conn, queue, n, retry=True)
                if n == total // 3:
                    sent.set()

        thread = threading.Thread(target=producer)
        thread.start()
        assert sent.wait(60)
        assert terminate_sessions(db) >= 1
        thread.join(120)
        assert not thread.is_alive()
        assert confirm_publishes(60)
    stored = bodies(db, queue.name)
    # At least once: a message whose commit happened but whose confirm was
    # lost with the session is stored twice; none is missing.
    assert sorted(set(stored), key=int) == [str(n) for n in range(total)]
    assert len(stored) - total <= MAX_UNCONFIRMED


def test_forked_child_publishes_on_its_own_pipeline(database_url, db):
    queue = queue_named("fork")
    for conn in open_connection(database_url, confirm_publish=False):
        publish(conn, queue, "parent before")
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                publish(conn, queue, "child")
                status = 0 if confirm_publishes(10) else 2
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        publish(conn, queue, "parent after")
        assert confirm_publishes(10)
    assert sorted(bodies(db, queue.name)) == ["child", "parent after", "parent before"]


@pytest.mark.parametrize("confirm_publish", [True, False], ids=["confirmed", "pipelined"])
def test_a_burst_notifies_a_few_times_and_its_last_message_still_wakes_the_consumer(
    database_url, db, confirm_publish, monkeypatch
):
    # A burst is messages less than QUIET apart, notified at most once per
    # NOTIFY_WINDOW. On a loaded machine a loop of publishes can be slower than
    # 1 ms a message (each is then a lone message, notified at once), or than
    # 10 ms (one notification per window is then one per message): widen both,
    # so that this loop is one burst however slow the machine. Its last message
    # is owed a trailing notification once the route is quiet for QUIET.
    monkeypatch.setattr(pipeline, "QUIET", 0.5)
    monkeypatch.setattr(pipeline, "NOTIFY_WINDOW", 3600.0)
    queue = queue_named("burst")
    total = 200
    received = []
    # No safety poll in the test's lifetime: only notifications wake the consumer.
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: (received.append(body),
                                                                    m.ack())]):
            with psycopg.connect(database_url, autocommit=True) as listener:
                # Its wake-ups come on a channel of its own (migrations/core/140).
                listener.execute(f'LISTEN "{consumer.transport._listener.waiter_channel}"')
                # The consumer finds the queue empty and waits: the burst's
                # first message notifies it (a consumer that waits for none
                # is never notified).
                with pytest.raises(TimeoutError):
                    consumer.drain_events(timeout=0.2)
                for producer in open_connection(database_url, confirm_publish=confirm_publish):
                    for n in range(total):
                        publish(producer, queue, n)
                    while len(received) < total:
                        consumer.drain_events(timeout=10)
                notifications = list(listener.notifies(timeout=0.5, stop_after=total))
    assert sorted(received) == list(range(total))
    assert 1 <= len(notifications) < total // 2


def _notifications(listener: psycopg.Connection, expected: int, timeout: float = 10) -> int:
    """Notifications received on ``listener`` until ``expected`` came (or the timeout)."""
    received = 0
    deadline = time.monotonic() + timeout
    while received < expected and time.monotonic() < deadline:
        received += len(list(listener.notifies(timeout=deadline - time.monotonic(),
                                               stop_after=expected - received)))
    return received


@pytest.mark.parametrize("confirm_publish", [True, False], ids=["confirmed", "pipelined"])
def test_messages_spaced_like_request_response_calls_each_notify_at_once(
    database_url, db, confirm_publish
):
    # A caller doing delay().get() publishes one message per round trip: each
    # is the only one in flight, and must wake its consumer at once, not at the
    # end of a rationing window (that cost ~45 ms per call).
    # The listener stands for the consumer: between two calls it finds the
    # queue empty and waits again.
    queue = queue_named("calls")
    with psycopg.connect(database_url, autocommit=True) as listener:
        listen_as_waiter(listener, queue.name)
        for producer in open_connection(database_url, confirm_publish=confirm_publish):
            publish(producer, queue, "declare")
            assert _notifications(listener, 1) == 1
            for n in range(10):
                wait_again(listener, queue.name)
                time.sleep(QUIET * 5)  # a round trip is longer than QUIET
                publish(producer, queue, n)
                assert _notifications(listener, 1) == 1, f"call {n}"
            assert producer.transport.pipeline._owed == {}
        assert list(listener.notifies(timeout=0.2)) == []


def test_a_trailing_notification_wakes_the_confirmer_when_it_falls_due(
    database_url, db, monkeypatch
):
    # The confirmer thread dozes between confirms; a notification owed while it
    # dozes must go out when due, not when the doze would have ended.
    monkeypatch.setattr(pipeline, "CONFIRM_INTERVAL", 3600.0)
    # A window long enough for the listener, which stands for the consumer
    # woken by the first message, to wait again before the trailing one.
    monkeypatch.setattr(pipeline, "QUIET", 0.3)
    monkeypatch.setattr(pipeline, "NOTIFY_WINDOW", 0.3)
    queue = queue_named("trailing")
    with psycopg.connect(database_url, autocommit=True) as listener:
        listen_as_waiter(listener, queue.name)
        for producer in open_connection(database_url, confirm_publish=False):
            for burst in range(2):
                publish(producer, queue, f"first of burst {burst}")
                publish(producer, queue, f"second of burst {burst}")  # rationed: owed
                # The first one's notification, and the trailing one for the second.
                assert _notifications(listener, 1) == 1, f"burst {burst}"
                wait_again(listener, queue.name)
                assert _notifications(listener, 1) == 1, f"burst {burst}, trailing"
                assert producer.transport.pipeline._owed == {}
                wait_again(listener, queue.name)
                time.sleep(0.6)  # the confirmer dozes again; the next message is a lone one
    assert len(rows(db, queue.name)) == 4
