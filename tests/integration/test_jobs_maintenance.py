"""Job reads, cancel, row-level security, retention, the watchdog and dead
letters, on task rows written directly (no worker needed)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from taskrows import ack_and_claim, add_tasks, claim, task
from transport_support import listen_as_waiter

from pg_broker.jobs import cancel_held_task, cancel_job, get_job, user_session
from pg_broker.maintenance import Retention, Watchdog, dead_tasks, retry_dead_tasks
from pg_broker.queries import queries
from pg_broker.transport.listener import channel_name
from tasks.package import submit_package
from tasks.pdf import Chapter

OWNER = uuid.UUID("00000000-0000-4000-8000-00000000000a")
STRANGER = uuid.UUID("00000000-0000-4000-8000-00000000000b")


def _job(db: psycopg.Connection, statuses: list[str]) -> uuid.UUID:
    (job_id,) = db.execute(
        "INSERT INTO jobs (user_id, title) VALUES (%s, 'test') RETURNING id", (OWNER,)
    ).fetchone()
    for number, status in enumerate(statuses):
        db.execute(
            """INSERT INTO job_tasks (queue, job_id, user_id, task_type, task_id, payload)
               VALUES ('audio', %s, %s, 'tasks.audio.synthesize_chapter', %s, '{}')""",
            (job_id, OWNER, f"{job_id}-{number}"),
        )
        if status != "pending":
            _set_status(db, f"{job_id}-{number}", status)
    return job_id


def _set_status(db: psycopg.Connection, task_id: str, status: str) -> None:
    held = status in ("claimed", "processing")
    db.execute(
        """UPDATE job_tasks SET status = %s, attempts = max_attempts,
                  lease_token = CASE WHEN %s THEN gen_random_uuid() END,
                  lease_expires_at = CASE WHEN %s THEN now() + interval '5 minutes' END,
                  completed_at = CASE WHEN %s THEN NULL ELSE now() END,
                  error = CASE WHEN %s IN ('failed', 'dead') THEN 'boom' END
            WHERE task_id = %s""",
        (status, held, held, held, status, task_id),
    )


def test_cancel_stops_pending_tasks_and_leaves_held_ones_alone(db: psycopg.Connection) -> None:
    job_id = _job(db, ["pending", "pending", "claimed", "completed"])
    assert cancel_job(db, job_id) == 2
    job = get_job(db, job_id)
    assert job.status == "cancelled" and job.finished and job.cancelled_tasks == 2
    assert [t.status for t in job.tasks] == ["cancelled", "cancelled", "claimed", "completed"]
    assert cancel_job(db, job_id) == 0  # nothing left to cancel
    done = _job(db, ["completed"])
    assert cancel_job(db, done) is None  # a completed job stays completed
    assert get_job(db, done, details=False).status == "completed"


def test_cancel_of_a_job_with_a_failed_task_and_pending_ones_cancels_it(
    db: psycopg.Connection,
) -> None:
    # Found by tests/integration/test_task_state_machine.py: cancelling the pending tasks
    # finished the job, the status trigger called it failed, and the cancel
    # then refused it as "already failed" (returned None) after all.
    job_id = _job(db, ["dead", "pending", "pending"])
    assert cancel_job(db, job_id) == 2
    job = get_job(db, job_id)
    assert job.status == "cancelled" and job.cancelled_tasks == 2 and job.failed_tasks == 1
    failed = _job(db, ["dead", "completed"])
    assert cancel_job(db, failed) is None  # it had already failed: it stays failed
    assert get_job(db, failed, details=False).status == "failed"


def test_a_held_task_its_worker_skips_for_a_cancelled_job_ends_cancelled_not_completed(
    db: psycopg.Connection,
) -> None:
    job_id = _job(db, ["pending"] * 3)
    (skipped, ran), _, token = ack_and_claim(db, [], "audio", limit=2)
    assert not cancel_held_task(db, (skipped, token)), "the job is not cancelled: the task runs"
    assert cancel_job(db, job_id) == 1

    assert cancel_held_task(db, (skipped, token))
    # Until the ack, the row still counts as this worker's: no "lease lost".
    renewed = db.execute(queries["transport_renew_leases"], {
        "ids": [skipped, ran], "tokens": [token, token], "lease": "5 minutes"}).fetchall()
    assert sorted(r[0] for r in renewed) == [skipped, ran]
    _, acked, _ = ack_and_claim(db, [(skipped, token), (ran, token)])
    assert sorted(acked) == [skipped, ran], "neither ack was refused"

    job = get_job(db, job_id)
    assert [(t.status, t.attempts) for t in job.tasks] == [
        ("cancelled", 1), ("completed", 1), ("cancelled", 0)]
    assert db.execute("SELECT count(*) FROM job_tasks WHERE lease_token IS NOT NULL"
                      ).fetchone() == (0,)
    assert (job.status, job.completed_tasks, job.cancelled_tasks, job.progress) == (
        "cancelled", 1, 2, 100)
    assert not cancel_held_task(db, (skipped, token)), "a settled task is no longer held"


def test_complete_task_settles_a_row_cancelled_while_held_as_the_transports_ack_does(
    db: psycopg.Connection,
) -> None:
    # complete_task settles through pg_broker_claim's ack (migrations/core/182):
    # the row its worker held when the job was cancelled stays cancelled, its
    # lease ends (before 182 complete_task refused it and left it held), and
    # nothing reports it completed.
    job_id = _job(db, ["pending", "pending"])
    (held,) = claim(db, queues=["audio"])
    assert cancel_job(db, job_id) == 1
    token = held["lease_token"]
    assert cancel_held_task(db, (held["id"], token))

    assert db.execute("SELECT complete_task(%s, %s, '{\"ok\": 1}')",
                      (held["id"], token)).fetchone() == (False,)
    row = task(db, held["id"])
    assert (row["status"], row["lease_token"], row["result"]) == ("cancelled", None, None)
    assert row["completed_at"] is not None
    assert get_job(db, job_id, details=False).status == "cancelled"
    # Settled: the same token finds nothing more to do.
    assert db.execute("SELECT complete_task(%s, %s)", (held["id"], token)).fetchone() == (False,)


def test_the_task_functions_leave_the_callers_commit_setting_as_it_was(
    db: psycopg.Connection, database_url: str,
) -> None:
    # pg_broker_claim makes its transaction's commit asynchronous (a lost ack
    # redelivers); claim_tasks and complete_task, which call it, put the
    # caller's setting back, so the rest of the caller's transaction commits
    # as the caller asked.
    add_tasks(db, 1, queue="commit")
    with psycopg.connect(database_url) as conn:  # one transaction
        conn.execute("SET LOCAL synchronous_commit = 'remote_write'")
        (held,) = claim(conn, queues=["commit"])
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("remote_write",)
        assert conn.execute("SELECT complete_task(%s, %s)",
                            (held["id"], held["lease_token"])).fetchone() == (True,)
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("remote_write",)
        conn.rollback()


def test_a_user_sees_their_own_job_and_nobody_elses(db: psycopg.Connection) -> None:
    job_id = _job(db, ["completed"])
    db.execute(
        """INSERT INTO job_artifacts (job_id, task_id, user_id, kind, storage_backend,
                                      storage_path, content_type, bytes, sha256)
           VALUES (%s, 't', %s, 'pdf', 'local', 'p.pdf', 'application/pdf', 1, repeat('a', 64))""",
        (job_id, OWNER),
    )
    with user_session(db, OWNER):
        mine = get_job(db, job_id)
    assert mine is not None and len(mine.tasks) == 1 and len(mine.artifacts) == 1
    with user_session(db, STRANGER):
        assert get_job(db, job_id) is None
        assert db.execute("SELECT count(*) FROM job_tasks").fetchone() == (0,)
    assert db.execute("SELECT current_user").fetchone() != ("authenticated",)


def test_user_session_acts_as_its_user_whatever_claims_a_pooled_connection_kept(
    db: psycopg.Connection,
) -> None:
    # auth.uid() prefers the legacy per-claim setting; a pooled connection
    # may still carry one at session level from the user it served before.
    owners_job = _job(db, ["completed"])
    (strangers_job,) = db.execute(
        "INSERT INTO jobs (user_id, title) VALUES (%s, 'theirs') RETURNING id", (STRANGER,)
    ).fetchone()
    db.execute("SELECT set_config('request.jwt.claim.sub', %s, false),"
               " set_config('request.jwt.claim.role', 'service_role', false)", (str(OWNER),))

    with user_session(db, STRANGER):
        assert db.execute("SELECT auth.uid(), auth.role()").fetchone() == (
            STRANGER, "authenticated")
        assert get_job(db, owners_job) is None
        assert [r[0] for r in db.execute("SELECT id FROM jobs")] == [strangers_job]
        assert db.execute("SELECT count(*) FROM job_tasks").fetchone() == (0,)
    # Transaction-local: the connection's own settings are as they were.
    assert db.execute("SELECT current_setting('request.jwt.claim.sub'),"
                      " current_setting('request.jwt.claim.role')").fetchone() == (
        str(OWNER), "service_role")


def _plain(db: psycopg.Connection, status: str, finished_ago: str | None) -> str:
    """A plain message's row (no job) in ``status``, finished that long ago."""
    task_id = uuid.uuid4().hex
    held = status in ("claimed", "processing")
    db.execute(
        """INSERT INTO job_tasks (queue, payload, task_id, status, completed_at, lease_token,
                                  lease_expires_at, visible_at)
           VALUES ('plain', '{}', %s, %s, now() - %s::interval,
                   CASE WHEN %s THEN gen_random_uuid() END,
                   CASE WHEN %s THEN now() + interval '5 minutes' END,
                   now() + interval '1 hour')""",
        (task_id, status, finished_ago, held, held))
    return task_id


