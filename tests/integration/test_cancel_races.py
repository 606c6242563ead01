"""Job cancels racing the broker's purge, maintenance sweep and claims on real
PostgreSQL: no statement may deadlock, and every job's counters stay true."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import psycopg
import pytest
from taskrows import ack_and_claim, add_job, claim

from pg_broker.jobs import cancel_job
from pg_broker.queries import queries

QUEUES = ("race-a", "race-b")
JOBS = 6
TASKS_PER_JOB = 60
PLAIN_PER_QUEUE = 60
ROUNDS = 40


def _fill(db: psycopg.Connection, rng: random.Random) -> list[str]:
    """Jobs whose tasks lie in both queues in no id, priority or sequence
    order; plain messages beside them; some tasks held with expired leases,
    some past their TTL; race-a expired (unused past its x-expires), so the
    maintenance drops it and its plain messages while the purge does too."""
    jobs = [add_job(db) for _ in range(JOBS)]
    rows = [(q, j) for j in jobs for q in QUEUES for _ in range(TASKS_PER_JOB // 2)]
    rows += [(q, None) for q in QUEUES for _ in range(PLAIN_PER_QUEUE)]
    rng.shuffle(rows)
    db.execute(
        "INSERT INTO job_tasks (queue, job_id, payload, priority, sequence)"
        " SELECT q, j, '{}', (random() * 9)::smallint, (random() * 1e9)::bigint"
        " FROM unnest(%s::text[], %s::uuid[]) AS r(q, j)",
        ([q for q, _ in rows], [j for _, j in rows]),
    )
    db.execute("UPDATE job_tasks SET expires_at = now() - interval '1 second'"
               " WHERE id IN (SELECT id FROM job_tasks WHERE status = 'pending'"
               " ORDER BY random() LIMIT 30)")
    stale = [row["id"] for row in claim(db, "gone", QUEUES, batch=20, lease="-1 second")]
    # Half of them on their last delivery: the watchdog kills those (a counter
    # of their job changes) and returns the rest (no counter changes).
    db.execute("UPDATE job_tasks SET max_attempts = 1 WHERE id = ANY (%s)", (stale[::2],))
    db.execute(
        "INSERT INTO broker_queues (name, expires, last_used_at)"
        " VALUES ('race-a', interval '1 second', now() - interval '1 minute'), ('race-b', NULL, now())"
    )
    return jobs


def _run_at_once(database_url: str, actions: list[Callable[[psycopg.Connection], object]]) -> list:
    """Runs each action in a thread of its own, on a connection of its own,
    all released at the same instant; returns (action, exception) of those
    that raised."""
    errors: list = []
    start = threading.Barrier(len(actions))

    def run(action: Callable[[psycopg.Connection], object]) -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                start.wait()
                action(conn)
        except Exception as exc:
            errors.append((action.__qualname__, exc))

    threads = [threading.Thread(target=run, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return errors


def _work(conn: psycopg.Connection) -> None:
    """A worker: claims batches and acks each batch with its next claim."""
    acks: list = []
    for queue in QUEUES * 2:
        claimed, _, token = ack_and_claim(conn, acks, queue, limit=10, worker="racer")
        acks = [(row_id, token) for row_id in claimed]
    ack_and_claim(conn, acks)


def _counters_are_true(db: psycopg.Connection) -> list[tuple]:
    """Jobs whose counters disagree with their task rows (none, when true)."""
    return db.execute(
        """SELECT j.id, j.total_tasks, j.completed_tasks, j.failed_tasks, j.cancelled_tasks,
                  t.total, t.completed, t.failed, t.cancelled
             FROM jobs j
             JOIN (SELECT job_id, count(*) AS total,
                          count(*) FILTER (WHERE status = 'completed') AS completed,
                          count(*) FILTER (WHERE status IN ('failed', 'dead')) AS failed,
                          count(*) FILTER (WHERE status = 'cancelled') AS cancelled
                     FROM job_tasks GROUP BY job_id) t ON t.job_id = j.id
            WHERE (j.total_tasks, j.completed_tasks, j.failed_tasks, j.cancelled_tasks)
                  IS DISTINCT FROM (t.total::int, t.completed::int, t.failed::int,
                                    t.cancelled::int)"""
    ).fetchall()


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_cancels_purges_and_maintenance_at_the_same_instant_never_deadlock(
    db: psycopg.Connection, database_url: str, round_: int
) -> None:
    rng = random.Random(round_)
    jobs = _fill(db, rng)

    def cancel_all(conn: psycopg.Connection) -> None:
        for job_id in rng.sample(jobs, len(jobs)):
            cancel_job(conn, job_id)

    def purge(queues: tuple[str, ...]) -> Callable[[psycopg.Connection], None]:
        def run(conn: psycopg.Connection) -> None:
            for queue in queues:
                conn.execute(queries["transport_purge"], {"name": queue})
        return run

    def maintain(conn: psycopg.Connection) -> None:
        conn.execute(queries["transport_maintain"])

    errors = _run_at_once(database_url, [
        cancel_all, cancel_all, purge(QUEUES), purge(QUEUES[::-1]), maintain, maintain, _work,
    ])
    assert not errors, errors
    assert _counters_are_true(db) == []
