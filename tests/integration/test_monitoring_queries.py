"""The monitoring statements `pg-broker status` and `reclaim` run (named in
pg_broker/sql/queries.sql), run on rows set up for the purpose: each returns
what it says it does, and each is the statement of the product description."""

from __future__ import annotations

from datetime import timedelta

import psycopg
from taskrows import add_job, add_tasks, claim

from pg_broker.queries import queries

# The product description's statements, verbatim: the named ones must say the same.
ACTIVE_JOBS = "SELECT status, COUNT(*) FROM jobs GROUP BY status;"
TASK_BACKLOG = "SELECT task_type, status, COUNT(*) FROM job_tasks GROUP BY task_type, status;"
WORKER_HEALTH = """SELECT worker_id, COUNT(*) AS active_tasks, MAX(last_heartbeat) AS last_seen
  FROM job_tasks WHERE status IN ('claimed', 'processing') GROUP BY worker_id;"""
STALE_TASKS = """SELECT COUNT(*) FROM job_tasks WHERE status IN ('claimed', 'processing')
  AND last_heartbeat < (now() - INTERVAL '10 minutes');"""
RECLAIM = "SELECT reclaim_stale_tasks();"
# The product's way to peek at the next tasks; no code of ours runs it (the
# transport claims with transport_claim), so it is checked as written here.
NEXT_PENDING = ("SELECT * FROM job_tasks WHERE status = 'pending' ORDER BY sequence LIMIT 5"
                " FOR UPDATE SKIP LOCKED;")


def _finish_one(conn: psycopg.Connection, queue: str = "default") -> None:
    (row,) = claim(conn, queues=[queue])
    conn.execute("SELECT complete_task(%s, %s)", (row["id"], row["lease_token"]))


def test_active_jobs_counts_jobs_by_status(db: psycopg.Connection) -> None:
    add_job(db)
    add_job(db)
    started = add_job(db)
    add_tasks(db, 2, queue="started", job_id=started)
    claim(db, queues=["started"])
    done = add_job(db)
    add_tasks(db, 1, queue="done", job_id=done)
    _finish_one(db, "done")

    assert dict(db.execute(queries["jobs_by_status"]).fetchall()) == {
        "pending": 2, "processing": 1, "completed": 1}


def test_task_backlog_counts_tasks_by_type_and_status(db: psycopg.Connection) -> None:
    add_tasks(db, 3, task_type="tasks.audio.synthesize_chapter")
    add_tasks(db, 1, task_type="tasks.pdf.render_package")
    _finish_one(db)  # the first audio task
    claim(db)        # the second one

    assert sorted(db.execute(queries["backlog_by_task_type"]).fetchall()) == [
        ("tasks.audio.synthesize_chapter", "claimed", 1),
        ("tasks.audio.synthesize_chapter", "completed", 1),
        ("tasks.audio.synthesize_chapter", "pending", 1),
        ("tasks.pdf.render_package", "pending", 1),
    ]


def test_worker_health_lists_what_each_worker_holds_and_its_last_heartbeat(
    db: psycopg.Connection,
) -> None:
    add_tasks(db, 5)
    claim(db, worker="worker-a", batch=2)
    claim(db, worker="worker-b", batch=1)
    _finish_one(db)  # finished work is not active
    db.execute("UPDATE job_tasks SET last_heartbeat = now() - interval '3 minutes'"
               " WHERE worker_id = 'worker-a'")
    (a_beat,) = db.execute("SELECT heartbeat_task('worker-a', NULL,"
                           " (SELECT min(id) FROM job_tasks WHERE worker_id = 'worker-a'))"
                           ).fetchone()
    assert a_beat == 1

    health = {w: (n, seen) for w, n, seen in db.execute(queries["worker_health"])}
    assert {w: n for w, (n, _) in health.items()} == {"worker-a": 2, "worker-b": 1}
    (now,) = db.execute("SELECT now()").fetchone()
    assert now - health["worker-a"][1] < timedelta(minutes=1), "MAX takes the latest heartbeat"


def test_stale_tasks_counts_held_tasks_silent_for_ten_minutes(db: psycopg.Connection) -> None:
    add_tasks(db, 4)
    claim(db, worker="hung", batch=2)
    claim(db, worker="slow", batch=1)
    db.execute("UPDATE job_tasks SET last_heartbeat = now() - interval '11 minutes'"
               " WHERE worker_id = 'hung'")
    db.execute("UPDATE job_tasks SET last_heartbeat = now() - interval '9 minutes'"
               " WHERE worker_id = 'slow'")
    db.execute("UPDATE job_tasks SET last_heartbeat = now() - interval '1 hour'"
               " WHERE status = 'pending'")

    assert db.execute(queries["stale_tasks"]).fetchone() == (2,)


def test_reclaim_stale_tasks_returns_how_many_leases_it_took_back(db: psycopg.Connection) -> None:
    add_tasks(db, 3)
    claim(db, worker="gone", batch=2)
    db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 minute'"
               " WHERE worker_id = 'gone'")

    assert db.execute(queries["reclaim_stale_tasks"]).fetchone() == (2,)
    assert db.execute("SELECT count(*) FROM job_tasks WHERE status = 'pending'").fetchone() == (3,)
    assert db.execute(queries["reclaim_stale_tasks"]).fetchone() == (0,)


def test_next_pending_tasks_are_locked_so_two_readers_get_different_ones(
    db: psycopg.Connection, database_url: str
) -> None:
    ids = add_tasks(db, 12)
    claim(db)  # the first is held: not pending
    with psycopg.connect(database_url) as first, psycopg.connect(database_url) as second:
        mine = [r[0] for r in first.execute(NEXT_PENDING)]
        theirs = [r[0] for r in second.execute(NEXT_PENDING)]
        first.rollback()
        second.rollback()
    assert mine == ids[1:6]
    assert theirs == ids[6:11]


def test_the_named_statements_are_the_product_descriptions() -> None:
    def normalized(text: str) -> str:
        return " ".join(text.replace(";", "").split())

    assert normalized(queries["jobs_by_status"]) == normalized(ACTIVE_JOBS)
    assert normalized(queries["backlog_by_task_type"]) == normalized(TASK_BACKLOG)
    assert normalized(queries["worker_health"]) == normalized(WORKER_HEALTH)
    assert normalized(queries["stale_tasks"]) == normalized(STALE_TASKS)
    assert normalized(queries["reclaim_stale_tasks"]) == normalized(RECLAIM)
