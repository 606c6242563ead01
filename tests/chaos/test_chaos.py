"""The chaos suite's short version, in the normal test run: one kill -9 round
and one round of pg_terminate_backend, a few hundred tasks each, on a private
PostgreSQL server with real Celery workers. Nothing enqueued may be lost.

The full suite, with every scenario, Redis beside pg_broker and the table of
figures: ``python -m tests.chaos`` (README, "Reliability").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Ledger
from .scenarios import Load, run
from .servers import PostgresServer

pytestmark = pytest.mark.slow

# 300 tasks in 3 s; a lease of 3 s and reclaim every second, so the messages
# of a killed worker come back within seconds.
LOAD = Load(tasks=300, rate=100, work_seconds=0.01, lease=3, maintenance=1, fault_every=1.5)


@pytest.fixture(scope="module")
def ledger() -> Iterator[Ledger]:
    server = PostgresServer("chaos_ledger").start()
    try:
        yield Ledger(server)
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chaos-logs")


@pytest.mark.parametrize("scenario", ["kill9-prefork", "terminate-sessions"])
def test_a_fault_round_loses_no_message(scenario: str, ledger: Ledger, log_dir: Path) -> None:
    figures = run(scenario, "pgbroker", ledger, log_dir, LOAD, rounds=1)
    assert figures.enqueued > 0 and not figures.publish_errors, figures
    assert figures.lost == 0 and figures.undelivered == 0, figures
    assert figures.executed == figures.enqueued, figures
