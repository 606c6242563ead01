"""The transport's message life cycle at the kombu level: publish, claim, settle.

(Past ~400 lines on purpose: one message's life from publish to settlement,
each stage's tests beside the next; the fixtures of transport_support serve
them all.)"""

from __future__ import annotations

import datetime
import decimal
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import kombu
import psycopg
import pytest
from kombu.exceptions import ChannelError
from taskrows import ack_and_claim, task
from transport_support import (
    open_connection,
    publish,
    queue_named,
    rows,
    unique,
)

from pg_broker.queries import queries
from pg_broker.transport import Transport

pytest_plugins = ["transport_support"]


def test_publish_stores_one_row_with_the_celery_headers(connection, db):
    user_id, task_id = uuid.uuid4(), str(uuid.uuid4())
    job_id = db.execute("INSERT INTO jobs (user_id) VALUES (%s) RETURNING id",
                        (user_id,)).fetchone()[0]
    queue = queue_named("headers")
    publish(connection, queue, {"x": 1}, priority=7, headers={
        "task": "app.speak", "id": task_id, "job_id": str(job_id),
        "user_id": str(user_id), "max_attempts": 5,
    })
    stored = db.execute(
        "SELECT task_type, task_id, job_id, user_id, max_attempts, priority, status, "
        "payload->'headers'->>'task' FROM job_tasks WHERE queue = %s", (queue.name,),
    ).fetchall()
    assert stored == [("app.speak", task_id, job_id, user_id, 5, 7, "pending", "app.speak")]


def test_plain_message_gets_default_attempts_and_no_job(connection, db):
    queue = queue_named("plain")
    publish(connection, queue, "hello")
    assert db.execute(
        "SELECT job_id, user_id, task_type, max_attempts FROM job_tasks WHERE queue = %s",
        (queue.name,),
    ).fetchall() == [(None, None, None, 3)]


def test_consumer_claims_a_batch_sized_to_its_prefetch_window(connection, db):
    queue = queue_named("batch")
    for n in range(10):
        publish(connection, queue, n)
    received = []
    with connection.Consumer([queue], callbacks=[lambda body, m: received.append(body)],
                             prefetch_count=4):
        connection.drain_events(timeout=2)
    assert received == [0, 1, 2, 3]
    assert [status for status, _, _ in rows(db, queue.name)] == ["claimed"] * 4 + ["pending"] * 6


def test_ack_deletes_a_plain_message_row(connection, db):
    with connection.SimpleQueue(unique("ack")) as simple:
        simple.put("a")
        message = simple.get(timeout=2)
        assert rows(db, simple.queue.name) == [("claimed", 1, True)]
        message.ack()
        assert rows(db, simple.queue.name) == []


def test_ack_completes_the_row_when_completed_messages_are_kept(broker_url, db):
    with kombu.Connection(broker_url, transport_options={"completed_retention": 3600}) as connection, \
            connection.SimpleQueue(unique("ack")) as simple:
        simple.put("a")
        simple.get(timeout=2).ack()
        assert rows(db, simple.queue.name) == [("completed", 1, False)]


def test_requeue_returns_the_row_to_pending_at_once(broker_url, db):
    with kombu.Connection(broker_url, transport_options={"completed_retention": 3600}) as connection, \
            connection.SimpleQueue(unique("requeue")) as simple:
        simple.put("a")
        simple.get(timeout=2).requeue()
        assert rows(db, simple.queue.name) == [("pending", 1, False)]
        again = simple.get(timeout=2)
        assert again.delivery_info["redelivered"] is True
        again.ack()
        assert rows(db, simple.queue.name) == [("completed", 2, False)]


def test_a_negative_retention_window_is_refused_when_the_transport_starts(broker_url):
    with pytest.raises(ValueError, match="failed_retention must be a number of seconds >= 0"):
        with kombu.Connection(broker_url, transport_options={"failed_retention": -1}) as conn:
            conn.connect()


