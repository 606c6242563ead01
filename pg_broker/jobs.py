"""Jobs: one user request as one job of many tasks, and how to read and stop it.

The generic job API of the library: which tasks make up a job, and what
their artifacts are, is the calling app's business (the package job of the
worker app in ``tasks/`` is one). :func:`submit_job` writes the job row and
every task message of the caller's Celery app in ONE transaction of the
caller's connection (the transport's :func:`~pg_broker.transport.enqueue_in`):
if it rolls back, nothing was ever queued; once it commits, workers wake and
each task runs.

Job tasks take the job id as their first argument and carry the Celery headers
``job_id`` and ``user_id``, which the transport copies into ``job_tasks``; the
triggers of the core schema (``migrations/core/``) keep the job's status,
counters and progress true from there. A task that stores a file records it
with :func:`record_artifact`.

Reading goes through :func:`get_job`; with the Supabase layer installed, a
user-facing API reads inside :func:`user_session`, where row-level security
shows a user only their own jobs.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from celery import Celery
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pg_broker.queries import queries
from pg_broker.states import FINAL_JOB_STATES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskInfo:
    id: int
    task_id: str | None
    task_type: str | None
    queue: str
    status: str
    attempts: int
    max_attempts: int
    worker_id: str | None
    error: str | None
    result: Any
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


@dataclass(frozen=True)
class Artifact:
    """A row of ``job_artifacts``: a file a task stored (never its bytes)."""

    id: uuid.UUID
    job_id: uuid.UUID
    task_id: str
    kind: str
    storage_backend: str
    storage_path: str
    content_type: str
    bytes: int
    sha256: str
    duration_seconds: Decimal | None
    metadata: dict[str, Any]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Artifact:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ArtifactLink:
    """An artifact and where its owner can fetch it: the URL the reader's
    ``artifact_url`` (see :func:`get_job`) made, or None."""

    artifact: Artifact
    url: str | None


@dataclass(frozen=True)
class Job:
    id: uuid.UUID
    user_id: uuid.UUID | None
    job_type: str
    title: str | None
    params: dict[str, Any]
    status: str
    total_tasks: int
    completed_tasks: int
    failed_tasks: int
    cancelled_tasks: int
    progress: Decimal
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    tasks: list[TaskInfo] = field(default_factory=list)
    artifacts: list[ArtifactLink] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status in FINAL_JOB_STATES


def submit_job(
    conn: psycopg.Connection,
    *,
    user_id: uuid.UUID | str,
    job_type: str,
    title: str,
    params: dict[str, Any],
    tasks: Sequence[tuple[str, tuple]],
    app: Celery,
) -> uuid.UUID:
    """Insert a job and publish its tasks in one transaction; return the job id.

    ``tasks`` lists ``(task name, extra args)``, sent by ``app`` by name (the
    producer need not import them); each task gets the job id as its first
    argument. Runs inside the caller's transaction if one is open (as a
    savepoint), else in a transaction of its own.
    """
    from pg_broker.transport import enqueue_in

    if not tasks:
        raise ValueError("a job needs at least one task")
    scheme = (app.conf.broker_url or "").split("://", 1)[0]
    if scheme != "pgbroker":
        raise RuntimeError(
            f"jobs need the pgbroker:// broker (this app uses {scheme}://): the job row and its "
            "task messages are written in one database transaction"
        )
    with conn.transaction():
        (job_id,) = conn.execute(queries["insert_job"], {
            "user_id": user_id, "job_type": job_type, "title": title, "params": Jsonb(params),
        }).fetchone()
        headers = {"job_id": str(job_id), "user_id": str(user_id)}
        with enqueue_in(conn):
            for name, args in tasks:
                app.send_task(name, args=(str(job_id), *args), headers=headers)
    log.debug("submitted %s job %s for user %s: %d tasks", job_type, job_id, user_id, len(tasks))
    return job_id


def get_job(
    conn: psycopg.Connection,
    job_id: uuid.UUID | str,
    *,
    details: bool = True,
    artifact_url: Callable[[Artifact], str | None] | None = None,
) -> Job | None:
    """The job with its tasks and artifacts (the row alone when not
    ``details``), or None if it does not exist or the caller's row-level
    security hides it. Each artifact carries ``artifact_url(artifact)``, the
    app's URL for it, when the caller gives that function."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(queries["job_by_id"], {"job_id": job_id}).fetchone()
        if row is None or not details:
            return None if row is None else Job(**row)
        tasks = [TaskInfo(**r) for r in cur.execute(queries["tasks_of_job"], {"job_id": job_id})]
        artifacts = [Artifact.from_row(r)
                     for r in cur.execute(queries["artifacts_of_job"], {"job_id": job_id})]
    links = [ArtifactLink(a, artifact_url(a) if artifact_url else None) for a in artifacts]
    return Job(**row, tasks=tasks, artifacts=links)


