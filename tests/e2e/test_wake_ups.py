"""No lost wake-up under a real worker's hub: with its safety poll off, a
Celery worker runs every task of a stream whose spacing keeps it going from
busy to waiting and back (migrations/core/131)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from celery import Celery
from celery_workers import Worker, process_environment

pytestmark = pytest.mark.slow
pytest_plugins = ["celery_session"]


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_worker_that_never_polls_runs_every_task(
        app: Celery, database_url: str, tmp_path: Path, pool: str) -> None:
    env = process_environment(database_url,
                              E2E_TRANSPORT_OPTIONS=json.dumps({"polling_interval": 3600}))
    rng = random.Random(7)
    worker = Worker(env, tmp_path, pool=pool, concurrency=2).start()
    try:
        results = []
        for n in range(200):
            results.append(app.tasks["e2e.add"].delay(n, 1))
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0, 0.02))
        # A lost wake-up leaves its task for the next poll, an hour away.
        assert [r.get(timeout=60) for r in results] == [n + 1 for n in range(200)]
    finally:
        worker.stop()