def test_requeue_after_the_last_attempt_buries_the_row(connection, db):
    with connection.SimpleQueue(unique("dead")) as simple:
        simple.put("poison", headers={"max_attempts": 2})
        simple.get(timeout=2).requeue()
        simple.get(timeout=2).requeue()
        assert rows(db, simple.queue.name) == [("dead", 2, False)]
        with pytest.raises(simple.Empty):
            simple.get_nowait()


def test_reject_without_requeue_retries_after_a_backoff_that_doubles_per_attempt(
    database_url, db,
):
    queue = queue_named("reject")
    delays = []
    for conn in open_connection(database_url, retry_backoff=1000):
        with conn.SimpleQueue(queue) as simple:
            simple.put("a", headers={"max_attempts": 3})
            for _ in range(2):
                simple.get(timeout=10).reject(requeue=False)
                # updated_at is the failing statement's now(): the delay is exact.
                status, delay = db.execute(
                    "SELECT status, extract(epoch FROM visible_at - updated_at)::float8"
                    " FROM job_tasks WHERE queue = %s", (queue.name,),
                ).fetchone()
                assert status == "pending"
                delays.append(delay)
                with pytest.raises(simple.Empty):
                    simple.get_nowait()
                # The backoff has passed.
                db.execute("UPDATE job_tasks SET visible_at = now() WHERE queue = %s",
                           (queue.name,))
    assert delays == [1000, 2000]  # retry_backoff, then twice that


def test_reject_on_the_last_attempt_fails_the_row(connection, db):
    with connection.SimpleQueue(unique("fail")) as simple:
        simple.put("a", headers={"max_attempts": 1})
        simple.get(timeout=2).reject(requeue=False)
        assert rows(db, simple.queue.name) == [("failed", 1, False)]


def _lease_lost_to_a_second_worker(db, queue: kombu.Queue) -> tuple[int, uuid.UUID]:
    """The lease of the queue's one held row expired, the watchdog took it back
    and a second worker claimed it: (row id, the second worker's lease token)."""
    with db.transaction():  # the lease thread cannot renew in between
        db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 second'"
                   " WHERE queue = %s", (queue.name,))
        assert db.execute("SELECT reclaim_stale_tasks()").fetchone() == (1,)
    (row_id,), _, token = ack_and_claim(db, [], queue.name, limit=1, worker="worker-2")
    return row_id, token


@pytest.mark.parametrize("settle", ["ack", "ack-kept", "requeue", "reject", "renew"])
def test_a_settlement_after_the_lease_was_lost_changes_nothing_and_is_logged(
    database_url, db, caplog, settle,
):
    queue = queue_named("fenced")
    # ack: a plain message's row is deleted at its ack; ack-kept: completed
    # (completed_retention keeps it). Either is fenced.
    options = {"completed_retention": 3600} if settle == "ack-kept" else {}
    for connection in open_connection(database_url, **options):
        publish(connection, queue, "x")
        message = queue(connection.default_channel).get()
        row_id, _ = _lease_lost_to_a_second_worker(db, queue)
        before = task(db, row_id)
        with caplog.at_level(logging.WARNING, logger="pg_broker.transport"):
            if settle == "renew":
                assert connection.transport.leases.renew() == 0
            elif settle == "reject":
                message.reject(requeue=False)
            elif settle == "requeue":
                message.requeue()
            else:
                message.ack()
        assert task(db, row_id) == before  # the second worker's row, untouched
        assert "lease lost" in caplog.text


def test_burying_a_malformed_row_is_fenced_by_its_lease_token(connection, db):
    queue = queue_named("bury")
    publish(connection, queue, "x")
    queue(connection.default_channel).get()
    row_id, live = _lease_lost_to_a_second_worker(db, queue)
    stale = task(db, row_id)
    assert db.execute(queries["transport_bury"], {
        "ids": [row_id], "tokens": [uuid.uuid4()], "error": "malformed"}).fetchall() == []
    assert task(db, row_id) == stale
    assert db.execute(queries["transport_bury"], {
        "ids": [row_id], "tokens": [live], "error": "malformed"}).fetchall() == [(row_id,)]
    assert task(db, row_id)["status"] == "dead"