def _left(db: psycopg.Connection, task_ids: list[str]) -> list[str]:
    return [t for t in task_ids
            if db.execute("SELECT 1 FROM job_tasks WHERE task_id = %s", (t,)).fetchone()]


def test_retention_deletes_old_finished_rows_in_batches_and_keeps_job_counters(
    db: psycopg.Connection,
) -> None:
    unfinished = _job(db, ["completed"] * 5 + ["failed", "pending", "claimed"])
    finished = _job(db, ["completed"] * 3 + ["failed"])
    db.execute("UPDATE job_tasks SET completed_at = now() - interval '8 days' "
               "WHERE status IN ('completed', 'failed')")
    db.execute("UPDATE jobs SET completed_at = now() - interval '8 days' WHERE id = %s",
               (finished,))
    recent = _job(db, ["completed"])
    plain_old = [_plain(db, status, "8 days") for status in ("completed", "failed", "dead")]
    plain_kept = [_plain(db, "completed", "1 day"), _plain(db, "pending", None),
                  _plain(db, "claimed", None)]
    before = get_job(db, unfinished, details=False)

    assert Retention.older_than("7 days", batch_size=2).run(db) == 4 + 3
    assert _left(db, plain_old) == [] and _left(db, plain_kept) == plain_kept
    # A job's rows follow the job: the finished job's old rows went, those of
    # the job still running stayed (its page lists them).
    assert get_job(db, finished).tasks == []
    assert len(get_job(db, unfinished).tasks) == 8
    after = get_job(db, finished, details=False)
    assert (after.total_tasks, after.completed_tasks, after.failed_tasks) == (4, 3, 1)
    assert get_job(db, recent).tasks[0].status == "completed"
    assert get_job(db, unfinished, details=False) == before
    with pytest.raises(psycopg.errors.InvalidDatetimeFormat):
        Retention.older_than("a week").run(db)


