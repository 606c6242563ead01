"""A Celery task enqueued from SQL (``pg_broker_enqueue_task()``, migrations/core/104),
directly and from a trigger, runs on a real worker; its result is readable
through the app's result backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from celery import Celery
from celery_workers import Worker, process_environment, wait_for

pytest_plugins = ["celery_session"]
pytestmark = pytest.mark.slow


@pytest.fixture
def worker(database_url: str, tmp_path: Path) -> Iterator[Worker]:
    process = Worker(process_environment(database_url), tmp_path, pool="solo",
                     queues=("e2e",)).start()
    try:
        yield process
    finally:
        process.kill()


def test_tasks_enqueued_from_sql_and_from_a_trigger_run_on_a_real_worker(
    app: Celery, db: psycopg.Connection, worker: Worker
) -> None:
    (task_id,) = db.execute(
        "SELECT pg_broker_enqueue_task('e2e.add', '[2, 3]', p_queue => 'e2e')").fetchone()
    assert app.AsyncResult(str(task_id)).get(timeout=60) == 5

    # Any write can call a task: here an order row sums its lines on insert.
    db.execute("DROP TABLE IF EXISTS sql_orders")
    db.execute("CREATE TABLE sql_orders (id serial PRIMARY KEY, lines integer[], task_id uuid)")
    db.execute("""
        CREATE FUNCTION sql_orders_total() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.task_id := pg_broker_enqueue_task('e2e.tsum', jsonb_build_array(to_jsonb(NEW.lines)),
                                                  p_queue => 'e2e');
            RETURN NEW;
        END $$""")
    db.execute("CREATE TRIGGER sql_orders_total BEFORE INSERT ON sql_orders"
               " FOR EACH ROW EXECUTE FUNCTION sql_orders_total()")
    try:
        (order_task,) = db.execute("INSERT INTO sql_orders (lines) VALUES ('{4, 5, 6}')"
                                   " RETURNING task_id").fetchone()
        assert app.AsyncResult(str(order_task)).get(timeout=60) == 15
    finally:
        db.execute("DROP TABLE sql_orders")
        db.execute("DROP FUNCTION sql_orders_total()")
    # The ack follows the result (it rides with the worker's next claim) and
    # deletes both rows: they are plain messages.
    wait_for(lambda: db.execute(
        "SELECT count(*) FROM job_tasks WHERE task_id = ANY (%s)",
        ([str(task_id), str(order_task)],)).fetchone() == (0,), 30, "both rows acked")
