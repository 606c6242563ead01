"""``Celery('myapp', broker='pgbroker://…')`` in an app that never imports
pg_broker: the installed ``pg_broker.pth`` registers the scheme (see
pg_broker/scheme.py), so a producer script, ``celery worker``, ``celery beat``,
``celery inspect`` and Flower all find the transport, and Celery finds the
result backend by its entry point.

The app lives in a directory of its own, outside the repository, and every
process runs there: nothing of the repository's test code is importable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from celery_workers import fetch, free_port, get_json, process_environment, wait_for

from pg_broker.doctor import OK, Context, check_scheme
from pg_broker.processes import Supervised, celery_command, worker_command
from pg_broker.urls import broker_url

pytestmark = pytest.mark.slow

APP = """
import os
from celery import Celery

app = Celery("myapp", broker=os.environ["MYAPP_URL"], backend=os.environ["MYAPP_URL"])
app.conf.task_default_queue = os.environ["MYAPP_QUEUE"]
app.conf.beat_schedule = {"tick": {"task": "myapp.tick", "schedule": 0.5}}


@app.task(name="myapp.add")
def add(x, y):
    return x + y


@app.task(name="myapp.tick")
def tick():
    return "tick"
"""

# At start-up the .pth has imported pg_broker and nothing heavy; then a plain
# producer sends a task and waits for its result.
PRODUCER = """
import json, sys
at_start = sorted(m for m in ("pg_broker", "kombu", "celery", "psycopg") if m in sys.modules)
from myapp import add
print(json.dumps({"at_start": at_start, "result": add.delay(2, 3).get(timeout=90)}))
"""


def test_producer_worker_beat_inspect_and_flower_know_pgbroker_without_the_import(
    database_url: str, tmp_path: Path,
) -> None:
    installed = check_scheme(Context())
    assert installed.status == OK, f"{installed.message}: a venv made before setup.py " \
        "installed pg_broker.pth needs pip install -e '.[test]' again"
    (tmp_path / "myapp.py").write_text(APP)
    queue = f"scheme-{uuid.uuid4().hex[:8]}"
    env = process_environment(database_url, MYAPP_URL=broker_url(database_url), MYAPP_QUEUE=queue,
                              PYTHONPATH=str(tmp_path), FLOWER_UNAUTHENTICATED_API="true")
    node = f"scheme-{uuid.uuid4().hex[:8]}@localhost"
    port = free_port()
    worker = Supervised(worker_command("myapp", hostname=node, pool="solo", queues=[queue]),
                        env=env, log_file=tmp_path / "worker.log", cwd=tmp_path)
    beat = Supervised(celery_command("myapp", "beat", "--schedule", str(tmp_path / "schedule")),
                      env=env, log_file=tmp_path / "beat.log", cwd=tmp_path)
    flower = Supervised(celery_command("myapp", "flower", f"--port={port}",
                                       "--address=127.0.0.1"),
                        env=env, log_file=tmp_path / "flower.log", cwd=tmp_path)
    try:
        worker.start().wait_for_log(" ready.", 90)
        produced = subprocess.run([sys.executable, "-c", PRODUCER], env=env, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=120)
        assert produced.returncode == 0, produced.stderr
        assert json.loads(produced.stdout) == {"at_start": ["pg_broker"], "result": 5}

        pinged = subprocess.run(celery_command("myapp", "inspect", "ping", "-d", node, "--json"),
                                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90)
        assert pinged.returncode == 0, pinged.stdout + pinged.stderr
        assert json.loads(pinged.stdout.strip().splitlines()[-1]) == {node: {"ok": "pong"}}

        beat.start()
        wait_for(lambda: "myapp.tick" in worker.log() and "succeeded" in worker.log(), 90,
                 lambda: worker.describe("a tick sent by beat") + beat.describe("beat"))

        flower.start()
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: fetch(base + "/healthcheck")[0] == 200 or not flower.alive, 90,
                 lambda: flower.describe("Flower to answer /healthcheck"))
        # The Broker tab's reader is Flower's own only for amqp and redis URLs.
        lengths = wait_for(lambda: get_json(base + "/api/queues/length"), 60,
                           lambda: flower.describe("/api/queues/length"))
        assert queue in [q["name"] for q in lengths["active_queues"]], lengths
    finally:
        for process in (flower, beat, worker):
            process.kill()
