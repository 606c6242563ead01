"""Celery end to end on ``pgbroker://``: real worker subprocesses, real results.

The producer is this test process; workers are ``celery -A tests.celery_app
worker`` subprocesses; results travel through the ``pgbroker://`` result
backend on the same database. One prefork worker (with events) is shared by
most tests; tests that kill or stop a worker start their own, on a queue of
their own.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import celery_app
import psycopg
import pytest
from celery import chain, chord, group
from celery.events import EventReceiver
from celery_workers import (
    Worker,
    celery_command,
    process,
    process_environment,
    run_celery,
    run_celery_json,
    wait_for,
)
from psycopg.rows import dict_row

pytestmark = pytest.mark.slow
# The in-process app fixture, `app`.
pytest_plugins = ["celery_session"]

# Short leases keep crash recovery fast; renewal must keep held messages alive.
LEASE_SECONDS = 4
TRANSPORT_OPTIONS = {"lease_seconds": LEASE_SECONDS, "maintenance_interval": 1}
RESULT_TIMEOUT = 90


@pytest.fixture(scope="module")
def env(database_url: str) -> dict[str, str]:
    return process_environment(database_url, E2E_TRANSPORT_OPTIONS=json.dumps(TRANSPORT_OPTIONS))


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture(scope="module")
def dbconn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def worker(app, env: dict[str, str], logs: Path) -> Iterator[Worker]:
    """The shared prefork worker on queue 'e2e', sending events."""
    worker = Worker(env, logs, pool="prefork", concurrency=2, queues=["e2e"], events=True)
    try:
        yield worker.start()
    finally:
        worker.kill()


def start_worker(request: pytest.FixtureRequest, env, logs, **options) -> Worker:
    """A worker of the test's own, killed when the test ends."""
    worker = Worker(env, logs, **options)
    request.addfinalizer(worker.kill)
    return worker.start()


def unique_queue(label: str) -> str:
    return f"e2e.{label}.{uuid.uuid4().hex[:8]}"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def task_row(dbconn: psycopg.Connection, task_id: str) -> dict | None:
    with dbconn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT queue, task_type, status, attempts, lease_token FROM job_tasks"
            " WHERE task_id = %s", (task_id,),
        ).fetchone()


def test_delay_returns_its_result_through_the_pgbroker_backend(app, worker, dbconn):
    result = celery_app.add.delay(2, 3)

    assert result.get(timeout=RESULT_TIMEOUT) == 5
    # The ack deletes a plain message's row (completed_retention 0).
    wait_for(
        lambda: task_row(dbconn, result.id) is None, 30,
        lambda: f"the message row of {result.id} to be acked: {task_row(dbconn, result.id)}",
    )