def test_closing_the_channel_returns_unacked_messages_without_counting_them(broker_url, db):
    queue = queue_named("restore")
    with kombu.Connection(broker_url) as conn:
        publish(conn, queue, 1)
        publish(conn, queue, 2)
        channel = conn.channel()
        assert queue(channel).get() is not None
        assert queue(channel).get() is not None
        assert [status for status, _, _ in rows(db, queue.name)] == ["claimed", "claimed"]
        channel.close()
    assert rows(db, queue.name) == [("pending", 0, False), ("pending", 0, False)]


def test_no_ack_consumer_of_a_durable_queue_settles_rows_on_delivery(connection, db):
    queue = queue_named("noack")
    publish(connection, queue, "x")
    received = []
    with connection.Consumer([queue], callbacks=[lambda body, m: received.append(body)],
                             no_ack=True):
        connection.drain_events(timeout=2)
    assert received == ["x"]
    assert rows(db, queue.name) == []  # acked at once: a plain message's row goes


def test_higher_priority_is_delivered_first_then_fifo(connection, db):
    with connection.SimpleQueue(unique("priority")) as simple:
        for body, priority in [("low-1", 1), ("high", 9), ("low-2", 1), ("mid", 5)]:
            simple.put(body, priority=priority)
        bodies = []
        for _ in range(4):
            message = simple.get(timeout=2)
            bodies.append(message.payload)
            message.ack()
    assert bodies == ["high", "mid", "low-1", "low-2"]


def test_priority_order_holds_across_claims_when_the_backlog_exceeds_the_prefetch_window(
    connection, db,
):
    # Claims of two at a time: the order comes from the claim statement
    # (highest priority, then FIFO), not from sorting one claimed batch.
    queue = queue_named("priority-backlog")
    sent = ([(f"low-{n}", 1) for n in range(4)] + [(f"high-{n}", 9) for n in range(4)]
            + [(f"mid-{n}", 5) for n in range(4)])
    for body, priority in sent:
        publish(connection, queue, body, priority=priority)
    received = []
    with connection.Consumer([queue], prefetch_count=2,
                             callbacks=[lambda body, m: (received.append(body), m.ack())]):
        deadline = time.monotonic() + 30
        while len(received) < len(sent) and time.monotonic() < deadline:
            connection.drain_events(timeout=10)
    assert received == [f"{level}-{n}" for level in ("high", "mid", "low") for n in range(4)]


def test_an_unlimited_prefetch_window_claims_at_most_claim_batch_max(database_url, db):
    queue = queue_named("batch-max")
    received = []
    for conn in open_connection(database_url, claim_batch_max=5):
        for n in range(12):
            publish(conn, queue, n)
        # No prefetch_count: the window is unlimited, claim_batch_max bounds a claim.
        with conn.Consumer([queue], callbacks=[lambda body, m: received.append(body)]):
            conn.drain_events(timeout=10)  # delivers what one claim took
            assert received == [0, 1, 2, 3, 4]
            assert [status for status, _, _ in rows(db, queue.name)] == (
                ["claimed"] * 5 + ["pending"] * 7)


def test_expired_message_is_never_delivered(connection, db):
    queue = queue_named("ttl")
    publish(connection, queue, "stale", expiration=0.05)
    publish(connection, queue, "fresh")
    db.execute("SELECT pg_sleep(0.1)")
    # basic_get: no consumer, so no maintenance sweep ran before the claim.
    bound = queue(connection.default_channel)
    message = bound.get()
    assert message.payload == "fresh"
    message.ack()
    assert bound.get() is None
    # The claim passed the expired row by (the acked one left at its ack);
    # the watchdog drops it.
    assert rows(db, queue.name) == [("pending", 0, False)]
    db.execute("SELECT reclaim_stale_tasks()")
    assert rows(db, queue.name) == []


def test_queue_message_ttl_applies_to_every_message(connection, db):
    queue = queue_named("qttl", message_ttl=0.05)
    publish(connection, queue, "x")
    db.execute("SELECT pg_sleep(0.1)")
    assert queue(connection.default_channel).get() is None


