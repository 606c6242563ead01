"""A prefork worker forks its pool children while its consumer holds
database sessions (pg_broker/forking.py): a worker recycling a child after
every task forks one per task. No child may end a session of the parent's
(the consumer would lose its connection and restart), and each child
publishes and stores results on sessions of its own."""

from __future__ import annotations

import time
from pathlib import Path

import celery_app
import psycopg
import pytest
from celery_workers import Worker, process_environment

pytestmark = pytest.mark.slow
pytest_plugins = ["celery_session"]

RESULT_TIMEOUT = 90
TASKS = 6


def broker_sessions(db: psycopg.Connection) -> set[int]:
    """Backend pids of this database's broker and result-backend sessions."""
    return {row[0] for row in db.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'pg_broker%'")}


def test_recycled_prefork_children_leave_the_parents_sessions_alone(
    app, database_url, db, tmp_path: Path,
):
    queue = f"e2e.forks.{time.monotonic_ns()}"
    before = broker_sessions(db)
    worker = Worker(process_environment(database_url), tmp_path, pool="prefork", concurrency=2, events=True,
                    queues=[queue, "e2e"], extra_args=["--max-tasks-per-child=1"])
    try:
        worker.start()
        # The worker's own sessions once it is idle: its consumer's (work,
        # LISTEN) and whatever else its main process opened on start-up.
        time.sleep(2)
        parent = broker_sessions(db) - before
        assert parent, "the worker opened no broker session"

        runs = tmp_path / "runs"
        recorded = [celery_app.record.apply_async((str(runs), str(n)), queue=queue)
                    for n in range(TASKS)]
        spawned = celery_app.spawn.apply_async((2,), queue=queue)
        assert [r.get(timeout=RESULT_TIMEOUT) for r in recorded] == [str(n) for n in range(TASKS)]
        # A child publishes (the broker, from the child: to the default queue
        # "e2e", which this worker consumes too) and its children's results
        # come back (the result backend, from other children).
        children = [app.AsyncResult(task_id) for task_id in spawned.get(timeout=RESULT_TIMEOUT)]
        assert [r.get(timeout=RESULT_TIMEOUT) for r in children] == [0, 2]

        # Each task ran in a child of its own, forked while the parent was connected.
        pids = {line.split()[1] for line in runs.read_text().splitlines()}
        assert len(pids) == TASKS
        # Every session the worker's main process had is still there.
        alive = broker_sessions(db)
        assert parent <= alive, f"sessions of the parent ended: {sorted(parent - alive)}"
        # And it still consumes without having restarted its consumer.
        again = celery_app.add.apply_async((20, 22), queue=queue)
        assert again.get(timeout=RESULT_TIMEOUT) == 42
        assert parent <= broker_sessions(db)
        log = worker.log()
        assert "Connection to broker lost" not in log, worker.describe("a lost connection")
        assert "Cannot connect" not in log, worker.describe("a failed connection")
    finally:
        worker.kill()
