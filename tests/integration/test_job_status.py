"""jobs.status, counters, progress and timestamps kept true by the triggers of
the core schema (migrations/core/100) as a job's tasks move (the rule is written there)."""

from __future__ import annotations

import threading
from decimal import Decimal

import psycopg
from taskrows import add_job, add_tasks, claim, job, task


def _finish(conn: psycopg.Connection, row: dict, error: str | None = None) -> None:
    if error is None:
        assert conn.execute("SELECT complete_task(%s, %s)",
                            (row["id"], row["lease_token"])).fetchone() == (True,)
    else:
        conn.execute("SELECT fail_task(%s, %s, %s)", (row["id"], row["lease_token"], error))


def test_sixteen_task_job_with_one_failing_task_ends_failed_with_its_error(
    db: psycopg.Connection,
) -> None:
    job_id = add_job(db)
    add_tasks(db, 16, job_id=job_id, max_attempts=2)
    created = job(db, job_id)
    assert (created["status"], created["total_tasks"], created["progress"]) == ("pending", 16, 0)
    assert created["started_at"] is None

    rows = claim(db, batch=8)
    started = job(db, job_id)
    assert started["status"] == "processing"
    assert started["started_at"] is not None
    for row in rows:
        _finish(db, row)
    halfway = job(db, job_id)
    assert (halfway["completed_tasks"], halfway["progress"]) == (8, Decimal("50.00"))
    assert halfway["status"] == "processing"
    assert halfway["completed_at"] is None

    rows = claim(db, batch=8)
    flaky, rest = rows[0], rows[1:]
    _finish(db, flaky, error="TimeoutError: first attempt")
    retrying = job(db, job_id)
    assert (retrying["failed_tasks"], retrying["error"]) == (0, None), "a retry is no failure"
    for row in rest:
        _finish(db, row)
    almost = job(db, job_id)
    assert (almost["completed_tasks"], almost["progress"]) == (15, Decimal("93.75"))
    assert almost["status"] == "processing"

    db.execute("UPDATE job_tasks SET visible_at = now() WHERE id = %s", (flaky["id"],))
    (again,) = claim(db)
    _finish(db, again, error="TimeoutError: second attempt")
    assert task(db, flaky["id"])["status"] == "failed"

    done = job(db, job_id)
    assert done["status"] == "failed"
    assert (done["total_tasks"], done["completed_tasks"], done["failed_tasks"]) == (16, 15, 1)
    assert done["progress"] == Decimal("100.00")
    assert done["error"] == "TimeoutError: second attempt"
    assert done["completed_at"] is not None
    assert done["started_at"] == started["started_at"]
    assert db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall() == [
        ("failed", 1)
    ]


def test_job_completes_when_every_task_completed(db: psycopg.Connection) -> None:
    job_id = add_job(db)
    add_tasks(db, 16, job_id=job_id)
    for row in claim(db, batch=16):
        _finish(db, row)
    done = job(db, job_id)
    assert (done["status"], done["completed_tasks"], done["progress"]) == (
        "completed", 16, Decimal("100.00"))
    assert done["error"] is None and done["completed_at"] is not None


def test_a_dead_task_fails_its_job_once_nothing_else_can_run(db: psycopg.Connection) -> None:
    job_id = add_job(db)
    (lost, ok) = add_tasks(db, 2, job_id=job_id, max_attempts=1)
    rows = claim(db, batch=2)
    _finish(db, next(r for r in rows if r["id"] == ok))
    db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
               (lost,))
    db.execute("SELECT reclaim_stale_tasks()")
    failed = job(db, job_id)
    assert (failed["status"], failed["failed_tasks"], failed["completed_tasks"]) == ("failed", 1, 1)
    assert failed["error"].startswith("lease expired on worker worker-1")


def test_a_finished_job_given_another_task_is_unfinished_again(db: psycopg.Connection) -> None:
    # Found by tests/integration/test_task_state_machine.py (fixed by migration core/103, legacy 008): the
    # job went back to processing but kept its completed_at.
    job_id = add_job(db)
    add_tasks(db, 1, job_id=job_id, max_attempts=1)
    (row,) = claim(db)
    db.execute("SELECT fail_task(%s, %s, 'boom')", (row["id"], row["lease_token"]))
    assert job(db, job_id)["status"] == "failed" and job(db, job_id)["completed_at"] is not None
    add_tasks(db, 1, job_id=job_id)
    reopened = job(db, job_id)
    assert (reopened["status"], reopened["total_tasks"]) == ("processing", 2)
    assert reopened["completed_at"] is None