def test_purge_removes_ready_messages_only_and_returns_their_count(connection, db):
    queue = queue_named("purge")
    for n in range(3):
        publish(connection, queue, n)
    channel = connection.channel()
    held = queue(channel).get()
    assert queue(connection.default_channel).purge() == 2
    assert [status for status, _, _ in rows(db, queue.name)] == ["claimed"]
    held.ack()
    channel.close()


def declared(db, queue: str) -> int:
    """The queue's declaration and bindings still stored."""
    return db.execute(
        "SELECT (SELECT count(*) FROM broker_queues WHERE name = %(q)s)"
        " + (SELECT count(*) FROM broker_bindings WHERE queue = %(q)s)", {"q": queue},
    ).fetchone()[0]


def test_an_exclusive_queue_goes_away_when_its_consumer_cancels(connection, db):
    name = unique("exclusive")
    queue = kombu.Queue(name, kombu.Exchange(unique("direct"), type="direct"), routing_key=name,
                        exclusive=True)
    consumer = connection.Consumer([queue], callbacks=[lambda body, m: None])
    consumer.consume()
    assert declared(db, queue.name) == 2
    consumer.cancel()
    assert declared(db, queue.name) == 0


def test_an_exclusive_queue_goes_away_with_its_channel(connection, db):
    # Declared as the AMQP method does it (kombu's Queue would also mark it
    # auto-delete): exclusive alone is enough.
    channel = connection.channel()
    name = unique("exclusive")
    channel.queue_declare(name, exclusive=True, auto_delete=False)
    channel.queue_bind(name, "amq.direct", name)
    assert declared(db, name) == 2
    channel.close()
    assert declared(db, name) == 0


def test_passive_declare_counts_messages_and_refuses_unknown_queues(connection, db):
    queue = queue_named("passive")
    publish(connection, queue, 1)
    publish(connection, queue, 2)
    channel = connection.default_channel
    assert channel.queue_declare(queue.name, passive=True).message_count == 2
    with pytest.raises(ChannelError):
        channel.queue_declare(unique("missing"), passive=True)


def test_basic_get_returns_one_message_or_none(connection, db):
    queue = queue_named("get")
    bound = queue(connection.default_channel)
    bound.declare()
    assert bound.get() is None
    publish(connection, queue, "only")
    message = bound.get()
    assert message.payload == "only"
    message.ack()
    assert bound.get() is None


def test_drain_events_times_out_on_an_empty_queue(connection, db):
    queue = queue_named("empty")
    with connection.Consumer([queue], callbacks=[lambda body, m: None]):
        with pytest.raises(socket.timeout):
            connection.drain_events(timeout=0.3)


def test_malformed_row_is_buried_and_the_next_message_delivered(connection, db):
    queue = queue_named("malformed")
    publish(connection, queue, "before")
    db.execute("INSERT INTO job_tasks (queue, payload) VALUES (%s, '[1, 2]'), (%s, "
               "'{\"properties\": {\"body_encoding\": \"base64\"}, \"body\": \"@@@\"}')",
               (queue.name, queue.name))
    publish(connection, queue, "after")
    received = []
    with connection.Consumer([queue], callbacks=[lambda b, m: (received.append(b), m.ack())]):
        connection.drain_events(timeout=2)
    assert received == ["before", "after"]
    # The two delivered were acked (their rows deleted); the malformed ones stay dead.
    assert [status for status, _, _ in rows(db, queue.name)] == ["dead", "dead"]


def test_oversize_message_is_refused_at_publish(broker_url, db):
    queue = queue_named("big")
    with kombu.Connection(broker_url, transport_options={"max_message_size": 2000}) as conn:
        with pytest.raises(ChannelError, match="max_message_size"):
            publish(conn, queue, "x" * 5000)
    assert rows(db, queue.name) == []


def test_payload_the_database_cannot_store_is_refused_with_a_channel_error(connection, db):
    queue = queue_named("nul")
    with pytest.raises(ChannelError, match="refused by the database"):
        publish(connection, queue, "x", headers={"bad": "a\x00b"})
    assert rows(db, queue.name) == []


