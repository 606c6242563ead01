"""How a worker keeps ``job_tasks`` true beyond what the broker does.

The transport claims a row, and acks (completed) or rejects it (retry with
backoff, or failed). In between, the worker app records three things, on a
connection of its own per process:

- when the task starts executing: ``processing`` (task_prerun);
- when it raises: the exception text in ``error`` (task_failure), which the
  broker's ``fail_task`` keeps when it retries or fails the row;
- when a job task skips its work because its job was cancelled after the
  message was claimed: ``cancelled`` (:func:`job_to_work_on`), which the ack
  then leaves as it is.

Each write is fenced like an ack: it names the row and lease token of the
delivery (its delivery tag, ``task.request.properties['delivery_tag']``), so
a worker whose lease expired, and whose message another worker now holds,
changes nothing and logs ``lease lost``. A task run from no ``job_tasks`` row
(an eager call, another broker, a transient queue) records nothing.
Bookkeeping never stops a task: if the database write fails it is logged.
"""

from __future__ import annotations

import logging
import threading
import uuid

import psycopg
from celery import signals
from celery.app.task import Context

from pg_broker import forking
from pg_broker.database import connect, database_url
from pg_broker.jobs import Job, cancel_held_task, get_job
from pg_broker.migrate import ensure_migrated
from pg_broker.queries import queries
from pg_broker.states import JobStatus
from pg_broker.transport.messages import held_row

log = logging.getLogger(__name__)

ERROR_LIMIT = 4000  # characters of an exception kept in job_tasks.error

_local = threading.local()


def connection() -> psycopg.Connection:
    """This process's (and thread's) autocommit connection, opened on first use."""
    conn = getattr(_local, "conn", None)
    if conn is not None and not conn.closed and not conn.broken:
        return conn
    url = database_url()
    ensure_migrated(url)
    conn = _local.conn = connect(url, autocommit=True)
    return conn


@forking.on_fork
def _forget_connection() -> None:
    """In a forked child (a prefork pool's process): the connection the
    forking thread held is the parent's; the child opens its own."""
    forking.disown(getattr(_local, "conn", None))
    _local.conn = None


def task_error_text(exception: BaseException) -> str:
    return f"{type(exception).__name__}: {exception}"[:ERROR_LIMIT]


def held_message(request: Context, task_id: str | None = None) -> tuple[int, uuid.UUID] | None:
    """The ``job_tasks`` row (id, lease token) the running task was delivered
    from, read from its delivery tag; None when it came from no such row, or
    when ``request`` is not that of ``task_id``."""
    if task_id is not None and request.id != task_id:
        return None
    return held_row((request.properties or {}).get("delivery_tag"))


def _lease_lost(held: tuple[int, uuid.UUID], action: str) -> None:
    log.warning(
        "lease lost: job_tasks row %s is no longer held by lease %s (it expired and the "
        "message moved on); %s refused", held[0], held[1], action,
    )


def _record(statement: str, held: tuple[int, uuid.UUID], action: str, **params: str) -> None:
    """Run a fenced bookkeeping ``statement`` for the held row."""
    try:
        changed = connection().execute(
            statement, {"id": held[0], "lease_token": held[1], **params}
        ).rowcount
    except psycopg.Error as exc:
        log.warning("could not %s: %s", action, exc)
        return
    if not changed:
        _lease_lost(held, action)


@signals.task_prerun.connect
def _mark_processing(task_id: str, task, **kwargs) -> None:
    held = held_message(task.request, task_id)
    if held is not None:
        _record(queries["mark_task_processing"], held, f"marking task {task_id} processing")


@signals.task_failure.connect
def _record_error(sender, task_id: str, exception: BaseException, **kwargs) -> None:
    # Celery's worker sends this signal for a hard time limit without the
    # task's request: no lease to fence with, so nothing is recorded.
    held = held_message(sender.request, task_id)
    if held is not None:
        _record(queries["record_task_error"], held, f"recording the error of task {task_id}",
                error=task_error_text(exception))


def job_to_work_on(job_id: str, request: Context) -> Job | None:
    """The job a job task (running under ``request``, its ``self.request``)
    belongs to, or None when the task should do nothing: the job was
    cancelled after this message was claimed (the task's row is then
    cancelled, not completed by the ack that follows), or deleted."""
    conn = connection()
    job = get_job(conn, job_id, details=False)
    if job is None:
        log.warning("task %s: job %s no longer exists; nothing to do", request.id, job_id)
    elif job.status == JobStatus.CANCELLED:
        log.info("task %s: job %s was cancelled; skipping", request.id, job_id)
        held = held_message(request)
        if held is not None:
            try:
                if not cancel_held_task(conn, held):
                    _lease_lost(held, f"cancelling task {request.id}")
            except psycopg.Error as exc:
                log.warning("could not mark task %s cancelled: %s", request.id, exc)
        return None
    return job
