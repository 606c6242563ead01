"""Celery tasks from SQL (migrations/core/104): ``pg_broker_enqueue_task()``
writes the message a Python producer's ``apply_async()`` writes and wakes
the queue's consumers (a real worker runs one: tests/e2e/test_tasks_from_sql_worker.py)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from celery import Celery
from transport_support import listen_as_waiter

from pg_broker.transport.listener import channel_name

pytest_plugins = ["celery_session"]

# Differ by design (see the migration): identity, producer and repr text.
PER_MESSAGE = {"id", "root_id", "origin", "argsrepr", "kwargsrepr"}


def _payload(conn: psycopg.Connection, task_id: str) -> dict:
    (payload,) = conn.execute("SELECT payload FROM job_tasks WHERE task_id = %s",
                              (task_id,)).fetchone()
    return payload


def _body(payload: dict) -> list:
    return json.loads(base64.b64decode(payload["body"]))


def test_a_message_from_sql_is_the_message_apply_async_writes_field_by_field(
    app: Celery, db: psycopg.Connection
) -> None:
    queue = f"sqlq-{uuid.uuid4().hex[:6]}"
    eta = datetime.now(UTC) + timedelta(seconds=30)
    expires = eta + timedelta(seconds=60)
    sent = app.tasks["e2e.add"].apply_async((2,), {"y": 3}, queue=queue, priority=5,
                                            eta=eta, expires=expires)
    (from_sql,) = db.execute(
        "SELECT pg_broker_enqueue_task('e2e.add', %s, %s, %s, 5, %s, %s)",
        (json.dumps([2]), json.dumps({"y": 3}), queue, eta, expires),
    ).fetchone()
    python, sql = _payload(db, sent.id), _payload(db, str(from_sql))

    assert set(python) == set(sql) == {"body", "content-type", "content-encoding", "headers",
                                       "properties"}
    assert (sql["content-type"], sql["content-encoding"]) == ("application/json", "utf-8")
    assert _body(sql) == _body(python) == [
        [2], {"y": 3}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]

    assert set(sql["headers"]) == set(python["headers"])
    for name, value in python["headers"].items():
        if name in ("eta", "expires"):  # the same instant, both ISO 8601 in UTC
            assert datetime.fromisoformat(sql["headers"][name]) == datetime.fromisoformat(value)
        elif name not in PER_MESSAGE:
            assert sql["headers"][name] == value, name
    assert sql["headers"]["id"] == sql["headers"]["root_id"] == str(from_sql)
    assert (sql["headers"]["argsrepr"], sql["headers"]["kwargsrepr"]) == ("[2]", '{"y": 3}')

    assert set(sql["properties"]) == set(python["properties"])
    for name in ("delivery_mode", "delivery_info", "priority", "body_encoding"):
        assert sql["properties"][name] == python["properties"][name], name
    assert sql["properties"]["correlation_id"] == str(from_sql)
    assert abs(int(sql["properties"]["expiration"]) - int(python["properties"]["expiration"])) < 5000

    rows = db.execute(
        "SELECT task_type, priority, queue, status, max_attempts, expires_at"
        " FROM job_tasks WHERE task_id = ANY (%s) ORDER BY id", ([sent.id, str(from_sql)],)
    ).fetchall()
    assert rows[0][:5] == rows[1][:5] == ("e2e.add", 5, queue, "pending", 3)
    # Past its expiry a task is still delivered, for its worker to revoke: no row TTL.
    assert rows[0][5] is None and rows[1][5] is None


def test_job_headers_fill_the_row_as_the_transport_does(db: psycopg.Connection) -> None:
    (job_id,) = db.execute("INSERT INTO jobs (user_id) VALUES (gen_random_uuid())"
                           " RETURNING id").fetchone()
    (task_id,) = db.execute(
        "SELECT pg_broker_enqueue_task('e2e.add', '[1, 1]', p_queue => 'sqlq',"
        " p_expires => now() + interval '1 minute',"
        " p_headers => jsonb_build_object('job_id', %s::text, 'max_attempts', 5))", (job_id,)
    ).fetchone()
    row = db.execute("SELECT job_id, max_attempts, payload -> 'headers' ->> 'job_id',"
                     " expires_at IS NOT NULL"
                     " FROM job_tasks WHERE task_id = %s", (str(task_id),)).fetchone()
    # A job's task keeps its TTL: expired, the job model marks it dead.
    assert row == (job_id, 5, str(job_id), True)
    assert db.execute("SELECT total_tasks FROM jobs").fetchone() == (1,)


def test_enqueue_from_sql_wakes_the_queue_when_it_commits(
    database_url: str, db: psycopg.Connection
) -> None:
    queue = "celery@host.sql"
    with psycopg.connect(database_url, autocommit=True) as listener:
        listen_as_waiter(listener, queue)  # as a consumer that found it empty
        with db.transaction():
            db.execute("SELECT pg_broker_enqueue_task('e2e.add', '[1, 2]', p_queue => %s)", (queue,))
            assert list(listener.notifies(timeout=0.2)) == []  # not before the commit
        heard = list(listener.notifies(timeout=10, stop_after=1))
    assert [n.channel for n in heard] == [channel_name(queue)]


def test_bad_arguments_are_refused_with_the_reason(db: psycopg.Connection) -> None:
    db.execute("INSERT INTO broker_queues (name, durable) VALUES ('replies', false)")
    for call, reason in [
        ("SELECT pg_broker_enqueue_task('e2e.add', '{\"a\": 1}')", "args must be a JSON array"),
        ("SELECT pg_broker_enqueue_task('')", "task name is empty"),
        ("SELECT pg_broker_enqueue_task('e2e.add', p_queue => 'replies')", "not durable"),
    ]:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=reason):
            db.execute(call)
    assert db.execute("SELECT count(*) FROM job_tasks").fetchone() == (0,)
