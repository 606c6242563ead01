"""Celery settings of the pg_broker worker app (``tasks.app``).

Every setting can be overridden by an environment variable named
``CELERY_`` + the setting in upper case (``CELERY_WORKER_PREFETCH_MULTIPLIER=4``,
``CELERY_BROKER_URL=pgbroker://user:pass@db:5432/app``); values are read as the
type of the default (integers, floats, true/false). With no environment at
all, the broker and the result backend are the embedded PostgreSQL, or the
database in ``PG_BROKER_URL`` / ``DATABASE_URL``: results through the
``pgbroker://`` backend (pushed ``get()``, native chords);
``PG_BROKER_RESULT_BACKEND=sqlalchemy`` puts them in Celery's SQLAlchemy
backend on that database instead (it polls: ``get()`` waits in 0.5 s steps).
(Celery itself reads ``CELERY_RESULT_BACKEND``, which wins over both.)

Delivery: acks late, so a task's row stays held until the task finished. A
task that raises is rejected and the broker retries it with exponential
backoff (SQL ``fail_task``) up to ``max_attempts`` (3) deliveries, then marks
it failed; a worker process that dies mid-task has its message requeued, and a
message that keeps killing workers is dead after ``max_attempts`` deliveries.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
from kombu import Queue

from pg_broker.database import database_url as _database_url
from pg_broker.urls import result_backend_url


def _env(name: str, default):
    """The setting ``name`` from ``CELERY_<NAME>`` if set, else ``default``."""
    raw = os.environ.get("CELERY_" + name.upper())
    if raw is None or raw.strip() == "":
        return default
    raw = raw.strip()
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def _seconds(variable: str, default: float) -> float:
    return float(os.environ.get(variable, "").strip() or default)


# Broker: rows of job_tasks. `pgbroker://` alone means PG_BROKER_URL, DATABASE_URL
# or the embedded server.
broker_url = _env("broker_url", "pgbroker://")
broker_connection_retry_on_startup = _env("broker_connection_retry_on_startup", True)
broker_transport_options = {
    # First retry delay after a task raised; doubles per attempt (SQL fail_task).
    "retry_backoff": _seconds("PG_BROKER_RETRY_BACKOFF", 10.0),
}

# Results: the same database, through pg_broker's result backend (or Celery's
# SQLAlchemy one, by name).
if os.environ.get("PG_BROKER_RESULT_BACKEND", "").strip().lower() == "sqlalchemy":
    result_backend = result_backend_url(_database_url())
else:
    result_backend = _env("result_backend", "pgbroker://")
result_expires = _env("result_expires", 86400)
result_extended = _env("result_extended", False)

task_serializer = _env("task_serializer", "json")
result_serializer = _env("result_serializer", "json")
accept_content = ["json"]
timezone = _env("timezone", "UTC")
enable_utc = True

# At-least-once: ack after the task ran; a failure is rejected (the broker
# retries it with backoff), a lost worker process requeues its message.
task_acks_late = _env("task_acks_late", True)
task_reject_on_worker_lost = _env("task_reject_on_worker_lost", True)
task_acks_on_failure = _env("task_acks_on_failure", False)
task_acks_on_timeout = _env("task_acks_on_timeout", False)
# Audio tasks run for seconds to minutes: take one message per free process so
# idle workers elsewhere get the rest.
worker_prefetch_multiplier = _env("worker_prefetch_multiplier", 1)

task_default_queue = "default"
task_queues = (Queue("audio"), Queue("documents"), Queue("default"))
task_routes = {
    "tasks.audio.*": {"queue": "audio"},
    "tasks.documents.*": {"queue": "documents"},
    "tasks.maintenance.*": {"queue": "default"},
}

# Beat: the watchdog every minute, retention every hour. A run that no worker
# picked up before the next one is due is dropped, not piled up.
_watchdog_every = _seconds("PG_BROKER_WATCHDOG_INTERVAL", 60.0)
_retention_every = _seconds("PG_BROKER_RETENTION_INTERVAL", 3600.0)
beat_schedule = {
    "watchdog": {
        "task": "tasks.maintenance.reclaim_stale_tasks",
        "schedule": _watchdog_every,
        "options": {"expires": _watchdog_every},
    },
    "retention": {
        "task": "tasks.maintenance.delete_finished_tasks",
        "schedule": _retention_every,
        "options": {"expires": _retention_every},
    },
}
beat_schedule_filename = _env(
    "beat_schedule_filename",
    str(Path(platformdirs.user_data_dir("pg_broker")) / "celerybeat-schedule"),
)
