"""Background duties, each a small named unit with one ``run(conn)``.

- :class:`Watchdog` returns tasks whose lease expired (their worker died or
  hung) to pending, or to dead after their last attempt.
- :class:`Retention` deletes finished task rows past their window (plain
  messages completed, plain ones failed or dead, a job's rows after the job),
  in small batches, so the hot table stays small; jobs keep their counters
  and artifacts. With ``partitioned`` (``partitioned_history``) a finished
  job's completed and cancelled rows move instead to ``job_tasks_history``,
  partitioned by day, whose old days are dropped, not deleted
  (migrations/core/180). Every worker runs it too, one at a time (the transport's
  lease thread, :mod:`pg_broker.transport.leases`), with its transport
  options' windows.
- :class:`ResultExpiry` deletes results (``pgbroker://`` result backend)
  past their ``result_expires``; reads never see them, this frees the space.
- :func:`dead_tasks` / :func:`retry_dead_tasks`: the dead-letter view and
  re-queueing from it.

celery beat runs the first three (``tasks.maintenance``); the ``pg-broker`` CLI
runs all of them by hand, and Celery's own ``celery.backend_cleanup`` task runs
:class:`ResultExpiry` through the backend's ``cleanup()``. Each is safe to run
from many processes at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pg_broker.queries import queries

log = logging.getLogger(__name__)

RETENTION_VARIABLE = "PG_BROKER_RETENTION"
DEFAULT_RETENTION = "7 days"
PARTITIONED_VARIABLE = "PG_BROKER_PARTITIONED_HISTORY"


@dataclass
class Watchdog:
    """Expired leases back to pending (or dead): ``reclaim_stale_tasks()``."""

    name: str = "watchdog"

    def run(self, conn: psycopg.Connection) -> int:
        (reclaimed,) = conn.execute(queries["reclaim_stale_tasks"]).fetchone()
        if reclaimed:
            log.warning("watchdog: %d task(s) had expired leases and were reclaimed", reclaimed)
        return reclaimed


def default_retention() -> str:
    return os.environ.get(RETENTION_VARIABLE, "").strip() or DEFAULT_RETENTION


def default_partitioned() -> bool:
    """PG_BROKER_PARTITIONED_HISTORY: 1/true/yes/on turns the partitioned history on."""
    return os.environ.get(PARTITIONED_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


Window = str | timedelta  # a PostgreSQL interval ('7 days') or a timedelta


@dataclass
class Retention:
    """Deletes finished task rows past their window, one batch of each kind
    per transaction, so no long lock and no huge WAL burst:

    - ``completed``: plain messages (no job) that completed;
    - ``failed``: plain messages that failed, died or were cancelled;
    - ``job``: a job's finished rows, once the job itself finished longer ago
      (rows of an unfinished job stay; the job keeps its counters).

    Pending, delayed (ETA) and held rows are never finished, so never deleted.
    ``lock``, an advisory lock key, makes a run give way to another session
    running it (workers take turns, see :mod:`pg_broker.transport.leases`).

    ``partitioned``: a finished job's completed and cancelled rows move to
    ``job_tasks_history`` as soon as the job finished (``move_to_history``),
    kept until the day partition of ``job`` after the job's end is dropped;
    failed and dead rows stay for ``dead retry`` and leave by DELETE. Without
    it a run still drops history partitions whose day is over (left from a
    time it was on).
    """

    completed: Window = field(default_factory=default_retention)
    failed: Window = field(default_factory=default_retention)
    job: Window = field(default_factory=default_retention)
    batch_size: int = 1000
    lock: int | None = None
    partitioned: bool = field(default_factory=default_partitioned)
    name: str = "retention"

    @classmethod
    def older_than(cls, age: Window, **kwargs: Any) -> Retention:
        """Every kind of finished row older than ``age``."""
        return cls(completed=age, failed=age, job=age, **kwargs)

    def params(self) -> dict[str, Any]:
        """The parameters of ``delete_finished_tasks``."""
        return {"keep_completed": self.completed, "keep_failed": self.failed,
                "keep_job": self.job, "batch": self.batch_size, "lock": self.lock}

    def history_params(self) -> dict[str, Any]:
        """The parameters of ``move_to_history`` (batch 0: drop old days only)."""
        return {"keep_job": self.job, "batch": self.batch_size if self.partitioned else 0,
                "lock": self.lock}

    def full(self, deleted: Sequence[int | None]) -> bool:
        """Whether a batch's counts say more rows are waiting."""
        return any(count == self.batch_size for count in deleted)

    def run(self, conn: psycopg.Connection) -> int:
        """Deletes (and moves) until no kind has a full batch left; rows removed
        from job_tasks."""
        removed = dropped = 0
        while True:
            with conn.transaction():
                batch = conn.execute(queries["delete_finished_tasks"], self.params()).fetchone()
                moved = conn.execute(queries["move_to_history"],
                                     self.history_params()).fetchone()
            if batch[0] is None:  # another session holds the lock: it runs
                break
            removed += sum(batch) + (moved[0] or 0)
            dropped += moved[1] or 0
            if not self.full([*batch, moved[0]]):
                break
        if removed or dropped:
            log.info("retention: %d finished task row(s) left job_tasks, %d history "
                     "partition(s) dropped (windows: completed %s, failed %s, job %s%s)",
                     removed, dropped, self.completed, self.failed, self.job,
                     "; partitioned history" if self.partitioned else "")
        return removed


@dataclass
class ResultExpiry:
    """Deletes results and chord counters past their expiry
    (``result_expires``, ``result_chord_expires``), one batch per statement;
    rows being written at that moment wait for the next run. Also the waiter
    records (``task_result_waiters``) of sessions that ended: each would
    cost a notification to nobody if its key were written again."""

    batch_size: int = 1000
    name: str = "result expiry"

    def run(self, conn: psycopg.Connection) -> int:
        deleted = 0
        while True:
            results, chords = conn.execute(
                queries["result_cleanup"], {"batch": self.batch_size}
            ).fetchone()
            deleted += results + chords
            if results < self.batch_size and chords < self.batch_size:
                break
        if deleted:
            log.info("result expiry: deleted %d expired result(s) and chord counter(s)", deleted)
        (ended,) = conn.execute(queries["result_ended_waiters"]).fetchone()
        if ended:
            log.info("result expiry: deleted %d record(s) of ended waiting sessions", ended)
        return deleted


def dead_tasks(conn: psycopg.Connection, limit: int = 100) -> list[dict[str, Any]]:
    """Dead letters: failed and dead tasks, newest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(queries["dead_tasks"], {"limit": limit}).fetchall()


def not_dead_letters(conn: psycopg.Connection, ids: Sequence[str]) -> list[str]:
    """Those of ``ids`` (row ids or Celery task ids) that name no dead or failed task."""
    return [given for (given,) in conn.execute(queries["not_dead_letters"], {"ids": list(ids)})]


def retry_dead_tasks(conn: psycopg.Connection, ids: Sequence[str] | None = None) -> int:
    """Re-queue dead/failed tasks (those with the given row ids or Celery task
    ids, or all when ``ids`` is None) with fresh attempts, and wake the workers
    of their queues (the transport's NOTIFY channel). Returns how many."""
    with conn.transaction():
        rows = conn.execute(
            queries["retry_dead_tasks"], {"ids": list(ids) if ids is not None else None}
        ).fetchall()
    log.info("re-queued %d dead or failed task(s)", len(rows))
    return len(rows)
