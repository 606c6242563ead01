"""A Celery worker and producers behind PgBouncer (issues 16 and 12): the
layout the README advises for Supabase's pooler and PgBouncer — broker work
and publishes through a transaction-mode pool with ``prepared_statements``
off, LISTEN (``PG_BROKER_LISTEN_URL``) and the result backend through a
session-mode pool. Debian's ``pgbouncer``, started by the test; skipped,
saying why, where it is absent."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pgbouncer
import pytest
from celery import Celery
from celery_workers import Worker, process_environment, run_celery_json
from pgbouncer import through

from pg_broker.urls import broker_url

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not pgbouncer.available(), reason=pgbouncer.MISSING)]
pytest_plugins = ["pgbouncer"]

PRODUCERS = 4
TASKS_EACH = 50
RESULT_TIMEOUT = 120
PRODUCER_OPTIONS = {"prepared_statements": False, "migrate": False}


def _produce(broker: str, first: int, results) -> None:
    """A producer process: its own app, only a broker (no result backend)."""
    app = Celery("pooled-producer", broker=broker)
    app.conf.broker_transport_options = PRODUCER_OPTIONS
    results.put([app.send_task("e2e.add", (n, n), queue="e2e").id
                 for n in range(first, first + TASKS_EACH)])


def test_a_worker_and_producers_through_a_transaction_pooler_run_every_task(
        transaction_pooler: str, session_pooler: str, database_url: str,
        tmp_path: Path) -> None:
    pooled = through(transaction_pooler, database_url)
    session = through(session_pooler, database_url)
    env = process_environment(
        pooled, PG_BROKER_LISTEN_URL=session,
        E2E_TRANSPORT_OPTIONS=json.dumps({"prepared_statements": False}),
        E2E_RESULT_BACKEND=broker_url(session))
    worker = Worker(env, tmp_path, pool="prefork", concurrency=2).start()
    try:
        ctx = multiprocessing.get_context("spawn")
        ids = ctx.Queue()
        producers = [ctx.Process(target=_produce, args=(broker_url(pooled), i * TASKS_EACH, ids))
                     for i in range(PRODUCERS)]
        for producer in producers:
            producer.start()
        sent = [task_id for _ in producers for task_id in ids.get(timeout=RESULT_TIMEOUT)]
        for producer in producers:
            producer.join(30)
            assert producer.exitcode == 0

        results = Celery("pooled-results", backend=broker_url(session))
        values = sorted(results.AsyncResult(task_id).get(timeout=RESULT_TIMEOUT)
                        for task_id in sent)
        assert values == [2 * n for n in range(PRODUCERS * TASKS_EACH)]

        # Remote control through the transaction pool: the inspect client's
        # LISTEN goes through the session pool as well.
        replies = run_celery_json(env, "inspect", "ping", "-d", worker.nodename, "-t", "20")
        assert replies == {worker.nodename: {"ok": "pong"}}
        assert "Unrecoverable error" not in worker.log()
        assert "notifications do not arrive" not in worker.log()
    finally:
        worker.stop()
