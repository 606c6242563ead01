"""Poison messages at the kombu level: a row of any shape, or a consumer that
raises on a message, ends that message alone (dead with its reason, or
dropped with a log line) and never its neighbours or the consumer."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator

import kombu
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from poison_support import envelope, insert_row, json_values, near_misses
from transport_support import open_connection, publish, queue_named, rows

pytest_plugins = ["transport_support"]

LOGGER = "pg_broker.transport"


def drain(conn: kombu.Connection, until, seconds: float = 10.0) -> list[BaseException]:
    """drain_events until ``until()``; the exceptions consumers raised on the way."""
    raised: list[BaseException] = []
    for _ in range(int(seconds / 0.2)):
        if until():
            break
        try:
            conn.drain_events(timeout=0.2)
        except TimeoutError:
            pass
        except ValueError as exc:
            raised.append(exc)
    return raised


def status(db: psycopg.Connection, row_id: int) -> tuple:
    return db.execute("SELECT status, attempts, error FROM job_tasks WHERE id = %s",
                      (row_id,)).fetchone()


@pytest.mark.parametrize("payload, reason", [
    ({"properties": {"body_encoding": 5}, "body": "x"}, "body_encoding is a JSON number"),
    ({"properties": {"body_encoding": "rot13"}, "body": "x"}, "neither utf-8 nor base64"),
    ({"properties": {}, "body": {"a": 1}}, "body is a JSON object"),
    ({"properties": {}, "body": "x", "headers": ["task"]}, "headers is a JSON array"),
    ({"properties": {}, "body": "x", "content-type": 7}, "content-type is a JSON number"),
    ({"properties": {"delivery_info": "x"}, "body": "x"}, "delivery_info is a JSON string"),
    ({"properties": []}, "no properties object"),
    ("just a string", "payload is a JSON string"),
])
def test_a_malformed_row_is_dead_with_its_reason_and_its_neighbours_run(
    connection, db, caplog, payload, reason,
):
    queue = queue_named("malformed")
    publish(connection, queue, "before")
    bad = insert_row(db, "job_tasks", queue.name, payload)
    publish(connection, queue, "after")
    received = []
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with connection.Consumer([queue], callbacks=[lambda b, m: (received.append(b), m.ack())]):
            drain(connection, lambda: len(received) == 2)
    assert received == ["before", "after"]
    state, _, error = status(db, bad)
    assert (state, reason in error) == ("dead", True), error
    assert f"job_tasks row {bad} " in caplog.text
    assert json.dumps(payload) not in caplog.text


def test_a_malformed_transient_message_is_dropped_alone(connection, db, caplog):
    queue = queue_named("events", durable=False)
    queue(connection.default_channel).declare()
    good = [insert_row(db, "broker_transient_messages", queue.name, envelope("one")),
            insert_row(db, "broker_transient_messages", queue.name,
                       {"properties": {"body_encoding": 5}, "body": "secret-payload"}),
            insert_row(db, "broker_transient_messages", queue.name, envelope("two"))]
    received = []
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with connection.Consumer([queue], no_ack=True, callbacks=[lambda b, m: received.append(b)],
                                 prefetch_count=10):
            drain(connection, lambda: len(received) == 2)
    assert received == ["one", "two"]
    assert f"dropped transient message {good[1]} of queue {queue.name!r}" in caplog.text
    assert "secret-payload" not in caplog.text


def test_a_consumer_that_raises_counts_the_delivery_and_buries_the_message_at_last(
    connection, db, caplog,
):
    queue = queue_named("raises")
    for body in ("before", "poison", "after"):
        publish(connection, queue, body, headers={"max_attempts": 3})
    received = []

    def consume(body, message):
        if body == "poison":
            raise ValueError("cannot handle this one")
        received.append(body)
        message.ack()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        with connection.Consumer([queue], callbacks=[consume], prefetch_count=1):
            raised = drain(connection, lambda: len(received) == 2 and
                           rows(db, queue.name) == [("dead", 3, False)])
    # drain_events raises what the consumer raised (its caller decides), but
    # the delivery was settled first: three deliveries, then dead.
    assert [str(exc) for exc in raised] == ["cannot handle this one"] * 3
    assert received == ["before", "after"]
    # The two acked are deleted; the dead one stays (pg-broker dead list).
    assert rows(db, queue.name) == [("dead", 3, False)]
    error = db.execute("SELECT error FROM job_tasks WHERE queue = %s AND status = 'dead'",
                       (queue.name,)).fetchone()[0]
    assert error == ("requeued after 3 of 3 deliveries: the consumer raised "
                     "ValueError: cannot handle this one")


def test_a_delivery_whose_consumer_exits_the_process_counts(database_url, db):
    queue = queue_named("exits")
    for conn in open_connection(database_url):
        publish(conn, queue, "fatal")
        publish(conn, queue, "prefetched")

        def consume(body, message):
            raise SystemExit(3)  # what a task calling sys.exit() does in a plain consumer

        with conn.Consumer([queue], callbacks=[consume], prefetch_count=2):
            with pytest.raises(SystemExit):
                conn.drain_events(timeout=5)
    # The delivery that started counts; the one merely prefetched does not.
    assert rows(db, queue.name) == [("pending", 1, False), ("pending", 0, False)]
    assert db.execute("SELECT error FROM job_tasks WHERE queue = %s ORDER BY sequence LIMIT 1",
                      (queue.name,)).fetchone() == ("the consumer raised SystemExit: 3",)


# Property: any JSON at all, beside good messages --------------------------------

payloads = st.lists(json_values | near_misses(), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def consumer(database_url) -> Iterator[tuple[kombu.Connection, psycopg.Connection, dict]]:
    """One consumer of a durable and a non-durable queue for every example."""
    with psycopg.connect(database_url, autocommit=True) as db:
        for conn in open_connection(database_url):
            durable, transient = queue_named("prop"), queue_named("prop-events", durable=False)
            durable(conn.default_channel).declare()
            transient(conn.default_channel).declare()
            seen: dict = {"bodies": []}

            def consume(body, message, seen=seen):
                if isinstance(body, str) and body.startswith("good-"):
                    seen["bodies"].append(body)
                    message.ack()
                else:
                    raise ValueError("not a message of this test")

            def undecodable(message, exc):
                raise ValueError("not a message of this test") from exc

            with conn.Consumer([durable, transient], callbacks=[consume],
                               on_decode_error=undecodable):
                yield conn, db, {"durable": durable.name, "transient": transient.name, **seen}


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(bad=payloads)
def test_rows_of_any_json_shape_never_touch_their_neighbours(consumer, caplog, bad):
    conn, db, names = consumer
    marker = f"marker-{uuid.uuid4().hex}"
    good, bad_rows = [], {"job_tasks": [], "broker_transient_messages": []}
    for table, queue in (("job_tasks", names["durable"]),
                         ("broker_transient_messages", names["transient"])):
        for payload in bad:
            good.append(f"good-{uuid.uuid4().hex}")
            insert_row(db, table, queue, envelope(good[-1], queue))
            if isinstance(payload, dict):  # a marker the logs must never show
                payload = {**payload, "marker": marker}
            bad_rows[table].append(insert_row(db, table, queue, payload))
        good.append(f"good-{uuid.uuid4().hex}")
        insert_row(db, table, queue, envelope(good[-1], queue))
    received = names["bodies"]
    received.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        drain(conn, lambda: set(good) <= set(received) and not db.execute(
            "SELECT count(*) FROM job_tasks WHERE id = ANY(%s) AND status <> 'dead'",
            (bad_rows["job_tasks"],)).fetchone()[0], seconds=30)

    assert sorted(received) == sorted(good)  # every good one, exactly once
    for row_id in bad_rows["job_tasks"]:
        state, _, error = status(db, row_id)
        assert state == "dead" and error, (row_id, state, error)
    assert not db.execute("SELECT count(*) FROM broker_transient_messages WHERE id = ANY(%s)",
                          (bad_rows["broker_transient_messages"],)).fetchone()[0]
    for row_id in bad_rows["broker_transient_messages"]:
        assert (f"transient message {row_id} " in caplog.text
                or f"broker_transient_messages row {row_id} " in caplog.text), row_id
    assert marker not in caplog.text