def test_a_cancelled_job_stays_cancelled_while_its_tasks_finish(db: psycopg.Connection) -> None:
    job_id = add_job(db)
    add_tasks(db, 4, job_id=job_id)
    rows = claim(db, batch=2)
    db.execute("UPDATE jobs SET status = 'cancelled' WHERE id = %s", (job_id,))
    db.execute("UPDATE job_tasks SET status = 'cancelled' WHERE job_id = %s AND status = 'pending'",
               (job_id,))
    for row in rows:
        _finish(db, row)
    cancelled = job(db, job_id)
    assert cancelled["status"] == "cancelled"
    assert (cancelled["completed_tasks"], cancelled["cancelled_tasks"]) == (2, 2)
    assert cancelled["progress"] == Decimal("100.00")


def test_a_job_whose_unstarted_tasks_were_purged_ends_cancelled(db: psycopg.Connection) -> None:
    job_id = add_job(db)
    add_tasks(db, 3, job_id=job_id)
    (row,) = claim(db)
    _finish(db, row)
    db.execute("UPDATE job_tasks SET status = 'cancelled' WHERE job_id = %s AND status = 'pending'",
               (job_id,))
    ended = job(db, job_id)
    assert (ended["status"], ended["completed_tasks"], ended["cancelled_tasks"]) == (
        "cancelled", 1, 2)
    assert ended["completed_at"] is not None


def test_tasks_inserted_in_one_statement_count_once_each(db: psycopg.Connection) -> None:
    first, second = add_job(db), add_job(db)
    db.execute(
        "INSERT INTO job_tasks (queue, payload, job_id)"
        " SELECT 'default', '{}', j FROM unnest(%s::uuid[]) j, generate_series(1, 3)",
        ([first, second],),
    )
    add_tasks(db, 2, job_id=first)
    assert job(db, first)["total_tasks"] == 5
    assert job(db, second)["total_tasks"] == 3


def test_plain_messages_leave_jobs_alone(db: psycopg.Connection) -> None:
    job_id = add_job(db)
    add_tasks(db, 3)
    for row in claim(db, batch=3):
        _finish(db, row)
    assert job(db, job_id)["status"] == "pending"
    assert job(db, job_id)["total_tasks"] == 0


def _work_through(url: str, worker: str, start: threading.Barrier, errors: list) -> None:
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            start.wait()
            while rows := claim(conn, worker, batch=30):
                for row in rows:
                    _finish(conn, row)
    except Exception as exc:
        errors.append(exc)


def test_workers_finishing_tasks_of_many_jobs_at_once_keep_every_counter_true(
    db: psycopg.Connection, database_url: str
) -> None:
    # Each claimed batch holds tasks of many jobs, in no particular order: with
    # row-by-row job updates, concurrent batches deadlocked on the jobs rows.
    db.execute("INSERT INTO jobs (id) SELECT gen_random_uuid() FROM generate_series(1, 40)")
    db.execute(
        "INSERT INTO job_tasks (queue, payload, job_id, sequence)"
        " SELECT 'default', '{}', j.id, (random() * 1e9)::bigint"
        " FROM jobs j, generate_series(1, 25)"
    )
    errors: list = []
    start = threading.Barrier(6)
    threads = [threading.Thread(target=_work_through, args=(database_url, f"w{n}", start, errors))
               for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert db.execute(
        "SELECT status, total_tasks, completed_tasks, progress, count(*) FROM jobs"
        " GROUP BY 1, 2, 3, 4"
    ).fetchall() == [("completed", 25, 25, Decimal("100.00"), 40)]


def test_cancelling_a_job_while_its_first_task_is_claimed_does_not_deadlock(
    db: psycopg.Connection, database_url: str
) -> None:
    # The jobs API cancels the job row, then its pending tasks; a worker's claim
    # locks a task, then would lock the job to mark it started.
    job_id = add_job(db)
    add_tasks(db, 3, job_id=job_id)
    outcome: list = []

    def claim_one() -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as worker:
                outcome.append(claim(worker))
        except Exception as exc:
            outcome.append(exc)

    with psycopg.connect(database_url) as api, \
            psycopg.connect(database_url, autocommit=True) as watcher:
        api.execute("UPDATE jobs SET status = 'cancelled' WHERE id = %s", (job_id,))
        worker = threading.Thread(target=claim_one)
        worker.start()
        for _ in range(3000):  # until the claim is done or waits for a lock
            worker.join(0.01)
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'").fetchone()[0]
            if not worker.is_alive() or waiting:
                break
        api.execute("UPDATE job_tasks SET status = 'cancelled'"
                    " WHERE job_id = %s AND status = 'pending'", (job_id,))
        api.commit()
        worker.join(60)

    (claimed,) = outcome[0]
    assert task(db, claimed["id"])["status"] == "claimed"
    cancelled = job(db, job_id)
    assert (cancelled["status"], cancelled["cancelled_tasks"]) == ("cancelled", 2)