def test_retention_keeps_failed_and_dead_plain_rows_longer_than_completed_ones(
    db: psycopg.Connection,
) -> None:
    completed = _plain(db, "completed", "2 hours")
    failed, dead = _plain(db, "failed", "2 hours"), _plain(db, "dead", "2 hours")
    old_dead = _plain(db, "dead", "8 days")
    assert Retention(completed="1 hour", failed="7 days", job="7 days").run(db) == 2
    assert _left(db, [completed, failed, dead, old_dead]) == [failed, dead]
    assert {t["task_id"] for t in dead_tasks(db)} == {failed, dead}  # pg-broker dead list


def test_retention_with_a_lock_gives_way_to_a_session_running_it(
    db: psycopg.Connection, database_url: str,
) -> None:
    old = _plain(db, "completed", "1 day")
    retention = Retention.older_than("1 hour", lock=7_283_640_999)
    with psycopg.connect(database_url) as other, other.transaction():
        other.execute("SELECT pg_advisory_xact_lock(7283640999)")
        assert retention.run(db) == 0 and _left(db, [old]) == [old]
    assert retention.run(db) == 1 and _left(db, [old]) == []


def test_watchdog_returns_expired_leases_to_pending(db: psycopg.Connection) -> None:
    job_id = _job(db, ["claimed", "claimed"])
    db.execute("UPDATE job_tasks SET attempts = 1 WHERE task_id = %s", (f"{job_id}-0",))
    db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 second'")
    assert Watchdog().run(db) == 2
    assert [t.status for t in get_job(db, job_id).tasks] == ["pending", "dead"]


