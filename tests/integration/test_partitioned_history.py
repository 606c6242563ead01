"""The partitioned history (``partitioned_history``, migrations/core/180): a
finished job's completed and cancelled rows leave job_tasks for
job_tasks_history, partitioned by the day they may go, and old days are
dropped; failed and dead rows stay where ``dead retry`` finds them; nothing
unfinished moves; a job's tasks are read from both; users see only their own
history; workers vacuum job_tasks when autovacuum does not."""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from celery_workers import wait_for
from psycopg import sql
from races import Ledger, claim_ack_bury, race, retry_dead
from taskrows import add_job, add_tasks, job

from pg_broker import jobs
from pg_broker.maintenance import Retention
from pg_broker.transport import leases

pytest_plugins = ["transport_support"]

WEEK = "7 days"


def _history(db: psycopg.Connection) -> dict[int, str]:
    return dict(db.execute("SELECT id, status FROM job_tasks_history").fetchall())


def _partitions(db: psycopg.Connection) -> list[str]:
    return [r[0] for r in db.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'job_tasks_history'::regclass ORDER BY 1")]


def _finish(db: psycopg.Connection, ids: list[int], status: str) -> None:
    db.execute("UPDATE job_tasks SET status = %s, completed_at = now() WHERE id = ANY (%s)",
               (status, ids))


def _job_with(db: psycopg.Connection, user: str | None = None, **counts: int) -> tuple[str, dict]:
    """A job whose tasks are in the given statuses (completed=2, dead=1, ...)."""
    job_id = add_job(db, user)
    ids = {}
    for status, count in counts.items():
        ids[status] = add_tasks(db, count, queue="history", job_id=job_id, user_id=user)
    for status in counts:
        if status != "pending":
            _finish(db, ids[status], status)
    return job_id, ids


def test_a_finished_jobs_completed_rows_move_to_the_day_they_may_go(db):
    job_id, ids = _job_with(db, completed=3, cancelled=1, dead=1)
    counters = job(db, job_id)
    assert counters["status"] == "failed"

    moved = Retention.older_than(WEEK, partitioned=True).run(db)

    assert moved == 4
    assert _history(db) == {**{i: "completed" for i in ids["completed"]},
                            ids["cancelled"][0]: "cancelled"}
    # The dead row stays in job_tasks, where dead retry finds it.
    assert [r[0] for r in db.execute("SELECT id FROM job_tasks")] == ids["dead"]
    purge_day = (job(db, job_id)["completed_at"] + dt.timedelta(days=7)).astimezone(dt.UTC)
    assert _partitions(db) == [f"job_tasks_history_p{purge_day:%Y%m%d}"]
    after = job(db, job_id)
    assert {k: after[k] for k in ("status", "total_tasks", "completed_tasks", "failed_tasks",
                                  "cancelled_tasks", "progress")} == \
        {k: counters[k] for k in ("status", "total_tasks", "completed_tasks", "failed_tasks",
                                  "cancelled_tasks", "progress")}
    # Its page still lists every task, in order.
    info = jobs.get_job(db, uuid.UUID(job_id))
    assert [t.id for t in info.tasks] == sorted([*ids["completed"], *ids["cancelled"],
                                                 *ids["dead"]])


def test_rows_of_unfinished_jobs_and_plain_messages_stay(db):
    _, running = _job_with(db, completed=2, pending=1)
    plain = add_tasks(db, 2, queue="history")
    _finish(db, plain, "completed")
    delayed = add_tasks(db, 1, queue="history", visible_at="2100-01-01T00:00:00Z")

    assert Retention(completed=WEEK, failed=WEEK, job=WEEK, partitioned=True).run(db) == 0
    assert _history(db) == {}
    left = {r[0] for r in db.execute("SELECT id FROM job_tasks")}
    assert left == {*running["completed"], *running["pending"], *plain, *delayed}


def test_without_the_option_rows_are_not_moved(db):
    _job_with(db, completed=2)
    assert Retention.older_than(WEEK, partitioned=False).run(db) == 0
    assert _history(db) == {}


def test_a_row_already_past_its_window_is_deleted_not_moved(db):
    job_id, _ = _job_with(db, completed=2)
    db.execute("UPDATE jobs SET completed_at = now() - interval '8 days' WHERE id = %s",
               (job_id,))
    db.execute("SELECT * FROM pg_broker_move_to_history(%s, 100)", (WEEK,))
    assert _history(db) == {}
    assert db.execute("SELECT count(*) FROM job_tasks").fetchone()[0] == 0


def test_a_day_that_is_over_is_dropped_and_nothing_else(db):
    job_id, ids = _job_with(db, completed=1)
    db.execute("CREATE TABLE job_tasks_history_p20000101 PARTITION OF job_tasks_history"
               " FOR VALUES FROM ('2000-01-01 00:00+00') TO ('2000-01-02 00:00+00')")
    db.execute("INSERT INTO job_tasks_history (id, sequence, queue, priority, job_id, payload,"
               " status, attempts, max_attempts, visible_at, created_at, updated_at,"
               " purge_after) VALUES (-1, 0, 'history', 0, %s, '{}', 'completed', 1, 3,"
               " now(), now(), now(), '2000-01-01 12:00+00')", (job_id,))
    pending = add_tasks(db, 3, queue="history")

    moved, dropped = db.execute("SELECT * FROM pg_broker_move_to_history(%s, 100)",
                                (WEEK,)).fetchone()

    assert (moved, dropped) == (1, 1)
    assert "job_tasks_history_p20000101" not in _partitions(db)
    assert set(_history(db)) == set(ids["completed"])
    assert {r[0] for r in db.execute("SELECT id FROM job_tasks")} == set(pending)


def test_a_move_gives_way_to_the_session_holding_its_lock(db, database_url):
    _job_with(db, completed=1)
    with psycopg.connect(database_url) as other:
        other.execute("SELECT pg_advisory_xact_lock(42)")
        assert db.execute("SELECT * FROM pg_broker_move_to_history(%s, 100, 42)",
                          (WEEK,)).fetchone() == (None, None)
    assert db.execute("SELECT * FROM pg_broker_move_to_history(%s, 100, 42)",
                      (WEEK,)).fetchone() == (1, 0)


def test_users_see_only_their_own_jobs_history(db):
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    alices_job, alices = _job_with(db, alice, completed=2)
    _job_with(db, bob, completed=1)
    # Supabase's default privileges give every new table in public to anon
    # and authenticated: the partition about to be created must not keep them.
    db.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES"
               " TO anon, authenticated")
    try:
        Retention.older_than(WEEK, partitioned=True).run(db)
    finally:
        db.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON TABLES"
                   " FROM anon, authenticated")
    assert len(_history(db)) == 3
    (partition,) = _partitions(db)

    with jobs.user_session(db, alice):
        seen = [r[0] for r in db.execute("SELECT id FROM job_tasks_history")]
        info = jobs.get_job(db, uuid.UUID(alices_job))
    for role in ("authenticated", "service_role"):  # a partition is read through its parent
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with db.transaction():
                db.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
                db.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(partition)))
    assert sorted(seen) == alices["completed"]
    assert [t.id for t in info.tasks] == alices["completed"]
    for role in ("anon", "authenticated"):
        assert not db.execute("SELECT has_table_privilege(%s, %s, 'SELECT')",
                              (role, partition)).fetchone()[0]
    with db.transaction():
        db.execute("SET LOCAL ROLE anon")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with db.transaction():
                db.execute("SELECT * FROM job_tasks_history")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        with db.transaction():
            db.execute("SET LOCAL ROLE authenticated")
            db.execute("SELECT * FROM pg_broker_move_to_history('1 day', 1)")


