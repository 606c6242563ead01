"""Maintenance tasks that celery beat schedules (see ``beat_schedule`` in
celeryconfig.py); the same units run from ``pg-broker reclaim|retention``."""

from __future__ import annotations

from pg_broker.maintenance import ResultExpiry, Retention, Watchdog, default_retention
from tasks import app
from tasks.lifecycle import connection


@app.task(name="tasks.maintenance.reclaim_stale_tasks")
def reclaim_stale_tasks() -> int:
    """The watchdog: expired leases back to pending, or dead after the last attempt."""
    return Watchdog().run(connection())


@app.task(name="tasks.maintenance.delete_finished_tasks")
def delete_finished_tasks(age: str | None = None) -> int:
    """Retention: finished task rows older than ``age`` (default
    PG_BROKER_RETENTION), and results past their ``result_expires``; how many rows went."""
    conn = connection()
    return Retention.older_than(age or default_retention()).run(conn) + ResultExpiry().run(conn)
