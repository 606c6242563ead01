"""The one Celery app every benchmarked broker runs.

One task, ``bench.mark``, does no work: it appends a 16-byte record (the
timestamp the producer put in the message, the time the task started) to a
file named by ``BENCH_MARK_FILE``. The result-backend figures use two more,
whose results are stored: ``bench.echo`` (marks, then returns its argument)
and ``bench.total`` (a chord's callback: the sum of its header's results). The harness counts completions and reads
start times from that file, so the measurement never goes through the broker
under test and is the same for every broker. Appends with ``O_APPEND`` are
atomic per ``write``, so solo, threads and prefork pools can share one file.

Workers load it as ``celery -A bench.app worker`` with the broker URL in
``BENCH_BROKER_URL`` and the result backend, if any, in
``BENCH_RESULT_BACKEND`` (Flower as ``celery -A bench.app flower``, the same
way); the harness builds its producer apps with
:func:`make_app`, so producer and worker settings cannot drift apart.
"""

from __future__ import annotations

import os
import struct
import threading
import time

from celery import Celery

import pg_broker  # noqa: F401  (registers the pgbroker:// scheme)

BROKER_VARIABLE = "BENCH_BROKER_URL"
RESULT_BACKEND_VARIABLE = "BENCH_RESULT_BACKEND"
TRANSPORT_OPTIONS_VARIABLE = "BENCH_TRANSPORT_OPTIONS"
MARK_FILE_VARIABLE = "BENCH_MARK_FILE"
# The -E worker and its Flower set this to EVENTS_CONTROL_EXCHANGE: Flower's
# enable_events and inspect broadcasts then reach that worker alone, never
# the workers measured without events.
CONTROL_EXCHANGE_VARIABLE = "BENCH_CONTROL_EXCHANGE"
EVENTS_CONTROL_EXCHANGE = "bench.events"
TASK_NAME = "bench.mark"
ECHO_TASK = "bench.echo"
TOTAL_TASK = "bench.total"
# Where delay() sends by default; no worker consumes it, so enqueue figures
# measure publishing alone.
ENQUEUE_QUEUE = "bench.enqueue"
RECORD = struct.Struct("<dd")

# Identical for every broker. Result storage is off but for bench.echo and
# bench.total, which the result-backend figures use.
SETTINGS = {
    "task_ignore_result": True,
    "task_default_queue": ENQUEUE_QUEUE,
    "task_serializer": "json",
    "accept_content": ["json"],
    "broker_connection_retry_on_startup": True,
    "worker_prefetch_multiplier": 4,
    "worker_redirect_stdouts": False,
}

_mark_lock = threading.Lock()
_mark_fd: tuple[int, int] | None = None  # (pid, fd): reopened after a fork


def mark(sent: float = 0.0, gate: str | None = None) -> None:
    """Record (publish timestamp, start timestamp) for the harness.

    With ``gate`` (a file path), hold the worker until the harness removes the
    file: a solo worker held so takes nothing more from the broker while the
    harness publishes a backlog behind it.
    """
    started = time.time()
    os.write(_mark_descriptor(), RECORD.pack(sent, started))
    while gate and os.path.exists(gate):
        time.sleep(0.001)


def _mark_descriptor() -> int:
    global _mark_fd
    pid = os.getpid()
    with _mark_lock:
        if _mark_fd is None or _mark_fd[0] != pid:
            path = os.environ[MARK_FILE_VARIABLE]
            _mark_fd = (pid, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        return _mark_fd[1]


def echo(sent: float = 0.0) -> float:
    """Mark, and return the argument: its result is stored."""
    mark(sent)
    return sent


def total(values: list[float]) -> float:
    return sum(values)


def make_app(broker_url: str, transport_options: dict | None = None,
             result_backend: str | None = None) -> Celery:
    """A Celery app with the benchmark's settings and its tasks."""
    app = Celery("bench", broker=broker_url, backend=result_backend, set_as_current=False)
    app.conf.update(SETTINGS)
    app.conf.broker_transport_options = dict(transport_options or {})
    app.task(name=TASK_NAME, ignore_result=True)(mark)
    app.task(name=ECHO_TASK, ignore_result=False)(echo)
    app.task(name=TOTAL_TASK, ignore_result=False)(total)
    return app


def _options_from_env() -> dict:
    import json

    raw = os.environ.get(TRANSPORT_OPTIONS_VARIABLE, "").strip()
    return json.loads(raw) if raw else {}


app = make_app(os.environ.get(BROKER_VARIABLE, "memory://"), _options_from_env(),
               os.environ.get(RESULT_BACKEND_VARIABLE) or None)
if CONTROL_EXCHANGE_VARIABLE in os.environ:
    app.conf.control_exchange = os.environ[CONTROL_EXCHANGE_VARIABLE]