def test_a_service_role_worker_moves_rows(db):
    _job_with(db, completed=2)
    with db.transaction():
        db.execute("SET LOCAL ROLE service_role")
        assert Retention.older_than(WEEK, partitioned=True).run(db) == 2
    assert len(_history(db)) == 2


def test_a_consuming_worker_moves_finished_jobs_rows_with_the_option(open_consumer, db):
    _, ids = _job_with(db, completed=2, dead=1)
    with open_consumer(partitioned_history=True):
        wait_for(lambda: set(_history(db)) == set(ids["completed"]), 30,
                 lambda: f"the rows to move: {_history(db)}")
    assert [r[0] for r in db.execute("SELECT id FROM job_tasks")] == ids["dead"]


def _vacuum_stats(db: psycopg.Connection) -> tuple[int, int]:
    """job_tasks' dead row versions and manual vacuums (a worker's) so far."""
    return db.execute("SELECT n_dead_tup, vacuum_count FROM pg_stat_user_tables"
                      " WHERE relname = 'job_tasks'").fetchone()


def _dead_rows(db: psycopg.Connection, count: int) -> None:
    """Leave ``count`` dead row versions in job_tasks, counted by the statistics."""
    ids = add_tasks(db, count, queue="vacuum")
    db.execute("DELETE FROM job_tasks WHERE id = ANY (%s)", (ids,))
    wait_for(lambda: _vacuum_stats(db)[0] >= count, 30, "the deletes in the statistics")