@pytest.mark.parametrize("name", [
    "'; DROP TABLE job_tasks; --",
    'quote"d name with spaces',
    "ünïcødé-队列-" + "x" * 80,
    "celery@host.example.com.celery.pidbox",
])
def test_hostile_queue_names_work_end_to_end(connection, db, name):
    with connection.SimpleQueue(name) as simple:
        simple.put("payload")
        message = simple.get(timeout=2)
        assert message.payload == "payload"
        message.ack()
    assert rows(db, name) == []
    assert db.execute("SELECT to_regclass('job_tasks') IS NOT NULL").fetchone()[0]


def test_transport_identity_and_capabilities():
    assert Transport.driver_type == "pgbroker"
    assert Transport.driver_name == "psycopg"
    assert {"direct", "topic", "fanout"} <= Transport.implements.exchange_type
    assert Transport.implements.asynchronous
    assert psycopg.OperationalError in Transport.connection_errors


def test_header_values_json_cannot_carry_natively_survive_the_round_trip(connection, db):
    sent = {
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "amount": decimal.Decimal("1.25"),
    }
    with connection.SimpleQueue(unique("typed")) as simple:
        simple.put("x", headers=sent)
        message = simple.get(timeout=2)
        assert {key: message.headers[key] for key in sent} == sent
        message.ack()


@pytest.fixture
def commit_settings(db) -> Iterator[Callable[[], list[tuple[str, str]]]]:
    """synchronous_commit as each insert, update or delete of a job_tasks row
    saw it (a trigger records it), in order; the trigger goes after the test."""
    db.execute("CREATE TABLE test_commit_settings (id serial, op text, setting text)")
    db.execute("""CREATE FUNCTION test_record_commit_setting() RETURNS trigger
                  LANGUAGE plpgsql AS $$
                  BEGIN
                      INSERT INTO test_commit_settings (op, setting)
                      VALUES (TG_OP, current_setting('synchronous_commit'));
                      RETURN coalesce(NEW, OLD);
                  END $$""")
    db.execute("CREATE TRIGGER test_record_commit_setting"
               " BEFORE INSERT OR UPDATE OR DELETE ON job_tasks"
               " FOR EACH ROW EXECUTE FUNCTION test_record_commit_setting()")
    try:
        yield lambda: db.execute(
            "SELECT op, setting FROM test_commit_settings ORDER BY id").fetchall()
    finally:
        db.execute("DROP TRIGGER test_record_commit_setting ON job_tasks")
        db.execute("DROP FUNCTION test_record_commit_setting()")
        db.execute("DROP TABLE test_commit_settings")


def test_the_synchronous_commit_option_applies_to_publishes(database_url, db, commit_settings):
    """With visible_before_flush the insert commits asynchronously (a flush
    follows it: tests/integration/test_publish_flush.py)."""
    (default,) = db.execute("SHOW synchronous_commit").fetchone()
    assert default != "off", "the server's default must differ from the option tested"
    for options in ({}, {"synchronous_commit": "off"}, {"visible_before_flush": True}):
        for conn in open_connection(database_url, **options):
            publish(conn, queue_named("commit"), "x")
    assert commit_settings() == [("INSERT", default), ("INSERT", "off"), ("INSERT", "off")]


def test_claims_settlements_and_renewals_commit_asynchronously(connection, db, commit_settings):
    queue = queue_named("async")
    publish(connection, queue, "x")
    bound = queue(connection.default_channel)
    bound.get().requeue()
    message = bound.get()
    assert connection.transport.leases.renew() == 1
    message.reject(requeue=False)
    db.execute("UPDATE job_tasks SET visible_at = now() WHERE queue = %s", (queue.name,))
    bound.get().ack()
    # claim, requeue, claim, renewal, fail, (the test's own update), claim,
    # and the ack: a delete (a plain message's row leaves at its ack)
    settled = [(op, setting) for op, setting in commit_settings() if op != "INSERT"]
    assert [op for op, _ in settled] == ["UPDATE"] * 7 + ["DELETE"], settled
    assert [setting for n, (_, setting) in enumerate(settled) if n != 5] == ["off"] * 7, settled
