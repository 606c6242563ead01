"""The Celery app of the cutover test: the same task on both brokers.

``CUTOVER_BROKER`` is the worker's broker (the old Redis or pgbroker);
``CUTOVER_LABEL`` names it in the record the task writes, so the test sees
which broker delivered each task.
"""

from __future__ import annotations

import os

from celery import Celery

import pg_broker  # noqa: F401  (registers the pgbroker scheme)

app = Celery("cutover")
app.conf.update(
    broker_url=os.environ.get("CUTOVER_BROKER", "redis://127.0.0.1:6379/0"),
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


@app.task(name="cutover.record")
def record(path: str, token: str) -> None:
    with open(path, "a") as log:
        log.write(f"{os.environ.get('CUTOVER_LABEL', '?')} {token}\n")
