"""Lost connections, on a private PostgreSQL server: a worker whose sessions
are terminated again and again, and one whose database restarts while a task
runs. No finished task runs twice, nothing waits for a lease to expire.

The figures of issue 9 (defect 11) come from the first scenario at full size::

    PG_BROKER_LOSS_TASKS=3000 PG_BROKER_LOSS_ROUNDS=8 python -m pytest -s \\
        tests/e2e/test_transport_connection_loss.py -k terminated

(3,000 short acks_late tasks published at a steady pace, the worker's
sessions terminated with ``pg_terminate_backend`` every 3 seconds, lease 10 s).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from celery import Celery
from celery_workers import Worker, pgbroker_url, process_environment, wait_for
from chaos.servers import PostgresServer
from psycopg import sql

pytestmark = pytest.mark.slow


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    """A private PostgreSQL: its sessions are this test's to end, it is this
    test's to stop."""
    server = PostgresServer("loss").start()
    try:
        yield server
    finally:
        server.destroy()

WORKER_APPLICATION = "pg_broker_lost_worker"


def with_application_name(url: str, name: str) -> str:
    return url + ("&" if "?" in url else "?") + f"application_name={name}"


def lost_connections(
    url: str, log_dir: Path, *, pool: str, tasks: int, rounds: int, every: float = 3.0,
    lease: float = 10.0, concurrency: int = 2,
) -> dict:
    """Run ``tasks`` acks_late tasks on a worker while its sessions are
    terminated ``rounds`` times, ``every`` seconds apart; the figures."""
    table = f"runs_{uuid.uuid4().hex[:8]}"
    queue = f"loss.{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(sql.SQL(
            "CREATE TABLE {} (n integer NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
        ).format(sql.Identifier(table)))
        env = process_environment(
            with_application_name(url, WORKER_APPLICATION),
            E2E_TRANSPORT_OPTIONS=json.dumps({"lease_seconds": lease}), E2E_RUNS_URL=url,
        )
        worker = Worker(env, log_dir, pool=pool, concurrency=concurrency, queues=[queue]).start()
        producer = Celery(broker=pgbroker_url(url))
        period = rounds * every + every
        published = threading.Event()

        def produce() -> None:
            start = time.monotonic()
            for n in range(tasks):
                delay = start + n * period / tasks - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                producer.send_task("e2e.insert_run", (table, n), queue=queue, retry=True)
            published.set()

        thread = threading.Thread(target=produce, daemon=True)
        try:
            thread.start()
            terminated = 0
            for _ in range(rounds):
                time.sleep(every)
                terminated += db.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = %s", (WORKER_APPLICATION,),
                ).fetchone()[0]
            assert published.wait(120)
            count = sql.SQL("SELECT count(DISTINCT n), count(*) FROM {}").format(sql.Identifier(table))
            wait_for(lambda: db.execute(count).fetchone()[0] == tasks, 30 + 2 * lease,
                     lambda: worker.describe(f"all {tasks} tasks to run: {db.execute(count).fetchone()}"))
            # A message whose ack was lost runs again once its lease expires:
            # give every such re-run the time to happen.
            time.sleep(lease + 2)
            distinct, executions = db.execute(count).fetchone()
            gap = db.execute(sql.SQL(
                "SELECT extract(epoch FROM max(gap)) FROM "
                "(SELECT at - lag(at) OVER (ORDER BY at) AS gap FROM {}) g"
            ).format(sql.Identifier(table))).fetchone()[0]
        finally:
            worker.kill()
            producer.close()
    return {
        "pool": pool, "tasks": tasks, "rounds": rounds, "sessions_terminated": terminated,
        "executed": distinct, "reruns": executions - distinct, "longest_gap_s": float(gap),
    }


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_terminated_sessions_rerun_no_finished_task_and_cost_no_lease(server, tmp_path, pool):
    url = server.create_database("loss")
    tasks = int(os.environ.get("PG_BROKER_LOSS_TASKS", 300))
    rounds = int(os.environ.get("PG_BROKER_LOSS_ROUNDS", 3))
    figures = lost_connections(url, tmp_path, pool=pool, tasks=tasks, rounds=rounds)
    print(json.dumps(figures))
    assert figures["executed"] == tasks
    assert figures["sessions_terminated"] >= 2 * rounds
    assert figures["reruns"] == 0, figures
    # Without a restart of the consumer a gap is milliseconds; a lease is 10 s.
    assert figures["longest_gap_s"] < 5, figures


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_task_running_through_a_database_restart_is_acked_once_and_nothing_waits_a_lease(
    server, tmp_path, pool,
):
    url = server.create_database("restart")
    lease = 10
    queue = f"restart.{uuid.uuid4().hex[:8]}"
    runs = tmp_path / "runs"
    producer = Celery(broker=pgbroker_url(url))
    long_task = producer.send_task("e2e.sleep_then_record", (str(runs), 3), queue=queue)
    waiting = [producer.send_task("e2e.record", (str(runs), f"waiting-{n}"), queue=queue)
               for n in range(3)]
    producer.close()
    env = process_environment(
        # Completed rows kept, so that each shows how many deliveries it took.
        url, E2E_TRANSPORT_OPTIONS=json.dumps({"lease_seconds": lease, "maintenance_interval": 1,
                                               "completed_retention": 3600}),
        # No results: storing one fails while the database is down, and Celery
        # then leaves the message unacked, to run again (at-least-once).
        E2E_CONF=json.dumps({"worker_prefetch_multiplier": 4, "task_ignore_result": True}),
    )
    worker = Worker(env, tmp_path, pool=pool, concurrency=1, queues=[queue]).start()
    try:
        wait_for(lambda: runs.exists() and "start" in runs.read_text(), 60,
                 lambda: worker.describe("the long task to start"))
        # Down while the task runs and when it ends: its ack, and the return of
        # the messages prefetched behind it, wait for the database.
        server.stop()
        time.sleep(5)
        server.start()
        wait_for(lambda: {"done", "waiting-0", "waiting-1", "waiting-2"} <= words(runs), 90,
                 lambda: worker.describe("every task to run after the restart"))
        time.sleep(lease + 3)  # a lost ack would run the task again once its lease expired
        assert sorted(words(runs, unique=False)) == sorted(
            ["start", "done", "waiting-0", "waiting-1", "waiting-2"]), worker.describe("re-runs")
        with psycopg.connect(url) as db:
            rows = dict(db.execute(
                "SELECT task_id, (status, attempts)::text FROM job_tasks WHERE queue = %s",
                (queue,)).fetchall())
        assert rows[long_task.id] == "(completed,1)"
        # Prefetched, returned uncounted, claimed once more.
        assert [rows[r.id] for r in waiting] == ["(completed,1)"] * 3, rows
    finally:
        worker.kill()


def words(path: Path, unique: bool = True):
    """The first word of every line the tasks wrote."""
    found = [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []
    return set(found) if unique else found
