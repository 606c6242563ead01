"""The bookkeeping (pg_broker.bookkeeping, tasks.lifecycle) is fenced by the lease
token of the delivery, as acks are: a worker whose lease expired, and whose
message another worker now holds, writes nothing into that row and says so.

The handlers are driven as Celery drives them: the real signals, sent with a
task whose request carries the delivery's properties."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from celery import Celery, signals
from taskrows import ack_and_claim, add_job, add_tasks, task

from pg_broker.jobs import cancel_job
from pg_broker.transport.messages import delivery_tag
from tasks.lifecycle import job_to_work_on

app = Celery("fencing", broker="pgbroker://")


@app.task(name="fencing.noop", acks_late=True)
def noop() -> None:
    """Stands in for any task: only its request matters here."""


@pytest.fixture(autouse=True)
def worker_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_BROKER_URL", database_url)


@pytest.fixture
def running() -> Iterator[callable]:
    """Runs code as a delivery whose tag is given: the task's current request."""
    pushed = 0

    def run_as(task_id: str, tag: str | None) -> None:
        nonlocal pushed
        noop.push_request(id=task_id, properties={"delivery_tag": tag})
        pushed += 1

    yield run_as
    for _ in range(pushed):
        noop.pop_request()


def _reclaimed_by_a_second_worker(db: psycopg.Connection, queue: str = "default") -> tuple:
    """The row's first delivery lost its lease and a second worker claimed it:
    (row id, the first delivery's tag, the second's)."""
    (first,), _, stale = ack_and_claim(db, [], queue, limit=1, worker="worker-1")
    db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 second'")
    assert db.execute("SELECT reclaim_stale_tasks()").fetchone() == (1,)
    (second,), _, live = ack_and_claim(db, [], queue, limit=1, worker="worker-2")
    assert first == second
    return first, delivery_tag(first, stale), delivery_tag(second, live)


def _prerun(task_id: str) -> None:
    signals.task_prerun.send(sender=noop, task_id=task_id, task=noop, args=(), kwargs={})


def _failure(task_id: str, error: str) -> None:
    signals.task_failure.send(sender=noop, task_id=task_id, exception=ValueError(error),
                              args=(), kwargs={}, traceback=None, einfo=None)


def test_a_stale_delivery_cannot_mark_processing_or_record_an_error(
    db: psycopg.Connection, running, caplog: pytest.LogCaptureFixture
) -> None:
    (row_id,) = add_tasks(db, task_id="celery-task-1")
    row_id, stale, live = _reclaimed_by_a_second_worker(db)
    before = task(db, row_id)

    running("celery-task-1", stale)
    with caplog.at_level(logging.WARNING):
        _prerun("celery-task-1")
        _failure("celery-task-1", "late error of worker 1")
    assert task(db, row_id) == before
    assert (before["status"], before["worker_id"], before["error"]) == (
        "claimed", "worker-2", None)
    refusals = [r.getMessage() for r in caplog.records if "lease lost" in r.getMessage()]
    assert len(refusals) == 2 and all(f"job_tasks row {row_id} " in m for m in refusals)

    running("celery-task-1", live)
    _prerun("celery-task-1")
    _failure("celery-task-1", "error of worker 2")
    after = task(db, row_id)
    assert (after["status"], after["error"]) == ("processing", "ValueError: error of worker 2")
    assert after["started_at"] is not None


def test_a_stale_delivery_of_a_cancelled_job_cannot_cancel_the_row_another_worker_holds(
    db: psycopg.Connection, running, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = add_job(db, str(uuid.uuid4()))
    (row_id,) = add_tasks(db, job_id=job_id, task_id="celery-task-2")
    row_id, stale, live = _reclaimed_by_a_second_worker(db)
    assert cancel_job(db, job_id) == 0, "the task is held: the cancel leaves it to its worker"

    running("celery-task-2", stale)
    with caplog.at_level(logging.WARNING):
        assert job_to_work_on(job_id, noop.request) is None
    assert (task(db, row_id)["status"], task(db, row_id)["worker_id"]) == ("claimed", "worker-2")
    assert any("lease lost" in r.getMessage() and f"job_tasks row {row_id} " in r.getMessage()
               for r in caplog.records)

    running("celery-task-2", live)
    assert job_to_work_on(job_id, noop.request) is None
    assert task(db, row_id)["status"] == "cancelled"


def test_a_message_that_is_no_job_tasks_row_writes_nothing(
    db: psycopg.Connection, running, caplog: pytest.LogCaptureFixture
) -> None:
    # Eager calls, other brokers, transient queues: no row and no lease to fence.
    (row_id,) = add_tasks(db, task_id="celery-task-3")
    ack_and_claim(db, [], "default", limit=1)
    before = task(db, row_id)
    for tag in (None, "transient:7"):
        running("celery-task-3", tag)
        with caplog.at_level(logging.WARNING):
            _prerun("celery-task-3")
            _failure("celery-task-3", "no row")
    assert task(db, row_id) == before
    assert not [r for r in caplog.records if "lease lost" in r.getMessage()]
