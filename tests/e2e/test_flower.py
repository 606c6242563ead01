"""Flower against ``pgbroker://``: workers, tasks and queue lengths over its HTTP API.

A worker with events (-E) and ``celery -A tests.celery_app flower`` run as
subprocesses on the test database, and the tests talk to Flower over HTTP;
the last two read ``pg_broker.flower`` (the Broker tab's queue reader) directly.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import celery_app
import psycopg
import pytest
from celery_workers import (
    Worker,
    celery_command,
    fetch,
    free_port,
    get_json,
    process,
    process_environment,
    wait_for,
)
from flower.utils.broker import Broker, Redis

from pg_broker.flower import PgBroker, install
from pg_broker.transport.connections import IDLE_CLOSE
from pg_broker.urls import broker_url

pytestmark = pytest.mark.slow
# The in-process app fixture, `app`.
pytest_plugins = ["celery_session"]

RESULT_TIMEOUT = 90
QUEUE = f"flower.{uuid.uuid4().hex[:8]}"
FLOWER_NAME = f"flower-{uuid.uuid4().hex[:8]}"  # every session Flower opens carries it


@pytest.fixture(scope="module")
def env(database_url: str) -> dict[str, str]:
    return process_environment(database_url, FLOWER_UNAUTHENTICATED_API="true")


@pytest.fixture(scope="module")
def worker(app, env, tmp_path_factory) -> Iterator[Worker]:
    worker = Worker(env, tmp_path_factory.mktemp("flower-logs"), queues=[QUEUE], events=True)
    try:
        yield worker.start()
    finally:
        worker.kill()


@pytest.fixture(scope="module")
def flower(worker, env, tmp_path_factory) -> Iterator[str]:
    """Base URL of a Flower watching the worker."""
    port = free_port()
    log_path = Path(tmp_path_factory.mktemp("flower-logs")) / "flower.log"
    url = env["PG_BROKER_URL"]
    named = f"{url}{'&' if '?' in url else '?'}application_name={FLOWER_NAME}"
    server = process(
        celery_command("flower", f"--port={port}", "--address=127.0.0.1"),
        {**env, "PG_BROKER_URL": named}, log_path,
    )
    server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: fetch(base + "/healthcheck")[0] == 200 or not server.alive, 90,
            lambda: server.describe("Flower to answer /healthcheck"),
        )
        assert server.alive, server.describe("Flower exited")
        # Worker status comes from events: once the worker is alive there,
        # Flower's event receiver is bound and no task event can be missed.
        wait_for(
            lambda: (get_json(base + "/api/workers?status=1") or {}).get(worker.nodename), 90,
            lambda: server.describe(f"{worker.nodename} alive in /api/workers?status=1"),
        )
        yield base
    finally:
        server.kill()


def test_api_workers_lists_the_worker(flower, worker):
    workers = wait_for(
        lambda: (w := get_json(flower + "/api/workers?refresh=1")) and worker.nodename in w and w,
        90, lambda: f"{worker.nodename} in /api/workers: {fetch(flower + '/api/workers')}",
    )

    assert QUEUE in [queue["name"] for queue in workers[worker.nodename]["active_queues"]]


def test_api_worker_details_come_from_concurrent_inspect_calls(flower, worker):
    # For one worker Flower runs all eight inspect methods at once, from
    # threads, each with a reply queue of its own.
    methods = {"stats", "active_queues", "registered", "scheduled", "active", "reserved",
               "revoked", "conf"}
    url = f"{flower}/api/workers?refresh=1&workername={worker.nodename}"

    info = wait_for(
        lambda: (w := get_json(url)) and methods <= set(w.get(worker.nodename, {})) and w,
        90, lambda: f"all of {sorted(methods)} in {fetch(url)}",
    )[worker.nodename]

    assert info["stats"]["broker"]["transport"] == "pgbroker"
    assert "e2e.add" in info["registered"]
    assert info["conf"]["task_default_queue"] == "e2e"


def test_an_idle_flower_holds_two_connections_after_concurrent_inspect_calls(
        flower, worker, database_url):
    # Its event receiver and each concurrent inspect call consume with a
    # kombu connection of their own: all LISTEN on one session (issue 12;
    # it was one LISTEN connection each, 6 connections in all when idle).
    url = f"{flower}/api/workers?refresh=1&workername={worker.nodename}"
    assert wait_for(lambda: (w := get_json(url)) and "stats" in w.get(worker.nodename, {}), 90,
                    lambda: f"inspect replies in {fetch(url)}")
    with psycopg.connect(database_url, autocommit=True) as db:
        def sessions() -> int:
            return db.execute("SELECT count(*) FROM pg_stat_activity"
                              " WHERE application_name = %s", (FLOWER_NAME,)).fetchone()[0]

        wait_for(lambda: sessions() == 2, IDLE_CLOSE * 3 + 30,
                 lambda: f"an idle Flower to hold 2 connections ({sessions()} now)")
        held = set()
        for _ in range(30):  # its event receiver drains all the while
            held.add(sessions())
            time.sleep(0.1)
        assert held == {2}


def test_api_tasks_lists_tasks_the_worker_ran(app, flower, worker):
    result = celery_app.add.apply_async((40, 2), queue=QUEUE)
    assert result.get(timeout=RESULT_TIMEOUT) == 42

    # The result can arrive before Flower has the task-succeeded event.
    task = wait_for(
        lambda: (t := (get_json(flower + "/api/tasks") or {}).get(result.id))
        and t["state"] == "SUCCESS" and t, 60,
        lambda: f"task {result.id} succeeded in /api/tasks: {fetch(flower + '/api/tasks')}",
    )

    assert (task["name"], task["state"], task["worker"]) == ("e2e.add", "SUCCESS", worker.nodename)


def post_json(url: str, payload: dict):
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=90) as response:
        return json.loads(response.read().decode())


def test_api_task_result_and_apply_read_and_wait_through_the_result_backend(app, flower, worker):
    done = celery_app.add.apply_async((40, 2), queue=QUEUE)
    assert done.get(timeout=RESULT_TIMEOUT) == 42
    later = celery_app.add.apply_async((1, 2), queue=QUEUE, countdown=2)

    assert get_json(f"{flower}/api/task/result/{done.id}") == {
        "task-id": done.id, "state": "SUCCESS", "result": 42}
    # Flower waits in a thread of its own, woken by the backend's notification
    # (its "state" is the one it read before waiting).
    assert get_json(f"{flower}/api/task/result/{later.id}?timeout=60")["result"] == 3
    applied = post_json(f"{flower}/api/task/apply/e2e.add",
                        {"args": [5, 6], "queue": QUEUE})
    assert (applied["state"], applied["result"]) == ("SUCCESS", 11)


def test_async_apply_and_abort_write_and_read_through_the_result_backend(app, flower, worker):
    """Flower's other task pages that use the backend: async-apply answers the
    state it read, abort stores ABORTED, which a waiter of the app sees."""
    # To a queue no worker consumes: it stays PENDING (and out of QUEUE's counts).
    held = post_json(f"{flower}/api/task/async-apply/e2e.add",
                     {"args": [1, 1], "queue": f"{QUEUE}.unconsumed"})
    assert held["state"] == "PENDING"
    result = celery_app.app.AsyncResult(held["task-id"])

    aborted = post_json(f"{flower}/api/task/abort/{held['task-id']}", {})

    assert aborted == {"message": f"Aborted '{held['task-id']}'"}
    wait_for(lambda: result.state == "ABORTED", 30, lambda: f"ABORTED, not {result.state}")


def test_queue_lengths_and_broker_page_show_our_queue(app, flower, worker):
    # Countdown tasks stay in the worker unacknowledged until they are due.
    held = [celery_app.add.apply_async((i, i), queue=QUEUE, countdown=600) for i in range(3)]

    def our_queue():
        lengths = get_json(flower + "/api/queues/length") or {}
        return next((q for q in lengths.get("active_queues", []) if q["name"] == QUEUE), None)

    queue = wait_for(
        lambda: (q := our_queue()) and q["messages_unacknowledged"] == len(held) and q, 60,
        lambda: f"{len(held)} unacked messages of {QUEUE}: {fetch(flower + '/api/queues/length')}",
    )
    status, page = fetch(flower + "/broker")

    assert (queue["messages"], queue["messages_ready"], queue["consumers"]) == (len(held), 0, 1)
    assert status == 200
    # Queue, Messages, Unacked, Ready, Consumers, as the page's table shows them.
    assert broker_page_row(page, QUEUE)[:5] == [QUEUE, "3", "3", "0", "1"]


def broker_page_row(page: str, queue: str) -> list[str]:
    """The cell texts of ``queue``'s row in the Broker page's table."""
    row = page.split(f'<tr id="{queue}">', 1)[1].split("</tr>", 1)[0]
    return [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]


def test_flower_broker_factory_answers_pgbroker_urls_and_still_redis_ones():
    install()
    install()  # idempotent

    assert isinstance(Broker("pgbroker://postgres@127.0.0.1:5432/postgres"), PgBroker)
    assert isinstance(Broker("redis://127.0.0.1:6379/0"), Redis)


def test_queue_lengths_count_ready_delayed_unacknowledged_and_transient_messages(database_url):
    queue = f"flower.lengths.{uuid.uuid4().hex[:8]}"
    rows = [  # (status, visible in, expires in, lease)
        ("pending", "0", None, False), ("pending", "0", None, False),  # ready
        ("pending", "1 hour", None, False),                            # delayed (retry back-off)
        ("claimed", "0", None, True),                                  # held by a worker
        ("pending", "0", "-1 second", False),                          # expired: not counted
        ("completed", "0", None, False),                               # done: not counted
    ]
    with psycopg.connect(database_url, autocommit=True) as conn:
        for status, visible_in, expires_in, leased in rows:
            conn.execute(
                "INSERT INTO job_tasks (queue, payload, status, lease_token, lease_expires_at,"
                " visible_at, expires_at)"
                " VALUES (%s, '{}', %s, CASE WHEN %s THEN gen_random_uuid() END,"
                " CASE WHEN %s THEN now() + interval '1 minute' END,"
                " now() + %s::interval, now() + %s::interval)",
                (queue, status, leased, leased, visible_in, expires_in),
            )
        conn.execute(
            "INSERT INTO broker_transient_messages (queue, payload, expires_at)"
            " VALUES (%s, '{}', NULL), (%s, '{}', now() - interval '1 second')",
            (queue, queue),
        )

    lengths = asyncio.run(PgBroker(broker_url(database_url)).queues([queue, "flower.empty"]))

    assert lengths[0] == {
        "name": queue, "messages": 5, "messages_ready": 3, "messages_unacknowledged": 1,
        "consumers": 0,
    }
    assert (lengths[1]["name"], lengths[1]["messages"]) == ("flower.empty", 0)