def record_artifact(
    conn: psycopg.Connection,
    *,
    job_id: uuid.UUID | str,
    task_id: str,
    user_id: uuid.UUID | str | None,
    kind: str,
    storage_backend: str,
    storage_path: str,
    content_type: str,
    size: int,
    sha256: str,
    duration_seconds: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> Artifact:
    """Record a file a task of the job stored (``kind`` is the app's label);
    a re-run task, storing at the same backend and path, updates its one row."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(queries["upsert_artifact"], {
            "job_id": job_id, "task_id": task_id, "user_id": user_id, "kind": kind,
            "storage_backend": storage_backend, "storage_path": storage_path,
            "content_type": content_type, "bytes": size, "sha256": sha256,
            "duration_seconds": duration_seconds, "metadata": Jsonb(metadata or {}),
        })
        return Artifact.from_row(cur.fetchone())


def cancel_job(conn: psycopg.Connection, job_id: uuid.UUID | str) -> int | None:
    """Cancel a job: its pending tasks become 'cancelled' and are never claimed.

    Tasks a worker already holds are its to stop: a job task checks its job
    before it starts work, and :func:`cancel_held_task` ends one it skips as
    cancelled; one already working finishes. Returns how many tasks were
    cancelled now, or None when the job does not exist or already completed
    or failed.
    """
    with conn.transaction():
        # Tasks first, then the job: the lock order of every writer (task
        # rows, then jobs in the status trigger; see migrations/core/100), so a
        # cancel racing a worker, a purge or the maintenance cannot deadlock.
        cancelled = conn.execute(queries["cancel_pending_tasks"], {"job_id": job_id}).rowcount
        if conn.execute(queries["cancel_job"],
                        {"job_id": job_id, "pending_cancelled": cancelled}).fetchone() is None:
            return None
    log.info("cancelled job %s: %d pending tasks will not run", job_id, cancelled)
    return cancelled


def cancel_held_task(conn: psycopg.Connection, held: tuple[int, uuid.UUID]) -> bool:
    """End a held task of a cancelled job as cancelled when its worker skips
    it instead of running it. ``held`` is the (row id, lease token) of the
    worker's delivery (:func:`pg_broker.transport.messages.held_row` of its
    delivery tag): a worker whose lease expired changes nothing. False when
    the lease no longer holds the row or its job is not cancelled. The row
    keeps its lease token, so the worker's ack settles it without completing
    it."""
    row_id, lease_token = held
    return conn.execute(
        queries["cancel_held_task"], {"id": row_id, "lease_token": lease_token}
    ).rowcount > 0


@contextmanager
def user_session(conn: psycopg.Connection, user_id: uuid.UUID | str) -> Iterator[psycopg.Connection]:
    """A transaction in which ``conn`` acts as the Supabase user ``user_id``:
    the ``authenticated`` role with the user's id as the JWT ``sub`` claim, as
    PostgREST does, so row-level security applies. Every setting is
    transaction-local, and the legacy per-claim ones are set too: a pooled
    connection that kept another user's at session level acts as this one."""
    claims = json.dumps({"sub": str(user_id), "role": "authenticated"})
    with conn.transaction():
        conn.execute(queries["act_as_user"], {"claims": claims, "user_id": str(user_id)})
        yield conn