@contextmanager
def _table_options(db: psycopg.Connection, **options: object) -> Iterator[None]:
    """job_tasks with these storage parameters for a while, then its own again."""
    (before,) = db.execute("SELECT coalesce(reloptions, '{}') FROM pg_class"
                           " WHERE oid = 'job_tasks'::regclass").fetchone()
    settings = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(v))
                                  for k, v in options.items())
    db.execute(sql.SQL("ALTER TABLE job_tasks SET ({})").format(settings))
    try:
        yield
    finally:
        db.execute(sql.SQL("ALTER TABLE job_tasks RESET ({})").format(
            sql.SQL(", ").join(sql.Identifier(k) for k in options)))
        kept = {k: v for k, v in (o.split("=", 1) for o in before) if k in options}
        if kept:
            db.execute(sql.SQL("ALTER TABLE job_tasks SET ({})").format(sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(v))
                for k, v in kept.items())))


def _assert_a_worker_vacuums(open_consumer, db: psycopg.Connection) -> None:
    """300 dead row versions; a worker with a threshold of 100 vacuums them."""
    _dead_rows(db, 300)
    vacuums = _vacuum_stats(db)[1]
    with open_consumer(vacuum_threshold=100):
        wait_for(lambda: _vacuum_stats(db)[1] > vacuums, 30,
                 lambda: f"a vacuum by the worker: {_vacuum_stats(db)}")
    assert _vacuum_stats(db)[0] < 300


def test_a_worker_vacuums_job_tasks_when_autovacuum_is_off(open_consumer, db):
    with _table_options(db, autovacuum_enabled=False):
        _assert_a_worker_vacuums(open_consumer, db)


def test_a_worker_vacuums_job_tasks_past_the_threshold_though_autovacuum_just_did(
    open_consumer, db,
):
    # Autovacuum on, and job_tasks vacuumed a moment ago (as autovacuum does
    # once a minute); the dead rows of the minute after it must not wait for
    # the next visit. (Autovacuum's own threshold is raised so that it cannot
    # take the rows first and make the worker's vacuum unneeded.)
    with _table_options(db, autovacuum_vacuum_threshold=1_000_000_000):
        db.execute("VACUUM job_tasks")
        _assert_a_worker_vacuums(open_consumer, db)