def test_a_running_worker_is_listed_as_the_consumer_of_its_queues_in_pg_broker_status(
    app, worker, env
):
    # Listed whether it holds tasks or not: it registers as a consumer.
    me = f"{socket.gethostname()}:{worker.pid}"

    listed = re.compile(rf"^  e2e +{re.escape(me)} +\d+ ", re.MULTILINE)
    shown = []

    def status() -> bool:
        done = subprocess.run(["pg-broker", "status"], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        shown.append(done.stdout)
        return bool(listed.search(done.stdout.split("Live consumers by queue", 1)[-1]))

    wait_for(status, 30, lambda: f"{me} consuming e2e in pg-broker status:\n{shown[-1]}")


def test_chain_group_and_chord_complete(app, worker):
    chained = chain(celery_app.add.s(1, 2), celery_app.add.s(3), celery_app.add.s(4)).delay()
    grouped = group(celery_app.add.s(i, i) for i in range(5)).delay()
    chorded = chord(celery_app.add.s(i, i) for i in range(4))(celery_app.tsum.s())

    assert chained.get(timeout=RESULT_TIMEOUT) == 10
    assert grouped.get(timeout=RESULT_TIMEOUT) == [0, 2, 4, 6, 8]
    assert chorded.get(timeout=RESULT_TIMEOUT) == 12


def test_retry_with_countdown_runs_the_task_again(app, worker):
    result = celery_app.retry_until.delay(2)

    assert result.get(timeout=RESULT_TIMEOUT) == 2


def test_countdown_longer_than_the_lease_runs_once(app, worker, dbconn, tmp_path):
    runs = tmp_path / "runs"
    result = celery_app.record.apply_async((str(runs), "once"), countdown=2 * LEASE_SECONDS + 1)

    assert result.get(timeout=RESULT_TIMEOUT) == "once"
    # Had the lease lapsed while the worker held the message, the row would
    # have been claimed again and the task run a second time: give a second
    # run every chance to show up.
    time.sleep(LEASE_SECONDS + 2)
    assert len(lines(runs)) == 1, lines(runs)
    # Its ack was taken, so the lease it was acked under never lapsed (a
    # reclaimed row refuses the old lease's ack and stays).
    assert task_row(dbconn, result.id) is None


def test_acks_late_task_killed_mid_run_runs_again(request, app, env, logs, dbconn, tmp_path):
    queue = unique_queue("killed")
    runs = tmp_path / "runs"
    victim = start_worker(request, env, logs, pool="prefork", concurrency=1, queues=[queue])
    result = celery_app.sleep_then_record.apply_async((str(runs), 3), queue=queue)
    wait_for(lambda: lines(runs), 60, lambda: victim.describe("the task to start"))

    victim.signal(signal.SIGKILL)
    victim.wait(30)
    start_worker(request, env, logs, pool="prefork", concurrency=1, queues=[queue])

    assert result.get(timeout=RESULT_TIMEOUT) == "slept"
    assert [line.split()[0] for line in lines(runs)] == ["start", "start", "done"]
    # Acked after its second run: the plain message's row left at the ack.
    wait_for(lambda: task_row(dbconn, result.id) is None, 30,
             lambda: f"the row to leave at its ack: {task_row(dbconn, result.id)}")


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_a_failed_task_of_any_app_keeps_its_exception_in_the_dead_letters(
    request, app, env, logs, dbconn, pool
):
    # This app (tests/celery_app.py) records nothing itself: the transport's
    # handler does, in the process that ran the task (a prefork child here).
    queue = unique_queue(f"dead-{pool}")
    acks_late = {"task_acks_late": True, "task_acks_on_failure_or_timeout": False}
    start_worker(request, {**env, "E2E_CONF": json.dumps(acks_late)}, logs, pool=pool,
                 concurrency=1, queues=[queue])
    result = celery_app.fail.apply_async((f"no such chapter ({pool})",), queue=queue,
                                         headers={"max_attempts": 1})

    with pytest.raises(ValueError):
        result.get(timeout=RESULT_TIMEOUT)
    wait_for(lambda: task_row(dbconn, result.id)["status"] == "failed", 30, "the row to fail")
    (error,) = dbconn.execute("SELECT error FROM job_tasks WHERE task_id = %s",
                              (result.id,)).fetchone()
    assert error == f"ValueError: no such chapter ({pool})"
    listed = subprocess.run(["pg-broker", "dead", "list"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert f"ValueError: no such chapter ({pool})" in listed.stdout


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_pool_processes_tasks(request, app, env, logs, pool):
    queue = unique_queue(pool)
    start_worker(request, env, logs, pool=pool, concurrency=2, queues=[queue])

    results = [celery_app.add.apply_async((i, 1), queue=queue) for i in range(4)]

    assert [r.get(timeout=RESULT_TIMEOUT) for r in results] == [1, 2, 3, 4]


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_warm_shutdown_returns_prefetched_messages_to_pending(
    request, app, env, logs, dbconn, tmp_path, pool,
):
    queue = unique_queue("warm")
    runs = tmp_path / "runs"
    # Published before the worker starts, so its first claim takes them all:
    # the long task runs while the others wait, prefetched, in the worker.
    long_task = celery_app.sleep_then_record.apply_async((str(runs), 3), queue=queue)
    waiting = [celery_app.add.apply_async((i, i), queue=queue) for i in range(3)]
    long_lease = process_environment(
        env["PG_BROKER_URL"], E2E_TRANSPORT_OPTIONS=json.dumps({"lease_seconds": 300}),
    )
    worker = start_worker(
        request, long_lease, logs, pool=pool, concurrency=1, queues=[queue],
        extra_args=["--prefetch-multiplier=4"],
    )
    wait_for(lambda: lines(runs), 60, lambda: worker.describe("the long task to start"))
    prefetched = [r.id for r in waiting if task_row(dbconn, r.id)["status"] == "claimed"]
    assert prefetched, [task_row(dbconn, r.id) for r in waiting]

    worker.signal(signal.SIGTERM, group=False)  # as `kill <pid>` does

    assert worker.wait(60) == 0, worker.describe("warm shutdown")
    assert long_task.get(timeout=RESULT_TIMEOUT) == "slept"
    rows = [task_row(dbconn, task_id) for task_id in prefetched]
    # Back at once, and uncounted: none of them started.
    assert [(row["status"], row["lease_token"], row["attempts"]) for row in rows] == [
        ("pending", None, 0)] * len(rows)


def test_a_solo_worker_busy_past_its_control_queue_expiry_still_answers_ping(
    request, app, env, logs, tmp_path,
):
    queue = unique_queue("busy")
    runs = tmp_path / "runs"
    worker = start_worker(request, env, logs, pool="solo", concurrency=1, queues=[queue])
    # Celery's pidbox queue expires after 10 s unused (control_queue_expires);
    # the solo pool runs the task in the worker's only thread, hub included.
    result = celery_app.sleep_then_record.apply_async((str(runs), 12), queue=queue)

    assert result.get(timeout=RESULT_TIMEOUT) == "slept"
    assert app.control.ping(destination=[worker.nodename], timeout=10) == [
        {worker.nodename: {"ok": "pong"}}
    ]


def test_inspect_commands_reach_a_worker_in_another_process(app, worker, env, tmp_path):
    runs = tmp_path / "runs"
    # Long enough to be still running however slowly the CLI starts; the
    # worker is killed at the end of the module, task and all.
    running = celery_app.sleep_then_record.apply_async((str(runs), 60), queue="e2e")
    wait_for(lambda: lines(runs), 60, lambda: worker.describe("the long task to start"))
    node = worker.nodename

    active = run_celery_json(env, "inspect", "active", "-d", node, "-t", "20")
    ping = run_celery_json(env, "inspect", "ping", "-d", node, "-t", "20")
    stats = run_celery_json(env, "inspect", "stats", "-d", node, "-t", "20")
    registered = run_celery_json(env, "inspect", "registered", "-d", node, "-t", "20")

    assert ping == {node: {"ok": "pong"}}
    assert running.id in [task["id"] for task in active[node]]
    assert stats[node]["broker"]["transport"] == "pgbroker"
    assert stats[node]["pool"]["implementation"].endswith("prefork:TaskPool")
    assert {"e2e.add", "e2e.tsum", "e2e.retry_until"} <= set(registered[node])


def test_control_rate_limit_reaches_a_worker_in_another_process(app, worker, env):
    node = worker.nodename

    reply = run_celery_json(env, "control", "rate_limit", "e2e.tsum", "1000/s", "-d", node, "-t", "20")

    assert "new rate limit set successfully" in json.dumps(reply)
    registered = app.control.inspect(destination=[node], timeout=20).registered("rate_limit")
    assert "e2e.tsum [rate_limit=1000/s]" in registered[node]


def test_control_shutdown_stops_a_worker_in_another_process(request, app, env, logs):
    worker = start_worker(request, env, logs, pool="threads", concurrency=2, queues=[unique_queue("stop")])

    # A worker obeys shutdown without replying: the CLI waits out its timeout.
    run_celery(env, "control", "shutdown", "-d", worker.nodename, "-t", "2")

    assert worker.wait(60) == 0, worker.describe("shutdown by remote control")


def test_worker_events_reach_an_event_receiver(app, worker):
    events: list[dict] = []
    with app.connection_for_read() as connection:
        receiver = EventReceiver(connection, handlers={"*": events.append}, app=app)
        capture = threading.Thread(
            target=receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": True},
            daemon=True,
        )
        capture.start()
        try:
            # wakeup=True asks every worker for a heartbeat: once ours arrives
            # the receiver's queue is bound and no task event can be missed.
            wait_for(
                lambda: any(e["type"] == "worker-heartbeat" and e["hostname"] == worker.nodename
                            for e in events),
                60, "a heartbeat from the worker",
            )
            result = celery_app.add.delay(20, 22)
            assert result.get(timeout=RESULT_TIMEOUT) == 42
            wait_for(
                lambda: {"task-received", "task-started", "task-succeeded"}
                <= {e["type"] for e in events if e.get("uuid") == result.id},
                60, lambda: f"task events of {result.id}; got {[e['type'] for e in events]}",
            )
        finally:
            receiver.should_stop = True
            capture.join(30)
    assert not capture.is_alive()


def test_an_event_receiver_busy_past_its_queue_expiry_keeps_receiving(app, worker, monkeypatch):
    # Flower's queue expires after 60 s unused; 3 s here, so the test is short.
    monkeypatch.setitem(app.conf, "event_queue_expires", 3.0)
    received: list[float] = []
    with app.connection_for_read() as connection:
        receiver = EventReceiver(
            connection, handlers={"*": lambda event: received.append(time.monotonic())}, app=app,
        )
        capture = threading.Thread(
            target=receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": True},
            daemon=True,
        )
        capture.start()
        try:
            wait_for(lambda: received, 60, "a first event")
            # A steady stream of events, for three times the queue's expiry.
            stream_end = time.monotonic() + 9
            while time.monotonic() < stream_end:
                celery_app.add.delay(1, 1)
                time.sleep(0.05)

            wait_for(
                lambda: received[-1] > stream_end, 15,
                lambda: f"an event after the stream; the last came {stream_end - received[-1]:.1f}s before its end",
            )
        finally:
            receiver.should_stop = True
            capture.join(30)


def test_celery_events_dump_shows_task_events_of_another_process(request, app, worker, env, logs):
    dump = process(celery_command("events", "--dump"), env, logs / "events-dump.log")
    request.addfinalizer(dump.kill)
    dump.start()
    # Heartbeats (every two seconds with -E) show the monitor's queue is bound.
    wait_for(
        lambda: any(worker.nodename in line and "heartbeat" in line for line in dump.log().splitlines()),
        60, lambda: dump.describe("a heartbeat of the worker in `celery events --dump`"),
    )

    result = celery_app.add.delay(7, 8)

    assert result.get(timeout=RESULT_TIMEOUT) == 15
    wait_for(
        lambda: any(result.id in line and "task succeeded" in line for line in dump.log().splitlines()),
        60, lambda: dump.describe(f"task-succeeded of {result.id} in `celery events --dump`"),
    )


def _messages_stored(dbconn: psycopg.Connection) -> int:
    """How many rows job_tasks was ever given: its sequence (rows acked are
    deleted, so counting rows would not tell)."""
    return dbconn.execute(
        "SELECT coalesce(last_value, 0) FROM pg_sequences WHERE sequencename = 'job_tasks_sequence_seq'"
    ).fetchone()[0]


def test_event_and_remote_control_traffic_stays_off_the_durable_path(app, worker, env, dbconn):
    # Remote control from another process and from this one, and an event
    # monitor: their pidbox, reply and event messages are no job_tasks rows,
    # and the reply queues of clients that are gone are deleted.
    stored_before = _messages_stored(dbconn)
    node = worker.nodename
    assert run_celery_json(env, "inspect", "ping", "-d", node, "-t", "20") == {
        node: {"ok": "pong"}}
    assert app.control.ping(destination=[node], timeout=20) == [{node: {"ok": "pong"}}]
    events: list[dict] = []
    with app.connection_for_read() as connection:
        receiver = EventReceiver(connection, handlers={"*": events.append}, app=app)
        # wakeup=True asks the workers for a heartbeat: one event at least.
        receiver.capture(limit=1, timeout=60, wakeup=True)
    assert events
    celery_app.add.delay(1, 1).get(timeout=RESULT_TIMEOUT)

    # The task's message is the one row stored meanwhile (the test is alone
    # with the module's worker, which publishes only transient messages).
    assert _messages_stored(dbconn) - stored_before == 1
    wait_for(
        lambda: not dbconn.execute(
            "SELECT name FROM broker_queues WHERE name LIKE '%.reply.celery.pidbox'"
        ).fetchall(),
        30, lambda: "reply queues to be deleted: " + str(dbconn.execute(
            "SELECT name, auto_delete, expires FROM broker_queues"
        ).fetchall()),
    )
