"""The task functions with any argument a caller can pass: every NULL is
either the argument's default or refused with a hint (the rule is written in
migrations/core/102), no held row is ever without a lease expiry, and the retry
backoff is exact and never overflows, whatever the attempt count."""

from __future__ import annotations

import uuid
from datetime import timedelta

import psycopg
import pytest
from psycopg import errors
from taskrows import add_tasks, claim, task

from pg_broker.queries import queries

DEFAULT_LEASE = timedelta(minutes=5)


def _refused(db: psycopg.Connection, call: str, params: tuple, argument: str) -> None:
    with pytest.raises(errors.NullValueNotAllowed) as raised:
        db.execute(call, params)
    assert argument in raised.value.diag.message_primary
    assert raised.value.diag.message_hint


def _lease(db: psycopg.Connection, task_id: int) -> timedelta:
    """How long the row's lease runs from its last claim or heartbeat."""
    (lease,) = db.execute("SELECT lease_expires_at - last_heartbeat FROM job_tasks WHERE id = %s",
                          (task_id,)).fetchone()
    return lease


def _backoff(db: psycopg.Connection, task_id: int) -> timedelta:
    # updated_at is the failing statement's now(): the backoff is exact.
    (backoff,) = db.execute("SELECT visible_at - updated_at FROM job_tasks WHERE id = %s",
                            (task_id,)).fetchone()
    return backoff


# Backoff -------------------------------------------------------------------

MICROSECOND = timedelta(microseconds=1)
HOUR = timedelta(hours=1)


