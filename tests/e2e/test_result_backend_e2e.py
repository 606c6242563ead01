"""The ``pgbroker://`` result backend with real workers: what a Celery caller
sees (started, children, ignore_result, revoke, chords of many parts, a failed
header), and ``expires=``: an expired task is REVOKED for its caller, with this
backend and with Redis's, as it is with Redis as broker.

Workers are ``celery -A tests.celery_app worker`` subprocesses on queues of
their own; the producer and waiter is this process (the ``app`` fixture).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import celery_app
import psycopg
import pytest
import redis
from celery import Celery, chord, group, states
from celery.exceptions import ChordError, TaskRevokedError
from celery.result import AsyncResult
from celery_workers import Worker, process_environment, wait_for

pytestmark = pytest.mark.slow
pytest_plugins = ["celery_session"]

RESULT_TIMEOUT = 90
REDIS_BACKEND = "redis://127.0.0.1:6379/13"


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("result-worker-logs")


@pytest.fixture(scope="module")
def queue() -> str:
    return f"results.{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def worker(app, database_url: str, logs: Path, queue: str) -> Iterator[Worker]:
    """A prefork worker of two processes on the module's queue; acked rows
    stay an hour (completed_retention), so a test can count the tasks sent."""
    env = process_environment(database_url,
                              E2E_TRANSPORT_OPTIONS=json.dumps({"completed_retention": 3600}))
    worker = Worker(env, logs, pool="prefork", concurrency=2, queues=[queue])
    try:
        yield worker.start()
    finally:
        worker.kill()


@pytest.fixture
def dbconn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def stored_states(dbconn: psycopg.Connection, app, task_id: str) -> str | None:
    row = dbconn.execute("SELECT state FROM task_results WHERE key = %s",
                         (app.backend.task_key(task_id),)).fetchone()
    return row and row[0]


def test_started_is_stored_while_the_task_runs_then_success(app, worker, queue, dbconn, tmp_path):
    runs = tmp_path / "runs"
    result = celery_app.sleep_then_record.apply_async((str(runs), 3), queue=queue)

    wait_for(lambda: result.state == states.STARTED, 60, lambda: f"STARTED; state {result.state}")
    assert result.info["pid"] > 0
    assert result.get(timeout=RESULT_TIMEOUT) == "slept"
    assert stored_states(dbconn, app, result.id) == states.SUCCESS
    assert (result.name, result.args, result.queue) == (
        "e2e.sleep_then_record", [str(runs), 3], queue)
    assert result.worker == worker.nodename


def test_children_and_ignore_result(app, worker, queue, dbconn):
    parent = celery_app.spawn.apply_async((3,), queue=queue)
    child_ids = parent.get(timeout=RESULT_TIMEOUT)

    assert [child.id for child in parent.children] == child_ids
    ignored = celery_app.add.apply_async((1, 1), queue=queue, ignore_result=True)
    assert ignored.get(timeout=RESULT_TIMEOUT) is None
    # Let it run: it must still leave no result behind.
    assert celery_app.add.apply_async((2, 2), queue=queue).get(timeout=RESULT_TIMEOUT) == 4
    assert stored_states(dbconn, app, ignored.id) is None


def test_a_revoked_task_is_revoked_for_its_waiter(app, worker, queue, dbconn):
    victim = celery_app.add.apply_async((1, 1), queue=queue, countdown=10)
    # The worker holds it until its ETA; the revoke reaches it before.
    wait_for(lambda: dbconn.execute("SELECT status FROM job_tasks WHERE task_id = %s",
                                    (victim.id,)).fetchone() == ("claimed",),
             60, lambda: worker.describe("the worker to hold the countdown task"))

    victim.revoke()

    with pytest.raises(TaskRevokedError):
        victim.get(timeout=RESULT_TIMEOUT)
    assert victim.state == states.REVOKED


def test_a_chord_of_a_hundred_calls_back_once_with_every_result(app, worker, queue, dbconn):
    header = [celery_app.add.s(n, n).set(queue=queue) for n in range(100)]
    result = chord(header)(celery_app.tsum.s().set(queue=queue))

    assert result.get(timeout=RESULT_TIMEOUT) == sum(2 * n for n in range(100))
    callbacks = dbconn.execute(
        "SELECT count(*) FROM job_tasks WHERE task_type = 'e2e.tsum' AND task_id = %s",
        (result.id,)).fetchone()[0]
    assert callbacks == 1
    # Counted in SQL, not by a chord_unlock task polling the header.
    assert dbconn.execute("SELECT count(*) FROM job_tasks WHERE task_type = 'celery.chord_unlock'"
                          ).fetchone() == (0,)


def test_a_failed_header_task_fails_the_chord(app, worker, queue):
    header = [celery_app.add.s(1, 1).set(queue=queue),
              celery_app.fail.s("header broke").set(queue=queue)]
    result = chord(header)(celery_app.tsum.s().set(queue=queue))

    # The callback never runs: it is stored failed with the header's error.
    error = result.get(timeout=RESULT_TIMEOUT, propagate=False)
    assert isinstance(error, ChordError) and "header broke" in str(error)
    assert result.state == states.FAILURE


def test_groups_join_natively(app, worker, queue):
    result = group(celery_app.add.s(n, 1).set(queue=queue) for n in range(20)).delay()

    assert result.join_native(timeout=RESULT_TIMEOUT) == [n + 1 for n in range(20)]
    assert result.get(timeout=RESULT_TIMEOUT) == [n + 1 for n in range(20)]


def _redis_reachable() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_BACKEND, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.mark.parametrize("backend", ["pgbroker", "redis"])
def test_an_expired_task_is_revoked_for_its_caller(request, app, database_url, logs, backend):
    if backend == "redis":
        if not _redis_reachable():
            pytest.skip(f"no Redis at {REDIS_BACKEND}")
        result_backend = REDIS_BACKEND
    else:
        result_backend = app.conf.result_backend
    caller = Celery("expiry-caller", set_as_current=False)
    caller.conf.update(broker_url=app.conf.broker_url, result_backend=result_backend,
                       task_default_queue="e2e")
    request.addfinalizer(caller.close)
    queue = f"results.expired.{uuid.uuid4().hex[:8]}"
    expired = caller.send_task("e2e.add", (1, 1), queue=queue, expires=1)
    in_time = caller.send_task("e2e.add", (2, 2), queue=queue, expires=600)
    time.sleep(2)  # no worker yet: the first expires in the queue

    worker = Worker(process_environment(database_url, E2E_RESULT_BACKEND=result_backend), logs,
                    pool="solo", queues=[queue])
    request.addfinalizer(worker.kill)
    worker.start()

    with pytest.raises(TaskRevokedError):
        expired.get(timeout=RESULT_TIMEOUT)
    assert expired.state == states.REVOKED
    assert in_time.get(timeout=RESULT_TIMEOUT) == 4
    assert AsyncResult(expired.id, app=caller).state == states.REVOKED


def test_a_plain_message_keeps_its_ttl_and_a_celery_task_is_delivered_to_be_revoked(app, dbconn):
    queue = f"results.ttl.{uuid.uuid4().hex[:8]}"
    task = celery_app.add.apply_async((1, 1), queue=queue, expires=30)
    with app.connection_for_write() as conn, conn.Producer() as producer:
        producer.publish({"plain": True}, routing_key=queue, expiration=30,
                         headers={"note": json.dumps("not a celery task")})

    rows = dbconn.execute("SELECT task_id, expires_at IS NOT NULL FROM job_tasks WHERE queue = %s"
                          " ORDER BY sequence", (queue,)).fetchall()
    assert rows == [(task.id, False), (None, True)]
