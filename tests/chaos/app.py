"""The Celery app of the chaos suite: one task that writes down each execution.

Workers run it as ``celery -A tests.chaos.app worker``; the harness imports it
to publish. The broker is ``CHAOS_BROKER_URL`` (``pgbroker://…`` or
``redis://…``), with ``CHAOS_TRANSPORT_OPTIONS`` (JSON). Every execution of
``chaos.work`` inserts a row into the ledger — a table of another PostgreSQL
server (``CHAOS_LEDGER_URL``) that no fault touches — before it works and
marks it finished after, so the harness counts executions exactly, per task.
Acks are late: a message is settled only after its task returned.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import psycopg
from celery import Celery

import pg_broker  # noqa: F401  (registers pgbroker://)

QUEUE = "chaos"
LEDGER_TABLE = """
CREATE TABLE IF NOT EXISTS executions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run         text NOT NULL,
    seq         integer NOT NULL,
    task_id     text NOT NULL,
    node        text NOT NULL,
    pid         integer NOT NULL,
    redelivered boolean NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS executions_run_idx ON executions (run, seq);
"""

_local = threading.local()


def _ledger() -> psycopg.Connection:
    """This process's ledger connection (a forked pool child opens its own)."""
    held = getattr(_local, "ledger", None)
    if held is None or held[0] != os.getpid() or held[1].closed:
        conn = psycopg.connect(os.environ["CHAOS_LEDGER_URL"], autocommit=True,
                               application_name="chaos-ledger")
        _local.ledger = (os.getpid(), conn)
    return _local.ledger[1]


def work(self, run: str, seq: int, seconds: float) -> None:
    """Write down this execution, work for ``seconds``, mark it finished."""
    (row,) = _ledger().execute(
        "INSERT INTO executions (run, seq, task_id, node, pid, redelivered)"
        " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
        (run, seq, self.request.id, self.request.hostname or socket.gethostname(),
         os.getpid(), bool((self.request.delivery_info or {}).get("redelivered"))),
    ).fetchone()
    time.sleep(seconds)
    _ledger().execute("UPDATE executions SET finished_at = clock_timestamp() WHERE id = %s",
                      (row,))


def make_app(broker_url: str, transport_options: dict) -> Celery:
    """The chaos app on a broker; workers get theirs from the environment."""
    chaos = Celery("chaos", set_as_current=False)
    chaos.conf.update(
        broker_url=broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=int(os.environ.get("CHAOS_PREFETCH_MULTIPLIER", "4")),
    )
    chaos.task(name="chaos.work", bind=True, acks_late=True)(work)
    return chaos


app = make_app(os.environ.get("CHAOS_BROKER_URL", "pgbroker://"),
               json.loads(os.environ.get("CHAOS_TRANSPORT_OPTIONS") or "{}"))
