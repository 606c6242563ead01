"""Queues split across databases with Celery's own mechanism: one app, its
broker_url on one database, and a queue whose tasks are sent with
``apply_async(connection=...)`` to another, where that queue's workers
consume (README, *Scale and capacity*)."""

from __future__ import annotations

from collections.abc import Callable

import kombu
import psycopg
from celery import Celery

from pg_broker.migrate import migrate
from pg_broker.urls import broker_url


def test_a_queue_of_another_database_gets_its_tasks_there(
        database_url: str, db: psycopg.Connection, new_database: Callable[..., str]) -> None:
    audio_database = new_database()
    migrate(audio_database)
    app = Celery("split", broker=broker_url(database_url), set_as_current=False)
    audio_queue = kombu.Queue("audio", routing_key="audio")
    received = []
    with kombu.Connection(broker_url(audio_database)) as audio:
        # The audio workers run there: they declare their queue first.
        with audio.Consumer([audio_queue], callbacks=[lambda body, m: (received.append(m),
                                                                       m.ack())]):
            app.send_task("tasks.audio.synthesize", args=("chapter 1",), queue=audio_queue,
                          connection=audio)
            app.send_task("tasks.pdf.render", args=("book",), queue="pdf")
            audio.drain_events(timeout=10)

    assert [m.headers["task"] for m in received] == ["tasks.audio.synthesize"]
    assert db.execute("SELECT task_type FROM job_tasks").fetchall() == [("tasks.pdf.render",)]
    with psycopg.connect(audio_database) as conn:  # delivered from there, acked: gone
        assert conn.execute("SELECT count(*) FROM job_tasks").fetchone() == (0,)
    app.close()
