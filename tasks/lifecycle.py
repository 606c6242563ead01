"""How a worker keeps ``job_tasks`` true beyond what the broker does.

The transport claims a row, and acks (completed) or rejects it (retry with
backoff, or failed); the library records the exception text of any failed
task (:mod:`pg_broker.bookkeeping`). In between, the worker app records two
things more, on the library's bookkeeping connection, fenced by the
delivery's lease token as that is:

- when the task starts executing: ``processing`` (task_prerun);
- when a job task skips its work because its job was cancelled after the
  message was claimed: ``cancelled`` (:func:`job_to_work_on`), which the ack
  then leaves as it is.
"""

from __future__ import annotations

import logging

import psycopg
from celery import signals
from celery.app.task import Context

from pg_broker import bookkeeping
from pg_broker.bookkeeping import held_message, lease_lost
from pg_broker.database import database_url
from pg_broker.jobs import Job, cancel_held_task, get_job
from pg_broker.queries import queries
from pg_broker.states import JobStatus

log = logging.getLogger(__name__)


def connection() -> psycopg.Connection:
    """This process's (and thread's) autocommit connection to the app's database."""
    return bookkeeping.connection(database_url())


@signals.task_prerun.connect
def _mark_processing(task_id: str, task, **kwargs) -> None:
    held = held_message(task.request, task_id)
    if held is not None:
        bookkeeping.record(database_url(), queries["mark_task_processing"], held,
                           f"marking task {task_id} processing")


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
                    lease_lost(held, f"cancelling task {request.id}")
            except psycopg.Error as exc:
                log.warning("could not mark task %s cancelled: %s", request.id, exc)
        return None
    return job
