"""Poison messages against a real Celery worker: a task that kills the
process running it, a body Celery cannot read, a row of any JSON shape.
Each ends alone — dead with a reason after ``max_attempts`` deliveries, or
settled by Celery — and the worker goes on with the messages behind it.

Every case runs with the project's delivery settings (``celeryconfig``:
acks late, reject on worker lost) and with Celery's own defaults. The worker
is supervised as systemd would (restarted whenever it exits); it should not
need to be.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from celery_workers import Worker, process_environment, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from poison_support import insert_row, json_values, near_misses
from psycopg.rows import dict_row

pytestmark = pytest.mark.slow
pytest_plugins = ["celery_session"]

# The project's delivery settings as celeryconfig.py sets them (checked below:
# importing celeryconfig here would freeze its environment-derived settings,
# the result backend among them, for every later test of the session).
CONFIGS = {
    "project": {"task_acks_late": True, "task_reject_on_worker_lost": True,
                "worker_prefetch_multiplier": 1},
    "celery": {},
}
# Short backoff: a rejected message is retried (and failed) within a second.
TRANSPORT_OPTIONS = {"lease_seconds": 10, "retry_backoff": 0.05}
TERMINAL = ("completed", "failed", "dead", "cancelled")


class Restarted:
    """A worker restarted whenever it exits, as systemd (``Restart=always``) would."""

    def __init__(self, env: dict[str, str], log_dir: Path, **options) -> None:
        self.worker = Worker(env, log_dir, **options).start()
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            if not self.worker.alive:
                self.restarts += 1
                self.worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.worker.kill()


def test_the_project_settings_here_are_celeryconfigs(database_url):
    names = list(CONFIGS["project"])
    done = subprocess.run(
        [sys.executable, "-c", "import celeryconfig, json, sys; "
         f"print(json.dumps({{n: getattr(celeryconfig, n) for n in {names!r}}}))"],
        env=process_environment(database_url), capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert json.loads(done.stdout) == CONFIGS["project"], done.stderr


def environment(database_url: str, config: str, **extra: str) -> dict[str, str]:
    return process_environment(
        database_url, E2E_TRANSPORT_OPTIONS=json.dumps(TRANSPORT_OPTIONS),
        E2E_CONF=json.dumps(CONFIGS[config]), **extra,
    )


def celery_envelope(queue: str, args: list, body: object = None, **headers) -> tuple[str, dict]:
    """A Celery protocol 2 message for e2e.record as the transport stores it;
    ``body`` replaces [args, kwargs, embed]. Returns (task id, payload)."""
    task_id = str(uuid.uuid4())
    raw = json.dumps([args, {}, {}] if body is None else body)
    return task_id, {
        "body": base64.b64encode(raw.encode()).decode(), "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "e2e.record", "id": task_id, **headers},
        "properties": {"body_encoding": "base64", "delivery_mode": 2, "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": queue},
                       "delivery_tag": str(uuid.uuid4())},
    }


def task_rows(dbconn: psycopg.Connection, queue: str) -> dict[str, dict]:
    with dbconn.cursor(row_factory=dict_row) as cur:
        return {row["task_id"]: row for row in cur.execute(
            "SELECT coalesce(task_id, payload->'headers'->>'id') AS task_id, status, attempts,"
            " error FROM job_tasks WHERE queue = %s", (queue,))}


def lines(path: Path) -> list[str]:
    """The first word of each line the tasks wrote (a token, or "crash")."""
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def dbconn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


CRASHES = {"solo": ["system_exit", "object_body"],
           "prefork": ["os_exit", "sigkill", "segfault", "object_body"]}


@pytest.mark.parametrize("config", ["project", "celery"])
@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_message_that_kills_its_worker_ends_and_the_messages_behind_it_run(
    app, database_url, dbconn, tmp_path, pool, config,
):
    queue = f"e2e.poison.{uuid.uuid4().hex[:8]}"
    runs = tmp_path / "runs"
    tokens, crashes = [], {}
    # Published before the worker starts: each message waits behind a crash.
    for how in CRASHES[pool]:
        tokens.append(f"ok-{how}")
        app.send_task("e2e.record", (str(runs), tokens[-1]), queue=queue)
        if how == "object_body":  # protocol 2 wants [args, kwargs, embed]
            task_id, payload = celery_envelope(queue, [], body={"not": "a list"})
            crashes[how] = task_id
            insert_row(dbconn, "job_tasks", queue, payload)
        else:
            crashes[how] = app.send_task("e2e.crash", (str(runs), how), queue=queue).id
    tokens.append("ok-last")
    app.send_task("e2e.record", (str(runs), tokens[-1]), queue=queue)
    supervised = Restarted(environment(database_url, config), tmp_path, pool=pool,
                            concurrency=1, queues=[queue])
    try:
        wait_for(lambda: all(row["status"] in TERMINAL for row in task_rows(dbconn, queue).values())
                 and set(tokens) <= set(lines(runs)), 120,
                 lambda: supervised.worker.describe(f"every message of {queue} to end: "
                                                    f"{task_rows(dbconn, queue)}"))
    finally:
        supervised.stop()

    rows = task_rows(dbconn, queue)
    assert sorted(line for line in lines(runs) if line.startswith("ok-")) == sorted(tokens)
    assert supervised.restarts == 0, supervised.worker.describe("the worker exited")
    for how, task_id in crashes.items():
        row, ran = rows.get(task_id), runs.read_text().splitlines().count(f"crash {how}")
        if how == "object_body":
            assert (row["status"], row["attempts"]) == ("dead", 3), row
            assert "ValueError" in row["error"], row
        elif config == "project":  # acks late: every delivery ran, and counted
            assert (row["status"], row["attempts"], ran) == ("dead", 3, 3), (how, row)
            assert row["error"].startswith("requeued after 3 of 3 deliveries"), row
        else:  # Celery's default acks before the task runs: at most once
            assert (row, ran) == (None, 1), (how, row)  # acked: the row deleted
    if pool == "solo" and config == "project":
        assert "SystemExit" in rows[crashes["system_exit"]]["error"]


# Property: a Celery worker beside rows of any JSON shape --------------------------

# Paths into a Celery message a near miss breaks.
CELERY_FIELDS = [("body",), ("content-type",), ("headers",), ("headers", "task"),
                 ("headers", "id"), ("headers", "eta"), ("headers", "expires"),
                 ("headers", "retries"), ("headers", "timelimit"), ("headers", "kwargsrepr"),
                 ("properties",), ("properties", "body_encoding"),
                 ("properties", "delivery_info"), ("properties", "priority")]


def celery_near_misses(path: str, queue: str) -> st.SearchStrategy[dict]:
    """A message for e2e.record with one field of the wrong type, or a body
    (base64 JSON) that is not [args, kwargs, embed]."""
    def good() -> dict:
        return celery_envelope(queue, [path, "bad"])[1]

    def with_body(value: object) -> dict:
        payload = good()
        payload["body"] = base64.b64encode(json.dumps(value).encode()).decode()
        return payload

    return near_misses(good, CELERY_FIELDS) | json_values.map(with_body)


@pytest.fixture(scope="module")
def poisoned_worker(database_url, tmp_path_factory) -> Iterator[tuple[Restarted, dict]]:
    """One solo worker (project settings) for every example, on a durable and
    a non-durable task queue."""
    names = {"durable": f"e2e.prop.{uuid.uuid4().hex[:8]}",
             "transient": f"e2e.prop-events.{uuid.uuid4().hex[:8]}"}
    log_dir = tmp_path_factory.mktemp("poisoned")
    supervised = Restarted(
        environment(database_url, "project", E2E_TRANSIENT_QUEUE=names["transient"]), log_dir,
        pool="solo", concurrency=1, queues=list(names.values()),
    )
    try:
        yield supervised, {**names, "runs": log_dir / "runs"}
    finally:
        supervised.stop()


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_a_celery_worker_runs_every_good_message_beside_rows_of_any_shape(
    poisoned_worker, dbconn, data,
):
    supervised, names = poisoned_worker
    runs = names["runs"]
    good, bad = [], {"job_tasks": [], "broker_transient_messages": []}
    for table, queue in (("job_tasks", names["durable"]),
                         ("broker_transient_messages", names["transient"])):
        payloads = data.draw(st.lists(json_values | celery_near_misses(str(runs), queue),
                                      min_size=1, max_size=4))
        for payload in payloads:
            good.append(f"good-{uuid.uuid4().hex}")
            insert_row(dbconn, table, queue, celery_envelope(queue, [str(runs), good[-1]])[1])
            bad[table].append(insert_row(dbconn, table, queue, payload))
        good.append(f"good-{uuid.uuid4().hex}")
        insert_row(dbconn, table, queue, celery_envelope(queue, [str(runs), good[-1]])[1])
        dbconn.execute("SELECT pg_notify('pgbroker_' || md5(%s), '')", (queue,))

    def settled() -> bool:
        unsettled = dbconn.execute(
            "SELECT (SELECT count(*) FROM job_tasks WHERE id = ANY(%s) AND status <> ALL(%s))"
            " + (SELECT count(*) FROM broker_transient_messages WHERE id = ANY(%s))",
            (bad["job_tasks"], list(TERMINAL), bad["broker_transient_messages"]),
        ).fetchone()[0]
        return not unsettled and set(good) <= set(lines(runs))

    wait_for(settled, 60, lambda: supervised.worker.describe("every row to be settled"))
    ran = [line for line in lines(runs) if line.startswith("good-")]
    assert sorted(set(ran) & set(good)) == sorted(good)
    assert len([line for line in ran if line in good]) == len(good)  # each exactly once
    dead_without_reason = dbconn.execute(
        "SELECT id FROM job_tasks WHERE id = ANY(%s) AND status = 'dead' AND error IS NULL",
        (bad["job_tasks"],)).fetchall()
    assert not dead_without_reason
    assert supervised.worker.alive and supervised.restarts == 0, \
        supervised.worker.describe("the worker exited")