@pytest.mark.parametrize(("base", "cap"), [
    (timedelta(seconds=10), HOUR),                      # the defaults
    (MICROSECOND, timedelta(hours=2_000_000_000)),      # reached only after 62 doublings
    (timedelta(days=1), HOUR),                          # a cap below the first backoff
    (timedelta(0), HOUR),
], ids=["10s-1h", "1us-2e9h", "cap-below-base", "no-backoff"])
def test_fail_task_backoff_is_exact_and_never_overflows_for_200_attempts(
    db: psycopg.Connection, base: timedelta, cap: timedelta
) -> None:
    # One row per delivery count n = 1..200, failed in one statement.
    db.execute("INSERT INTO job_tasks (queue, payload, attempts, max_attempts)"
               " SELECT 'default', '{}', n - 1, 1000 FROM generate_series(1, 200) n")
    claimed = claim(db, batch=200)
    assert sorted(r["attempts"] for r in claimed) == list(range(1, 201))
    statuses = db.execute(
        "SELECT fail_task(id, lease_token, 'boom', true, %s, %s) FROM job_tasks",
        (base, cap)).fetchall()
    assert statuses == [("pending",)] * 200

    for row in claimed:
        n = row["attempts"]
        expected = min(base // MICROSECOND * 2 ** (n - 1), cap // MICROSECOND)
        assert _backoff(db, row["id"]) == expected * MICROSECOND, f"delivery {n}"


def test_the_41st_failure_of_a_task_with_100_attempts_waits_the_capped_hour(
    db: psycopg.Connection,
) -> None:
    (task_id,) = add_tasks(db, max_attempts=100, attempts=40)
    (row,) = claim(db)
    assert db.execute("SELECT fail_task(%s, %s, 'boom')",
                      (task_id, row["lease_token"])).fetchone() == ("pending",)
    assert _backoff(db, task_id) == HOUR


@pytest.mark.parametrize("argument", ["p_backoff", "p_max_backoff"])
def test_fail_task_refuses_a_negative_backoff(db: psycopg.Connection, argument: str) -> None:
    (task_id,) = add_tasks(db)
    (row,) = claim(db)
    intervals = {"p_backoff": "10 seconds", "p_max_backoff": "1 hour", argument: "-1 second"}
    with pytest.raises(errors.InvalidParameterValue, match=argument):
        db.execute("SELECT fail_task(%s, %s, 'x', true, %s::interval, %s::interval)",
                   (task_id, row["lease_token"], intervals["p_backoff"],
                    intervals["p_max_backoff"]))
    assert task(db, task_id)["status"] == "claimed"


# NULL arguments ------------------------------------------------------------

@pytest.mark.parametrize(("params", "argument"), [
    ((None, ["default"], 1, "1 minute"), "p_worker_id"),
    (("w", None, 1, "1 minute"), "p_queues"),
])
def test_claim_tasks_refuses_a_null_worker_or_queue_list(
    db: psycopg.Connection, params: tuple, argument: str
) -> None:
    (task_id,) = add_tasks(db)
    _refused(db, "SELECT * FROM claim_tasks(%s, %s, %s, %s::interval)", params, argument)
    assert task(db, task_id)["status"] == "pending"


def test_claim_tasks_with_a_null_lease_takes_the_default_lease(db: psycopg.Connection) -> None:
    (task_id,) = add_tasks(db)
    (row,) = db.execute("SELECT id, lease_expires_at FROM claim_tasks('w', ARRAY['default'], 1,"
                        " NULL)").fetchall()
    assert row[1] is not None
    assert _lease(db, task_id) == DEFAULT_LEASE
    db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 second'")
    assert db.execute("SELECT reclaim_stale_tasks()").fetchone() == (1,)
    assert task(db, task_id)["status"] == "pending"


def test_claim_tasks_with_a_null_batch_size_claims_one(db: psycopg.Connection) -> None:
    add_tasks(db, 3)
    assert len(db.execute("SELECT * FROM claim_tasks('w', ARRAY['default'], NULL)").fetchall()) == 1


def test_heartbeat_task_with_a_null_lease_renews_for_the_default_lease(
    db: psycopg.Connection,
) -> None:
    (task_id,) = add_tasks(db)
    (row,) = claim(db, worker="w", lease="1 second")
    assert db.execute("SELECT heartbeat_task('w', %s, %s, NULL)",
                      (row["lease_token"], task_id)).fetchone() == (1,)
    assert _lease(db, task_id) == DEFAULT_LEASE


def test_heartbeat_task_refuses_a_null_worker(db: psycopg.Connection) -> None:
    (task_id,) = add_tasks(db)
    claim(db, worker="w", lease="1 minute")
    _refused(db, "SELECT heartbeat_task(%s, NULL, NULL, %s::interval)", (None, "1 hour"),
             "p_worker_id")
    assert _lease(db, task_id) == timedelta(minutes=1)


@pytest.mark.parametrize(("function", "arguments"), [
    ("start_task", ""),
    ("complete_task", ""),
    ("fail_task", ", 'boom'"),
])
@pytest.mark.parametrize("null", ["p_task_id", "p_lease_token"])
def test_fenced_functions_refuse_a_null_row_or_lease_token(
    db: psycopg.Connection, function: str, arguments: str, null: str
) -> None:
    (task_id,) = add_tasks(db)
    (row,) = claim(db)
    given = {"p_task_id": task_id, "p_lease_token": row["lease_token"], null: None}
    _refused(db, f"SELECT {function}(%s, %s{arguments})",
             (given["p_task_id"], given["p_lease_token"]), null)
    assert task(db, task_id)["status"] == "claimed"


def test_complete_task_with_a_null_result_keeps_the_result_it_has(db: psycopg.Connection) -> None:
    (task_id,) = add_tasks(db, result={"kept": True})
    (row,) = claim(db)
    assert db.execute("SELECT complete_task(%s, %s, NULL)",
                      (task_id, row["lease_token"])).fetchone() == (True,)
    assert task(db, task_id)["result"] == {"kept": True}


def test_fail_task_with_null_retry_and_backoffs_takes_their_defaults(
    db: psycopg.Connection,
) -> None:
    first, capped = add_tasks(db, 2, max_attempts=100)
    db.execute("UPDATE job_tasks SET attempts = 20 WHERE id = %s", (capped,))
    claimed = claim(db, batch=2)
    assert db.execute("SELECT fail_task(id, lease_token, 'x', NULL, NULL, NULL)"
                      " FROM job_tasks ORDER BY id").fetchall() == [("pending",)] * 2
    assert len(claimed) == 2
    assert _backoff(db, first) == timedelta(seconds=10)
    assert _backoff(db, capped) == HOUR


def test_transport_fail_with_a_null_backoff_retries_after_the_default(
    db: psycopg.Connection,
) -> None:
    (task_id,) = add_tasks(db, max_attempts=3)
    (row,) = claim(db)
    assert db.execute(queries["transport_fail"], {
        "ids": [task_id], "tokens": [row["lease_token"]], "backoff": None}).fetchall() == [
        (task_id, "pending")]
    assert _backoff(db, task_id) == timedelta(seconds=10)


# No held row without a lease expiry ----------------------------------------------

def test_a_claim_without_a_lease_is_refused_not_held_forever(db: psycopg.Connection) -> None:
    (task_id,) = add_tasks(db)
    with pytest.raises(errors.CheckViolation, match="job_tasks_lease_expiry_check"):
        db.execute(queries["transport_claim"], {
            "ack_ids": [], "ack_tokens": [], "worker_id": "w", "lease_token": uuid.uuid4(),
            "lease": None, "queue": "default", "limit": 1, "delete_acked": True})
    assert task(db, task_id)["status"] == "pending"


@pytest.mark.parametrize("statement", ["transport_renew_leases", "a plain update"])
def test_a_held_row_cannot_lose_its_lease_expiry(db: psycopg.Connection, statement: str) -> None:
    (task_id,) = add_tasks(db)
    (row,) = claim(db, lease="1 minute")
    if statement == "transport_renew_leases":
        call, params = queries[statement], {
            "ids": [task_id], "tokens": [row["lease_token"]], "lease": None}
    else:
        call, params = "UPDATE job_tasks SET lease_expires_at = NULL", {}
    with pytest.raises(errors.CheckViolation, match="job_tasks_lease_expiry_check"):
        db.execute(call, params)
    assert _lease(db, task_id) == timedelta(minutes=1)
