"""Exchanges and queues shared across processes, transactional enqueue, URLs."""

from __future__ import annotations

import time

import kombu
import psycopg
import pytest
from celery_workers import wait_for
from transport_support import (
    pgbroker_url,
    publish,
    queue_named,
    rows,
    unique,
)

from pg_broker.transport import enqueue_in

pytest_plugins = ["transport_support"]


def consume_all(conn: kombu.Connection, queue: kombu.Queue, expected: int = 1,
                timeout: float = 30) -> list:
    """The bodies of ``queue``'s messages, acked: as many as ``expected``
    (within a generous ``timeout``), and whatever else came with them.
    The absence of a message is checked on the rows, not with a timeout."""
    received = []
    deadline = time.monotonic() + timeout
    with conn.Consumer([queue], callbacks=[lambda body, m: (received.append(body), m.ack())]):
        while len(received) < expected:
            conn.drain_events(timeout=max(deadline - time.monotonic(), 0.01))
    return received


def test_fanout_reaches_queues_bound_by_another_connection(broker_url, connection, db):
    exchange = kombu.Exchange(unique("fan"), type="fanout")
    queues = [kombu.Queue(unique("fan-q"), exchange=exchange) for _ in range(2)]
    for queue in queues:
        queue(connection.default_channel).declare()
    # A second connection that never declared the exchange or its queues.
    with kombu.Connection(broker_url) as publisher:
        with publisher.Producer() as producer:
            producer.publish("hello", exchange=exchange.name, routing_key="ignored")
    assert [consume_all(connection, queue) for queue in queues] == [["hello"], ["hello"]]


def test_topic_routes_by_pattern_across_connections(broker_url, connection, db):
    exchange = kombu.Exchange(unique("topic"), type="topic")
    wildcard = kombu.Queue(unique("t-star"), exchange=exchange, routing_key="task.*")
    everything = kombu.Queue(unique("t-hash"), exchange=exchange, routing_key="#")
    exact = kombu.Queue(unique("t-exact"), exchange=exchange, routing_key="worker.heartbeat")
    for queue in (wildcard, everything, exact):
        queue(connection.default_channel).declare()
    with kombu.Connection(broker_url) as publisher:
        with publisher.Producer() as producer:
            producer.publish("received", exchange=exchange.name, routing_key="task.received")
    assert consume_all(connection, wildcard) == ["received"]
    assert consume_all(connection, everything) == ["received"]
    assert rows(db, exact.name) == []  # routed in the publish's own statement: never stored


def test_direct_exchange_drops_messages_no_binding_matches(connection, db):
    exchange = kombu.Exchange(unique("direct"), type="direct")
    queue = kombu.Queue(unique("d"), exchange=exchange, routing_key="a")
    publish(connection, queue, "routed")
    with connection.Producer() as producer:
        producer.publish("lost", exchange=exchange.name, routing_key="b")
    assert consume_all(connection, queue) == ["routed"]
    # The routed one was acked (its row deleted); the other was never stored.
    assert db.execute("SELECT count(*) FROM job_tasks").fetchone()[0] == 0


def test_unbind_stops_routing_to_the_queue(connection, db):
    exchange = kombu.Exchange(unique("unbind"), type="fanout")
    queue = kombu.Queue(unique("u"), exchange=exchange)
    bound = queue(connection.default_channel)
    bound.declare()
    bound.unbind_from(exchange)
    with connection.Producer() as producer:
        producer.publish("x", exchange=exchange.name)
    assert rows(db, queue.name) == []


def test_deleting_an_exchange_removes_its_bindings(connection, db):
    exchange = kombu.Exchange(unique("gone"), type="fanout")
    queue = kombu.Queue(unique("g"), exchange=exchange)
    queue(connection.default_channel).declare()
    exchange(connection.default_channel).delete()
    assert db.execute("SELECT count(*) FROM broker_bindings WHERE exchange = %s",
                      (exchange.name,)).fetchone()[0] == 0
    with connection.Producer() as producer:
        producer.publish("x", exchange=exchange.name)
    assert rows(db, queue.name) == []


def test_non_durable_queue_keeps_messages_in_the_unlogged_table(connection, db):
    queue = queue_named("events", durable=False, auto_delete=True)
    publish(connection, queue, {"type": "task-succeeded"})
    assert rows(db, queue.name) == []
    assert db.execute(
        "SELECT count(*) FROM broker_transient_messages WHERE queue = %s", (queue.name,)
    ).fetchone()[0] == 1
    received = []
    with connection.Consumer([queue], callbacks=[lambda body, m: received.append(body)],
                             no_ack=True):
        connection.drain_events(timeout=1)
    assert received == [{"type": "task-succeeded"}]
    assert db.execute("SELECT count(*) FROM broker_transient_messages").fetchone()[0] == 0


def test_auto_delete_queue_goes_with_its_bindings_when_its_consumer_cancels(connection, db):
    exchange = kombu.Exchange(unique("reply"), type="direct")
    queue = kombu.Queue(unique("r"), exchange=exchange, routing_key="r",
                        durable=False, auto_delete=True)
    consumer = connection.Consumer([queue], callbacks=[lambda body, m: None], no_ack=True)
    consumer.consume()
    assert db.execute("SELECT count(*) FROM broker_bindings WHERE queue = %s",
                      (queue.name,)).fetchone()[0] == 1
    consumer.cancel()
    assert db.execute(
        "SELECT (SELECT count(*) FROM broker_queues WHERE name = %(q)s)"
        " + (SELECT count(*) FROM broker_bindings WHERE queue = %(q)s)", {"q": queue.name},
    ).fetchone()[0] == 0


