"""Real Celery processes (workers, the celery CLI, Flower) for the end-to-end tests.

Every long-running process is a :class:`pg_broker.processes.Supervised`: its
own process group, a log file the test shows when it fails, killed as a group
when its test is done.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from pg_broker import processes
from pg_broker.processes import Supervised, worker_command
from pg_broker.urls import broker_url as pgbroker_url  # noqa: F401  (the tests' name for it)

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_MODULE = "tests.celery_app"
T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float, describe: str | Callable[[], str],
    interval: float = 0.1,
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for: "
                f"{describe() if callable(describe) else describe}"
            )
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(url: str) -> tuple[int, str]:
    """GET ``url``: (status, body), (0, the error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError as error:
        return 0, str(error)


def get_json(url: str):
    """The JSON body of a 200 answer to GET ``url``, else None."""
    status, body = fetch(url)
    return json.loads(body) if status == 200 else None


def process_environment(database_url: str, **extra: str) -> dict[str, str]:
    """Environment for a subprocess using ``database_url`` as broker and result store."""
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env["PG_BROKER_URL"] = database_url
    env.update(extra)
    return env


def celery_command(*args: str) -> list[str]:
    """``celery -A tests.celery_app <args>``."""
    return processes.celery_command(APP_MODULE, *args)


def run_celery(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run the celery CLI once (``celery -A tests.celery_app <args>``) and return its outcome."""
    return subprocess.run(
        celery_command(*args), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def run_celery_json(env: dict[str, str], *args: str, timeout: float = 90) -> dict:
    """Run a celery remote-control command with ``--json`` and parse its reply."""
    done = run_celery(env, *args, "--json", timeout=timeout)
    assert done.returncode == 0, f"celery {' '.join(args)} failed: {done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


class Worker(Supervised):
    """``celery worker`` in a subprocess, with a unique node name."""

    def __init__(
        self, env: dict[str, str], log_dir: Path, *, pool: str = "prefork", concurrency: int = 2,
        queues: Iterable[str] = ("e2e",), events: bool = False, extra_args: Sequence[str] = (),
    ) -> None:
        self.name = f"e2e-{pool}-{uuid.uuid4().hex[:8]}"
        self.nodename = f"{self.name}@{socket.gethostname()}"
        command = worker_command(
            APP_MODULE, hostname=f"{self.name}@%h", pool=pool, concurrency=concurrency,
            queues=queues, events=events, extra_args=extra_args,
        )
        super().__init__(command, env=env, log_file=log_dir / f"{self.name}.log", cwd=REPO_ROOT)

    def start(self, timeout: float = 90) -> Worker:
        """Start the worker and wait until it logs that it is ready."""
        super().start()
        self.wait_for_log(" ready.", timeout)
        return self


def process(command: Sequence[str], env: dict[str, str], log_file: Path) -> Supervised:
    """A long-running celery process (Flower, ``celery events``) run from the repository."""
    return Supervised(command, env=env, log_file=log_file, cwd=REPO_ROOT)