def test_a_vacuum_an_old_snapshot_defeats_is_not_repeated_every_maintenance(
    open_consumer, db, database_url, caplog, monkeypatch,
):
    # A snapshot open longer than VACUUM_OLD_SNAPSHOT (60 s; half a second
    # here) keeps every row that died since it began: vacuuming again every
    # maintenance turn could not help.
    monkeypatch.setattr(leases, "VACUUM_OLD_SNAPSHOT", 0.5)
    with _table_options(db, autovacuum_enabled=False), \
            psycopg.connect(database_url) as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM job_tasks")
        time.sleep(1.0)
        _dead_rows(db, 300)
        vacuums = _vacuum_stats(db)[1]
        with caplog.at_level(logging.WARNING, logger="pg_broker"), \
                open_consumer(vacuum_threshold=100):
            wait_for(lambda: _vacuum_stats(db)[1] > vacuums, 30,
                     lambda: f"a vacuum by the worker: {_vacuum_stats(db)}")
            wait_for(lambda: "keeps the rows that died" in caplog.text, 30,
                     "the warning that an old snapshot defeated the vacuum")
            # Ten more maintenance turns (every 0.2 s): none vacuums again.
            time.sleep(2.0)
            dead, after = _vacuum_stats(db)
        assert after == vacuums + 1
        assert dead >= 300
        assert caplog.text.count("keeps the rows that died") == 1
        holder.rollback()


def test_a_young_snapshot_does_not_stop_the_workers_vacuums(open_consumer, db, database_url):
    # Under a steady stream of tasks the dead-row count is past the threshold
    # again right after each vacuum, and short statements hold young
    # snapshots: that is no reason to stop vacuuming (the count alone made a
    # worker wait a minute, then two, then four, while the table grew). A
    # snapshot younger than VACUUM_OLD_SNAPSHOT holds the rows here.
    with _table_options(db, autovacuum_enabled=False), \
            psycopg.connect(database_url) as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM job_tasks")
        _dead_rows(db, 300)
        vacuums = _vacuum_stats(db)[1]
        with open_consumer(vacuum_threshold=100):
            wait_for(lambda: _vacuum_stats(db)[1] >= vacuums + 3, 30,
                     lambda: f"a vacuum every maintenance turn: {_vacuum_stats(db)}")
        holder.rollback()


# The race of test_retention_races, on the partition path: finished jobs'
# rows moving while a worker claims, acks and buries and dead retry re-queues.

def test_moving_racing_claims_acks_and_dead_retry_moves_only_finished_jobs_rows(
    db: psycopg.Connection, database_url: str,
) -> None:
    ledger = Ledger()
    # Jobs of two tasks: one acked (completed), one buried (dead), so each
    # job finishes (failed) and reopens when dead retry re-queues its row.
    for _ in range(150):
        job_id = add_job(db)
        ledger.record(add_tasks(db, 2, queue="race-h", job_id=job_id), "pending")
    delayed_job = add_job(db)
    delayed = add_tasks(db, 20, queue="race-h", job_id=delayed_job,
                        visible_at="2100-01-01T00:00:00Z")
    ledger.record(delayed, "pending")

    moved = []
    retention = Retention(completed="0 seconds", failed="0 seconds", job=WEEK,
                          batch_size=10, partitioned=True)
    race(database_url, [claim_ack_bury(ledger, "race-h", limit=4), retry_dead(ledger),
                        lambda conn: moved.append(retention.run(conn))])

    left = dict(db.execute("SELECT id, status FROM job_tasks").fetchall())
    history = _history(db)
    assert sum(moved) == len(history) > 0, "rows moved while racing"
    assert not set(left) & set(history), "a row on both sides"
    assert set(ledger.state) == set(left) | set(history), "a row lost"
    not_completed = {i: ledger.state[i] for i in history if ledger.state[i] != "completed"}
    assert not not_completed, f"moved before they completed: {not_completed}"
    assert all(left.get(i) == "pending" for i in delayed), "a delayed (ETA) message moved"
    changed = {i: (ledger.state[i], s) for i, s in left.items() if ledger.state[i] != s}
    assert not changed, changed
