"""The Celery app the end-to-end and Flower tests run in real worker processes.

Broker and result backend ``pgbroker://`` (``PG_BROKER_URL`` names the
database). Tasks carry explicit names so the test process (which imports this
file as ``celery_app``) and the workers (``celery -A tests.celery_app``) agree
on them.

``E2E_TRANSPORT_OPTIONS`` (JSON) sets ``broker_transport_options``, so a test
can give its workers a short lease; ``E2E_RESULT_BACKEND`` another result
backend; ``E2E_CONF`` (JSON) any other settings (``task_acks_late``, say);
``E2E_TRANSIENT_QUEUE`` names a non-durable task queue the worker may consume.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time

import psycopg
from celery import Celery
from kombu import Queue
from psycopg import sql

import pg_broker  # noqa: F401  (registers the pgbroker scheme)

app = Celery("e2e")
app.conf.update(
    broker_url="pgbroker://",
    result_backend=os.environ.get("E2E_RESULT_BACKEND") or "pgbroker://",
    broker_transport_options=json.loads(os.environ.get("E2E_TRANSPORT_OPTIONS") or "{}"),
    task_default_queue="e2e",
    result_extended=True,
    task_track_started=True,
    broker_connection_retry_on_startup=True,
)
app.conf.update(json.loads(os.environ.get("E2E_CONF") or "{}"))
if os.environ.get("E2E_TRANSIENT_QUEUE"):  # a task queue whose messages skip the WAL
    _transient = os.environ["E2E_TRANSIENT_QUEUE"]
    app.conf.task_queues = [Queue("e2e"), Queue(_transient, routing_key=_transient, durable=False)]


@app.task(name="e2e.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="e2e.tsum")
def tsum(values: list[int]) -> int:
    return sum(values)


@app.task(name="e2e.spawn")
def spawn(count: int) -> list[str]:
    """Send ``count`` add tasks from inside a task: they are its children."""
    return [add.delay(n, n).id for n in range(count)]


@app.task(name="e2e.await_result")
def await_result(task_id: str, timeout: float) -> object:
    """Wait inside a task for another task's result (Celery refuses that by
    default, for deadlocks a worker can reach so; allowed here)."""
    return app.AsyncResult(task_id).get(timeout=timeout, disable_sync_subtasks=False)


@app.task(name="e2e.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(name="e2e.retry_until", bind=True, max_retries=5)
def retry_until(self, retries: int) -> int:
    """Retry with a one-second countdown until it has been retried ``retries`` times."""
    if self.request.retries < retries:
        raise self.retry(countdown=1)
    return self.request.retries


@app.task(name="e2e.record")
def record(path: str, token: str) -> str:
    """Append one line per execution, so a test can count how often a task ran."""
    with open(path, "a") as log:
        log.write(f"{token} {os.getpid()}\n")
    return token


@app.task(name="e2e.sleep_then_record", acks_late=True)
def sleep_then_record(path: str, seconds: float) -> str:
    """Write 'start' then sleep then 'done': a long task a test can catch mid-run."""
    with open(path, "a") as log:
        log.write(f"start {os.getpid()}\n")
    time.sleep(seconds)
    with open(path, "a") as log:
        log.write(f"done {os.getpid()}\n")
    return "slept"


@app.task(name="e2e.crash")
def crash(path: str, how: str) -> None:
    """A poison message: note the run, then end the process running it."""
    with open(path, "a") as log:
        log.write(f"crash {how}\n")
    if how == "system_exit":
        raise SystemExit(3)
    if how == "os_exit":
        os._exit(7)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        ctypes.string_at(0)


_runs: psycopg.Connection | None = None


@app.task(name="e2e.insert_run", acks_late=True, ignore_result=True)
def insert_run(table: str, n: int) -> None:
    """Insert ``n`` into ``table`` (on ``E2E_RUNS_URL``) once per execution, so a
    test can count re-runs and the gaps between executions."""
    global _runs
    if _runs is None or _runs.closed:
        _runs = psycopg.connect(os.environ["E2E_RUNS_URL"], autocommit=True)
    _runs.execute(sql.SQL("INSERT INTO {} (n) VALUES (%s)").format(sql.Identifier(table)), (n,))
