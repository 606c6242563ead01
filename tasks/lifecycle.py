"""How a worker keeps ``job_tasks`` true beyond what the broker does.

The transport claims a row, and acks (completed) or rejects it (retry with
backoff, or failed). In between, the worker app records three things by Celery
task id, on a connection of its own per process:

- when the task starts executing: ``processing`` (task_prerun);
- when it raises: the exception text in ``error`` (task_failure), which the
  broker's ``fail_task`` keeps when it retries or fails the row;
- when a job task skips its work because its job was cancelled after the
  message was claimed: ``cancelled`` (:func:`job_to_work_on`), which the ack
  then leaves as it is.

Bookkeeping never stops a task: if the database write fails it is logged.
"""

from __future__ import annotations

import logging
import os
import threading

import psycopg
from celery import signals

from pg_broker.database import connect, database_url
from pg_broker.jobs import Job, cancel_held_task, get_job
from pg_broker.migrate import ensure_migrated
from pg_broker.queries import queries
from pg_broker.states import JobStatus

log = logging.getLogger(__name__)

ERROR_LIMIT = 4000  # characters of an exception kept in job_tasks.error

_local = threading.local()
# Connections inherited across fork: kept referenced, never closed or
# finalised in the child, because that would end the parent's session.
_inherited: list[psycopg.Connection] = []


def connection() -> psycopg.Connection:
    """This process's (and thread's) autocommit connection, opened on first use."""
    held = getattr(_local, "held", None)
    if held is not None:
        pid, conn = held
        if pid != os.getpid():
            _inherited.append(conn)
        elif not conn.closed and not conn.broken:
            return conn
    url = database_url()
    ensure_migrated(url)
    conn = connect(url, autocommit=True)
    _local.held = (os.getpid(), conn)
    return conn


def task_error_text(exception: BaseException) -> str:
    return f"{type(exception).__name__}: {exception}"[:ERROR_LIMIT]


@signals.task_prerun.connect
def _mark_processing(task_id: str, **kwargs) -> None:
    try:
        connection().execute(queries["mark_task_processing"], {"task_id": task_id})
    except psycopg.Error as exc:
        log.warning("could not mark task %s processing: %s", task_id, exc)


@signals.task_failure.connect
def _record_error(task_id: str, exception: BaseException, **kwargs) -> None:
    try:
        connection().execute(
            queries["record_task_error"], {"task_id": task_id, "error": task_error_text(exception)}
        )
    except psycopg.Error as exc:
        log.warning("could not record the error of task %s: %s", task_id, exc)


def job_to_work_on(job_id: str, task_id: str) -> Job | None:
    """The job a job task belongs to, or None when the task should do nothing:
    the job was cancelled after this message was claimed (the task's row is
    then cancelled, not completed by the ack that follows), or deleted."""
    conn = connection()
    job = get_job(conn, job_id, details=False)
    if job is None:
        log.warning("task %s: job %s no longer exists; nothing to do", task_id, job_id)
    elif job.status == JobStatus.CANCELLED:
        log.info("task %s: job %s was cancelled; skipping", task_id, job_id)
        try:
            cancel_held_task(conn, task_id)
        except psycopg.Error as exc:
            log.warning("could not mark task %s cancelled: %s", task_id, exc)
        return None
    return job
