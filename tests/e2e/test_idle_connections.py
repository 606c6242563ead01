"""What an idle worker holds (issue 12): its work connection and its LISTEN
connection, broker and result backend together, counted in pg_stat_activity;
the same while a task of it awaits a result (the result waiters LISTEN on the
process's LISTEN session, which its consumer shares).

A solo worker with the ``pgbroker://`` result backend stores a result (the
backend's connection opens) and answers a remote-control ping (a transient
reply); its heartbeat events go out every 2 s. Idle, the result backend's
connection closes after ``IDLE_CLOSE`` and the lone transient publishes
(heartbeats, replies) open no pipelined-publish connection.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import psycopg
import pytest
from celery import Celery
from celery_workers import Worker, process_environment, wait_for

from pg_broker.transport.connections import IDLE_CLOSE

pytestmark = pytest.mark.slow
pytest_plugins = ["celery_session"]


def _sessions(db: psycopg.Connection, name: str) -> int:
    return db.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                      (name,)).fetchone()[0]


def test_an_idle_worker_holds_two_connections_for_broker_and_results(
        app: Celery, database_url: str, db: psycopg.Connection, tmp_path: Path) -> None:
    name = f"idle-worker-{uuid.uuid4().hex[:8]}"  # every session the worker opens carries it
    separator = "&" if "?" in database_url else "?"
    env = process_environment(f"{database_url}{separator}application_name={name}")
    queue = f"idle.{uuid.uuid4().hex[:8]}"
    worker = Worker(env, tmp_path, pool="solo", concurrency=1, queues=[queue]).start()
    try:
        assert app.tasks["e2e.add"].apply_async((2, 3), queue=queue).get(timeout=60) == 5
        assert app.control.ping(destination=[worker.nodename], timeout=10)
        opened = _sessions(db, name)
        assert opened > 2  # the result backend's connection is open after the task
        wait_for(lambda: _sessions(db, name) <= 2, IDLE_CLOSE * 3 + 30,
                 lambda: f"the idle worker to hold 2 connections ({_sessions(db, name)} now)")
        # Its heartbeat events (every 2 s) open none: three of them later, still 2.
        held = set()
        deadline = time.monotonic() + 6.5
        while time.monotonic() < deadline:
            held.add(_sessions(db, name))
            time.sleep(0.1)
        assert held == {2}
        assert app.tasks["e2e.add"].apply_async((4, 5), queue=queue).get(timeout=60) == 9
    finally:
        worker.stop()


def test_a_worker_awaiting_a_result_holds_two_connections(
        app: Celery, database_url: str, db: psycopg.Connection, tmp_path: Path) -> None:
    name = f"awaiting-worker-{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in database_url else "?"
    env = process_environment(f"{database_url}{separator}application_name={name}")
    queue = f"awaiting.{uuid.uuid4().hex[:8]}"
    worker = Worker(env, tmp_path, pool="solo", concurrency=1, queues=[queue]).start()
    try:
        awaited = str(uuid.uuid4())
        key = app.backend.get_key_for_task(awaited).decode()
        waiting = app.tasks["e2e.await_result"].apply_async((awaited, 300), queue=queue)
        wait_for(lambda: db.execute("SELECT count(*) FROM task_result_waiters WHERE key = %s",
                                    (key,)).fetchone()[0] == 1, 60, "the task to await the result")
        # It stored STARTED on the result backend's connection, which closes
        # when idle; the wait keeps the work and LISTEN connections only.
        wait_for(lambda: _sessions(db, name) <= 2, IDLE_CLOSE * 3 + 30,
                 lambda: f"the awaiting worker to hold 2 connections ({_sessions(db, name)} now)")
        held = set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            held.add(_sessions(db, name))
            time.sleep(0.1)
        assert held == {2}

        app.backend.mark_as_done(awaited, "awaited")

        assert waiting.get(timeout=60) == "awaited"
    finally:
        worker.stop()
