"""Test-only tasks for tests/test_worker_app.py, loaded into the worker with
``--include tests.worker_app_tasks``."""

from __future__ import annotations

import os
import signal

from tasks import app


@app.task(name="tests.worker_app_tasks.kill_own_process")
def kill_own_process() -> None:
    """A poison message: every delivery kills the pool process running it."""
    os.kill(os.getpid(), signal.SIGKILL)