def test_queue_unused_past_its_expiry_is_swept_with_its_messages(connection, db):
    exchange = kombu.Exchange(unique("exp"), type="fanout")
    queue = kombu.Queue(unique("e"), exchange=exchange, durable=False, expires=0.05)
    publish(connection, queue, "x")
    db.execute("SELECT pg_sleep(0.1)")
    connection.transport.leases.maintain()
    assert db.execute(
        "SELECT (SELECT count(*) FROM broker_queues WHERE name = %(q)s)"
        " + (SELECT count(*) FROM broker_bindings WHERE queue = %(q)s)"
        " + (SELECT count(*) FROM broker_transient_messages WHERE queue = %(q)s)",
        {"q": queue.name},
    ).fetchone()[0] == 0


def test_consumed_queue_outlives_its_expiry_while_the_consumer_is_busy(
    broker_url, connection, db,
):
    expires = 2.0
    queue = queue_named("busy", durable=False, expires=expires)
    consumer = connection.Consumer([queue], callbacks=[lambda body, m: None], no_ack=True)
    consumer.consume()
    declared = db.execute("SELECT last_used_at FROM broker_queues WHERE name = %s",
                          (queue.name,)).fetchone()[0]
    # A long task: the consumer never drains or polls meanwhile. Wait until
    # the queue was touched past its first expiry, then sweep at once (it is
    # touched every third of its expiry, so it is fresh for more than 1 s).
    wait_for(lambda: db.execute(
        "SELECT last_used_at > %s + %s * interval '1 second' FROM broker_queues"
        " WHERE name = %s", (declared, expires, queue.name)).fetchone()[0],
        60, "the consumer's lease thread to keep the queue alive past its expiry")
    with kombu.Connection(broker_url) as other:
        other.connect()
        other.transport.leases.maintain()
    assert db.execute("SELECT count(*) FROM broker_queues WHERE name = %s",
                      (queue.name,)).fetchone()[0] == 1
    consumer.cancel()


def test_enqueue_in_commits_with_the_callers_transaction(connection, database_url, db):
    queue = queue_named("txn")
    queue(connection.default_channel).declare()
    with psycopg.connect(database_url) as caller:
        with enqueue_in(caller):
            publish(connection, queue, "with the job")
        assert rows(db, queue.name) == []  # not visible before the caller commits
        caller.commit()
    assert consume_all(connection, queue) == ["with the job"]


def test_enqueue_in_rolled_back_sends_nothing(connection, database_url, db):
    queue = queue_named("rollback")
    queue(connection.default_channel).declare()
    with psycopg.connect(database_url) as caller:
        with enqueue_in(caller):
            publish(connection, queue, "never")
        caller.rollback()
    publish(connection, queue, "after")
    assert consume_all(connection, queue) == ["after"]


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_publishes_inside_an_open_transaction_share_its_fate(
    connection, database_url, db, outcome
):
    # The caller's transaction is already open when the messages come (the
    # transport then runs its prepared statement on the caller's session).
    queue = queue_named("open-txn")
    queue(connection.default_channel).declare()
    with psycopg.connect(database_url) as caller:
        caller.execute("SELECT 1")
        with enqueue_in(caller):
            for n in range(3):
                publish(connection, queue, f"message {n}")
        assert rows(db, queue.name) == []
        getattr(caller, outcome)()
        assert caller.execute("SELECT count(*) FROM job_tasks WHERE queue = %s",
                              (queue.name,)).fetchone()[0] == (3 if outcome == "commit" else 0)
    if outcome == "commit":
        assert sorted(consume_all(connection, queue, 3)) == [f"message {n}" for n in range(3)]
    else:
        assert rows(db, queue.name) == []


def test_bare_scheme_means_the_configured_database(monkeypatch, database_url):
    monkeypatch.setenv("PG_BROKER_URL", database_url)
    with kombu.Connection("pgbroker://") as conn:
        assert conn.transport.conninfo == database_url
        assert conn.as_uri() == "pgbroker://"


def test_libpq_query_parameters_reach_the_session(database_url, db):
    name = unique("app")
    with kombu.Connection(pgbroker_url(database_url, application_name=name)) as conn:
        conn.connect()
        assert conn.transport.conn.execute(
            "SELECT current_setting('application_name')").fetchone()[0] == name


def test_as_uri_masks_the_password():
    conn = kombu.Connection("pgbroker://worker:s3cret@db.example:5432/broker?sslmode=require")
    assert conn.as_uri() == "pgbroker://worker:**@db.example:5432/broker?sslmode=require"
    assert "s3cret" in conn.as_uri(include_password=True)


def test_unreachable_database_raises_kombu_operational_error():
    from kombu.exceptions import OperationalError

    conn = kombu.Connection("pgbroker://nobody@127.0.0.1:1/none?connect_timeout=1")
    with pytest.raises(OperationalError):
        conn.ensure_connection(max_retries=1)
