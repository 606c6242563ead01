"""What a worker writes into the ``job_tasks`` row of the task it runs,
beside the broker's own settlements, and the connection it writes on.

The transport settles a row (ack, requeue, fail) but never sees why a task
failed: Celery catches the exception in the process that ran it (a prefork
pool's child) and only tells the broker to reject the message. So every
Celery app whose broker is ``pgbroker://`` gets a ``task_failure`` handler,
connected when the transport is imported (which a worker does before its
pool forks): the exception text goes into ``error``, which ``fail_task``
keeps when it retries or fails the row, and ``pg-broker dead list`` shows.
Only a task acked late still holds its row when it fails; one acked early
was settled before it ran (its row is ``completed``, never a dead letter),
so nothing is written for it.

Each write is fenced like an ack: it names the row and lease token of the
delivery (its delivery tag, ``task.request.properties['delivery_tag']``), so
a worker whose lease expired, and whose message another worker now holds,
changes nothing and logs ``lease lost``. A task run from no ``job_tasks`` row
(an eager call, another broker, a transient queue) records nothing.
Bookkeeping never stops a task: if the database write fails it is logged.
The worker app (``tasks.lifecycle``) writes more through the same helpers.
"""

from __future__ import annotations

import logging
import threading
import uuid

import psycopg
from celery import signals
from celery.app.task import Context

from pg_broker import forking
from pg_broker.database import connect
from pg_broker.migrate import ensure_migrated
from pg_broker.queries import queries
from pg_broker.transport.messages import held_row
from pg_broker.urls import SCHEME, libpq_url

log = logging.getLogger(__name__)

ERROR_LIMIT = 4000  # characters of an exception kept in job_tasks.error

_local = threading.local()


def connection(url: str) -> psycopg.Connection:
    """This process's (and thread's) autocommit connection to ``url``, opened
    on first use."""
    conns = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    conn = conns.get(url)
    if conn is not None and not conn.closed and not conn.broken:
        return conn
    ensure_migrated(url)
    conn = conns[url] = connect(url, autocommit=True)
    return conn


@forking.on_fork
def _forget_connections() -> None:
    """In a forked child (a prefork pool's process): the connections the
    forking thread held are the parent's; the child opens its own."""
    for conn in (getattr(_local, "conns", None) or {}).values():
        forking.disown(conn)
    _local.conns = {}


def task_error_text(exception: BaseException) -> str:
    return f"{type(exception).__name__}: {exception}"[:ERROR_LIMIT]


def held_message(request: Context, task_id: str | None = None) -> tuple[int, uuid.UUID] | None:
    """The ``job_tasks`` row (id, lease token) the running task was delivered
    from, read from its delivery tag; None when it came from no such row, or
    when ``request`` is not that of ``task_id``."""
    if task_id is not None and request.id != task_id:
        return None
    return held_row((request.properties or {}).get("delivery_tag"))


def lease_lost(held: tuple[int, uuid.UUID], action: str) -> None:
    log.warning(
        "lease lost: job_tasks row %s is no longer held by lease %s (it expired and the "
        "message moved on); %s refused", held[0], held[1], action,
    )


def record(url: str, statement: str, held: tuple[int, uuid.UUID], action: str,
           **params: str) -> None:
    """Run a fenced bookkeeping ``statement`` for the held row."""
    try:
        changed = connection(url).execute(
            statement, {"id": held[0], "lease_token": held[1], **params}
        ).rowcount
    except psycopg.Error as exc:
        log.warning("could not %s: %s", action, exc)
        return
    if not changed:
        lease_lost(held, action)


def broker_database(task) -> str | None:
    """The database of the task's app's broker, when it is ``pgbroker://``."""
    url = task.app.conf.broker_url
    if isinstance(url, str) and url.startswith(f"{SCHEME}://"):
        return libpq_url(url)
    return None


@signals.task_failure.connect
def _record_error(sender, task_id: str, exception: BaseException, **kwargs) -> None:
    # Celery's worker sends this signal for a hard time limit without the
    # task's request: no lease to fence with, so nothing is recorded.
    if sender is None or not sender.acks_late:
        return
    held = held_message(sender.request, task_id)
    url = broker_database(sender) if held is not None else None
    if url is not None:
        record(url, queries["record_task_error"], held, f"recording the error of task {task_id}",
               error=task_error_text(exception))
