"""Workers keep job_tasks bounded by themselves: the lease thread deletes
finished rows past their windows (transport options), one worker at a time."""

from __future__ import annotations

import time

import psycopg
from celery_workers import wait_for
from transport_support import queue_named

from pg_broker.transport.settlement import CLEANUP_LOCK_KEY

pytest_plugins = ["transport_support"]


def _plain(db: psycopg.Connection, queue: str, status: str, finished_ago: str) -> None:
    db.execute("INSERT INTO job_tasks (queue, payload, status, completed_at)"
               " VALUES (%s, '{}', %s, now() - %s::interval)", (queue, status, finished_ago))


def _statuses(db: psycopg.Connection, queue: str) -> list[str]:
    return [s for (s,) in db.execute(
        "SELECT status FROM job_tasks WHERE queue = %s ORDER BY id", (queue,))]


def test_a_consuming_worker_deletes_finished_rows_past_their_windows(open_consumer, db):
    queue = queue_named("cleanup").name
    for status, ago in [("completed", "2 minutes"), ("completed", "10 seconds"),
                        ("failed", "2 minutes"), ("dead", "2 hours"), ("dead", "1 minute")]:
        _plain(db, queue, status, ago)
    db.execute("INSERT INTO job_tasks (queue, payload, visible_at) VALUES"
               " (%s, '{}', now() + interval '1 hour')", (queue,))  # delayed (ETA)
    with open_consumer(completed_retention=60, failed_retention=3600):
        # Left: completed 10 s ago (window 60 s), failed and dead within the
        # hour (failed rows are kept longer), and the delayed message.
        wait_for(lambda: _statuses(db, queue) == ["completed", "failed", "dead", "pending"], 30,
                 lambda: f"the old finished rows to go: {_statuses(db, queue)}")


def test_the_cleanup_gives_way_to_the_worker_running_it(open_consumer, db, database_url):
    queue = queue_named("cleanup-lock").name
    _plain(db, queue, "dead", "2 hours")
    with psycopg.connect(database_url) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (CLEANUP_LOCK_KEY,))  # until commit
        with open_consumer(failed_retention=60):
            time.sleep(2)  # ten cleanup turns, each finding the lock taken
            assert _statuses(db, queue) == ["dead"]
            other.commit()
            wait_for(lambda: _statuses(db, queue) == [], 30, "the cleanup after the lock")
