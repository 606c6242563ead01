"""The task functions of the core schema (migrations/core/) on real PostgreSQL: claiming under
concurrency, leases and fencing, retries with backoff, dead-lettering, the
watchdog and message TTL."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import psycopg
import pytest
from taskrows import ack_and_claim, add_tasks, claim, task

from pg_broker.maintenance import Retention
from pg_broker.queries import queries

ROWS = 10_000
WORKERS = 8
BATCH = 25


def _claim_until_empty(url: str, worker: str, start: threading.Barrier,
                       batches: list, errors: list) -> None:
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            start.wait()
            while True:
                began = time.monotonic()
                rows = claim(conn, worker, ["bulk"], BATCH)
                ended = time.monotonic()
                if not rows:
                    return
                batches.append((began, ended, worker, rows))
    except Exception as exc:  # surfaced by the test, with the thread's error
        errors.append(exc)


def test_eight_workers_claim_ten_thousand_rows_once_each_highest_priority_first(
    db: psycopg.Connection, database_url: str
) -> None:
    db.execute(
        "INSERT INTO job_tasks (queue, priority, payload)"
        " SELECT 'bulk', (g * 7919) %% 10, '{}' FROM generate_series(1, %s) g",
        (ROWS,),
    )
    batches: list = []
    errors: list = []
    start = threading.Barrier(WORKERS)
    threads = [
        threading.Thread(target=_claim_until_empty,
                         args=(database_url, f"worker-{n}", start, batches, errors))
        for n in range(WORKERS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert len({worker for _, _, worker, _ in batches}) > 1, "the claims did not overlap"

    claimed = [row["id"] for *_, rows in batches for row in rows]
    assert len(claimed) == ROWS
    assert len(set(claimed)) == ROWS, "a row was claimed twice"
    assert db.execute(
        "SELECT count(*), count(DISTINCT lease_token), min(attempts), max(attempts)"
        " FROM job_tasks WHERE status = 'claimed'"
    ).fetchone() == (ROWS, len(batches), 1, 1)

    def key(row):  # claim order: priority descending, then sequence
        return (-row["priority"], row["sequence"])

    for *_, rows in batches:
        assert [key(r) for r in rows] == sorted(key(r) for r in rows)
        assert len({r["lease_token"] for r in rows}) == 1
    # A claim that started after another one committed only got rows that come
    # after every row of the earlier one: SKIP LOCKED never let a lower
    # priority row jump ahead of a free higher priority one.
    for began, _, _, later in batches:
        for _, ended, _, earlier in batches:
            if ended < began:
                assert max(key(r) for r in earlier) < min(key(r) for r in later)


def test_claim_takes_only_ready_rows_of_the_named_queues(db: psycopg.Connection) -> None:
    (ready,) = add_tasks(db, queue="a")
    (other_queue,) = add_tasks(db, queue="b")
    (not_yet,) = add_tasks(db, queue="a")
    (expired,) = add_tasks(db, queue="a")
    db.execute("UPDATE job_tasks SET visible_at = now() + interval '1 hour' WHERE id = %s",
               (not_yet,))
    db.execute("UPDATE job_tasks SET expires_at = now() - interval '1 second' WHERE id = %s",
               (expired,))

    assert [r["id"] for r in claim(db, queues=["a"], batch=10)] == [ready]
    assert [r["id"] for r in claim(db, queues=["a", "b"], batch=10)] == [other_queue]
    assert claim(db, queues=["a", "b"], batch=10) == []
    db.execute("UPDATE job_tasks SET visible_at = now() WHERE id = %s", (not_yet,))
    assert [r["id"] for r in claim(db, queues=["a"], batch=10)] == [not_yet]


def test_claim_across_queues_returns_the_best_rows_of_all_of_them(db: psycopg.Connection) -> None:
    low_a = add_tasks(db, 3, queue="a", priority=1)
    high_b = add_tasks(db, 2, queue="b", priority=8)
    mid_a = add_tasks(db, 2, queue="a", priority=5)

    rows = claim(db, queues=["a", "b", "a"], batch=5)

    assert [r["id"] for r in rows] == high_b + mid_a + low_a[:1]
    assert task(db, low_a[1])["status"] == "pending"


def test_each_claim_counts_an_attempt_and_issues_a_fresh_lease(db: psycopg.Connection) -> None:
    (task_id,) = add_tasks(db, max_attempts=5)
    tokens = []
    for attempt in (1, 2, 3):
        (row,) = claim(db, worker=f"w{attempt}", lease="30 seconds")
        assert row["attempts"] == attempt
        assert row["worker_id"] == f"w{attempt}"
        assert row["lease_expires_at"] - row["claimed_at"] == timedelta(seconds=30)
        tokens.append(row["lease_token"])
        db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 second'"
                   " WHERE id = %s", (task_id,))
        assert db.execute("SELECT reclaim_stale_tasks()").fetchone() == (1,)
    assert len(set(tokens)) == 3


def test_complete_and_fail_with_a_stale_lease_token_change_nothing(db: psycopg.Connection) -> None:
    (task_id,) = add_tasks(db)
    (first,) = claim(db, worker="slow-worker")
    db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 second'")
    db.execute("SELECT reclaim_stale_tasks()")
    (second,) = claim(db, worker="new-worker")
    before = task(db, task_id)

    stale = first["lease_token"]
    assert db.execute("SELECT complete_task(%s, %s)", (task_id, stale)).fetchone() == (False,)
    assert db.execute("SELECT fail_task(%s, %s, 'boom')", (task_id, stale)).fetchone() == (None,)
    assert db.execute("SELECT start_task(%s, %s)", (task_id, stale)).fetchone() == (False,)
    assert task(db, task_id) == before
    assert before["worker_id"] == "new-worker"

    token = second["lease_token"]
    assert db.execute("SELECT complete_task(%s, %s, '{\"ok\": 1}')",
                      (task_id, token)).fetchone() == (True,)
    done = task(db, task_id)
    assert (done["status"], done["result"], done["lease_token"]) == ("completed", {"ok": 1}, None)
    assert done["completed_at"] is not None
    # The lease ended with the completion: the same token cannot finish it twice.
    assert db.execute("SELECT complete_task(%s, %s)", (task_id, token)).fetchone() == (False,)
    assert db.execute("SELECT fail_task(%s, %s, 'late')", (task_id, token)).fetchone() == (None,)
    assert task(db, task_id)["status"] == "completed"


def test_start_task_moves_a_held_row_to_processing(db: psycopg.Connection) -> None:
    (task_id,) = add_tasks(db)
    (row,) = claim(db)
    assert db.execute("SELECT start_task(%s, %s)", (task_id, row["lease_token"])).fetchone() == (True,)
    started = task(db, task_id)
    assert started["status"] == "processing"
    assert started["started_at"] is not None


def test_start_and_renew_are_one_definition_each_fenced_row_by_row(
    db: psycopg.Connection,
) -> None:
    # What start_task/mark_task_processing and heartbeat_task/
    # transport_renew_leases call (migrations/core/113): of a batch, only the
    # rows its token still holds move, and the ids returned are those.
    held_id, stale_id = add_tasks(db, 2)
    held, stale = claim(db), claim(db)
    db.execute("SELECT reclaim_stale_tasks()")  # nothing expired: both stay held
    ids, tokens = [held_id, stale_id], [held[0]["lease_token"], uuid.uuid4()]

    started = db.execute("SELECT * FROM pg_broker_start(%s, %s)", (ids, tokens)).fetchall()
    first_start = task(db, held_id)["started_at"]
    db.execute("SELECT * FROM pg_broker_start(%s, %s)", (ids, tokens))
    renewed = db.execute("SELECT * FROM pg_broker_renew(%s, %s, interval '1 hour')",
                         (ids, tokens)).fetchall()

    assert started == renewed == [(held_id,)]
    assert [task(db, i)["status"] for i in ids] == ["processing", "claimed"]
    assert task(db, held_id)["started_at"] == first_start, "a second start keeps the first"
    assert task(db, stale_id)["lease_token"] == stale[0]["lease_token"]
    assert _lease_left(db, held_id) > timedelta(minutes=59)
    assert _lease_left(db, stale_id) < timedelta(minutes=6)


def _lease_left(db: psycopg.Connection, task_id: int) -> timedelta:
    return db.execute("SELECT lease_expires_at - now() FROM job_tasks WHERE id = %s",
                      (task_id,)).fetchone()[0]


def test_fail_task_retries_with_exponential_backoff_then_fails_keeping_the_error(
    db: psycopg.Connection,
) -> None:
    (task_id,) = add_tasks(db, max_attempts=4)
    backoffs = []
    for attempt in (1, 2, 3):
        (row,) = claim(db)
        status = db.execute("SELECT fail_task(%s, %s, %s)",
                            (task_id, row["lease_token"], f"error {attempt}")).fetchone()
        assert status == ("pending",)
        after = task(db, task_id)
        assert (after["attempts"], after["error"]) == (attempt, f"error {attempt}")
        assert (after["worker_id"], after["lease_token"], after["completed_at"]) == (None, None, None)
        # updated_at is the failing statement's now(): the backoff is exact.
        backoffs.append(after["visible_at"] - after["updated_at"])
        assert claim(db) == [], "a row in backoff was claimed"
        db.execute("UPDATE job_tasks SET visible_at = now() WHERE id = %s", (task_id,))
    assert backoffs == [timedelta(seconds=10), timedelta(seconds=20), timedelta(seconds=40)]

    (row,) = claim(db)
    assert row["attempts"] == 4
    assert db.execute("SELECT fail_task(%s, %s, 'final error')",
                      (task_id, row["lease_token"])).fetchone() == ("failed",)
    final = task(db, task_id)
    assert (final["status"], final["error"]) == ("failed", "final error")
    assert final["completed_at"] is not None
    assert claim(db) == []


def test_fail_task_backoff_is_capped_and_tunable(db: psycopg.Connection) -> None:
    (task_id,) = add_tasks(db, max_attempts=10, attempts=7)
    (row,) = claim(db)  # the 8th delivery: 1s * 2^7 = 128s, capped at 60s
    db.execute("SELECT fail_task(%s, %s, 'x', true, interval '1 second', interval '1 minute')",
               (task_id, row["lease_token"]))
    after = task(db, task_id)
    assert after["visible_at"] - after["updated_at"] == timedelta(minutes=1)


def test_fail_task_without_retry_is_final_at_once(db: psycopg.Connection) -> None:
    (task_id,) = add_tasks(db, max_attempts=3)
    (row,) = claim(db)
    assert db.execute("SELECT fail_task(%s, %s, 'bad input', false)",
                      (task_id, row["lease_token"])).fetchone() == ("failed",)
    assert task(db, task_id)["attempts"] == 1


def test_fail_task_without_an_error_keeps_the_error_the_task_recorded(
    db: psycopg.Connection,
) -> None:
    (task_id,) = add_tasks(db, max_attempts=1)
    (row,) = claim(db)
    db.execute("UPDATE job_tasks SET error = 'ValueError: recorded by the worker' WHERE id = %s",
               (task_id,))
    db.execute("SELECT fail_task(%s, %s, NULL)", (task_id, row["lease_token"]))
    assert task(db, task_id)["error"] == "ValueError: recorded by the worker"


def test_reclaim_returns_expired_leases_to_pending_and_leaves_live_ones(
    db: psycopg.Connection,
) -> None:
    ids = add_tasks(db, 3)
    claim(db, worker="dead-worker", batch=2)
    claim(db, worker="live-worker", batch=1)
    db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 second'"
               " WHERE worker_id = 'dead-worker'")

    assert db.execute("SELECT reclaim_stale_tasks()").fetchone() == (2,)

    rows = [task(db, i) for i in ids]
    assert [r["status"] for r in rows] == ["pending", "pending", "claimed"]
    assert [r["worker_id"] for r in rows] == [None, None, "live-worker"]
    assert rows[0]["lease_token"] is None and rows[0]["lease_expires_at"] is None
    assert rows[0]["attempts"] == 1, "the lost delivery still counts"
    assert db.execute("SELECT reclaim_stale_tasks()").fetchone() == (0,)
    assert {r["id"] for r in claim(db, batch=5)} == set(ids[:2])


def test_reclaim_past_max_attempts_dead_letters_the_task(db: psycopg.Connection) -> None:
    (task_id,) = add_tasks(db, max_attempts=2)
    for _ in range(2):
        claim(db, worker="crashing-worker")
        db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 second'")
        assert db.execute("SELECT reclaim_stale_tasks()").fetchone() == (1,)

    dead = task(db, task_id)
    assert dead["status"] == "dead"
    assert dead["attempts"] == 2
    assert dead["error"] == "lease expired on worker crashing-worker after 2 of 2 deliveries"
    assert dead["completed_at"] is not None
    assert claim(db) == []


def test_heartbeat_extends_only_the_leases_the_worker_holds(db: psycopg.Connection) -> None:
    add_tasks(db, 5)
    first = claim(db, worker="a", batch=2, lease="1 minute")
    second = claim(db, worker="a", batch=1, lease="1 minute")
    (other,) = claim(db, worker="b", batch=1, lease="1 minute")
    (finished,) = claim(db, worker="a", batch=1, lease="1 minute")
    db.execute("SELECT complete_task(%s, %s)", (finished["id"], finished["lease_token"]))

    def lease_left(row) -> timedelta:
        (left,) = db.execute("SELECT lease_expires_at - now() FROM job_tasks WHERE id = %s",
                             (row["id"],)).fetchone()
        return left

    beat = "SELECT heartbeat_task(%s, %s, %s, interval '1 hour')"
    assert db.execute(beat, ("a", first[0]["lease_token"], None)).fetchone() == (2,)
    assert all(lease_left(r) > timedelta(minutes=59) for r in first)
    assert lease_left(second[0]) < timedelta(minutes=2)

    assert db.execute(beat, ("a", other["lease_token"], None)).fetchone() == (0,)
    assert db.execute(beat, ("b", None, first[0]["id"])).fetchone() == (0,)
    assert lease_left(other) < timedelta(minutes=2)

    assert db.execute(beat, ("a", None, None)).fetchone() == (3,)
    assert lease_left(second[0]) > timedelta(minutes=59)
    assert lease_left(other) < timedelta(minutes=2)
    assert task(db, finished["id"])["lease_expires_at"] is None

    assert db.execute(beat, ("b", None, other["id"])).fetchone() == (1,)


def test_expired_messages_are_never_delivered_and_the_watchdog_drops_them(
    db: psycopg.Connection,
) -> None:
    (job_id,) = db.execute("INSERT INTO jobs DEFAULT VALUES RETURNING id::text").fetchone()
    (plain,) = add_tasks(db)
    (of_job,) = add_tasks(db, job_id=job_id)
    (fresh,) = add_tasks(db)
    db.execute("UPDATE job_tasks SET expires_at = now() - interval '1 second' WHERE id IN (%s, %s)",
               (plain, of_job))
    db.execute("UPDATE job_tasks SET expires_at = now() + interval '1 hour' WHERE id = %s", (fresh,))

    assert [r["id"] for r in claim(db, batch=10)] == [fresh]
    db.execute("SELECT reclaim_stale_tasks()")

    assert task(db, plain) is None, "an expired plain message is deleted"
    expired = task(db, of_job)
    assert (expired["status"], expired["error"]) == ("dead", "message expired before delivery")
    assert task(db, fresh)["status"] == "claimed"


@pytest.mark.parametrize("batch", [0, -3])
def test_claim_with_a_batch_size_below_one_claims_one(db: psycopg.Connection, batch: int) -> None:
    add_tasks(db, 3)
    assert len(claim(db, batch=batch)) == 1


def test_the_transport_takes_at_most_its_limit_whatever_plan_the_planner_picks(
    db: psycopg.Connection,
) -> None:
    # Found by tests/integration/test_task_state_machine.py: a claim of 3 took 4
    # rows. Its rows were chosen in an `id IN (subquery)`; a nested-loop plan
    # ran the subquery again per row and each run locked the next rows. Here
    # that plan is forced (nothing hashed, sorted or materialized).
    add_tasks(db, 12, queue="plans")
    add_tasks(db, 12, queue="plans", status="completed", completed_at="2000-01-01T00:00:00Z")
    db.execute("INSERT INTO broker_transient_messages (queue, payload)"
               " SELECT 'plans', '{}' FROM generate_series(1, 12)")
    db.execute("ANALYZE job_tasks, broker_transient_messages")
    for setting in ("hashjoin", "mergejoin", "material", "hashagg", "sort"):
        db.execute(f"SET enable_{setting} = off")
    claimed, _, _ = ack_and_claim(db, [], queue="plans", limit=3)
    assert len(claimed) == 3
    taken = db.execute(queries["transport_take_transient"], {"queue": "plans", "limit": 3})
    assert len(taken.fetchall()) == 3
    deleted = db.execute(queries["delete_finished_tasks"],
                         Retention.older_than("1 day", batch_size=3).params())
    assert deleted.fetchone() == (3, 0, 0)  # completed, failed, of jobs