def test_dead_letters_are_listed_and_requeued_with_a_wake_up(
    db: psycopg.Connection, database_url: str
) -> None:
    job_id = _job(db, ["completed", "failed", "dead"])
    assert get_job(db, job_id, details=False).status == "failed"
    listed = dead_tasks(db)
    assert {(t["task_id"], t["status"], t["error"]) for t in listed} == {
        (f"{job_id}-1", "failed", "boom"), (f"{job_id}-2", "dead", "boom")}

    with psycopg.connect(database_url, autocommit=True) as listener:
        channel = channel_name("audio")  # the channel the transport listens on
        listen_as_waiter(listener, "audio")  # as a consumer that found it empty
        assert retry_dead_tasks(db, [f"{job_id}-1"]) == 1
        assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == [channel]

    job = get_job(db, job_id)
    assert [(t.status, t.attempts, t.error) for t in job.tasks][1] == ("pending", 0, None)
    assert job.tasks[2].status == "dead"
    # The job runs again; its error is now the one of the task still dead.
    assert (job.status, job.error, job.completed_at, job.failed_tasks) == ("processing", "boom", None, 1)
    assert retry_dead_tasks(db) == 1
    assert dead_tasks(db) == []


@pytest.mark.parametrize(("change", "message"), [
    ({"chapters": []}, "at least one chapter"),
    ({"chapters": [Chapter("Empty", "  \n ")]}, "has no text"),
    ({"voice": "klingon-nope"}, "no voice named"),
    ({"rate_wpm": 1000}, "outside"),
])
def test_a_package_that_cannot_be_spoken_is_refused_before_anything_is_queued(
    db: psycopg.Connection, change: dict, message: str
) -> None:
    request = {"user_id": OWNER, "title": "t", "chapters": [Chapter("One", "Some text.")], **change}
    with pytest.raises(ValueError, match=message):
        submit_package(db, **request)
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


def test_jobs_refuse_a_broker_that_cannot_share_their_transaction(db: psycopg.Connection) -> None:
    from celery import Celery

    other_app = Celery("elsewhere", broker="amqp://guest@127.0.0.1:5672//")
    with pytest.raises(RuntimeError, match="pgbroker://"):
        submit_package(db, user_id=OWNER, title="t", chapters=[Chapter("One", "Text.")],
                       app=other_app)
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
