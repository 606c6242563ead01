"""Real Celery processes (workers, the celery CLI, Flower) for the end-to-end tests.

Every process runs in its own process group, logs to a file the test can show
when it fails, and is killed as a group when its test is done.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

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


def process_environment(database_url: str, **extra: str) -> dict[str, str]:
    """Environment for a subprocess using ``database_url`` as broker and result store."""
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env["PG_BROKER_URL"] = database_url
    env.update(extra)
    return env


def pgbroker_url(database_url: str) -> str:
    """The broker URL for a libpq URL: the same URL under the pgbroker scheme."""
    return "pgbroker://" + database_url.split("://", 1)[1]


def celery_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", APP_MODULE, *args]


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


class Process:
    """A long-running subprocess in its own process group, logging to a file."""

    def __init__(self, command: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.command = list(command)
        self.env = env
        self.log_path = log_path
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.command, cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def describe(self, what: str) -> str:
        return f"{what}; log of {' '.join(self.command)}:\n{self.log()[-6000:]}"

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int, group: bool = True) -> None:
        """Send ``signum`` to the process group (prefork children included) or the leader."""
        if self.popen is not None:
            try:
                if group:
                    os.killpg(self.popen.pid, signum)
                else:
                    self.popen.send_signal(signum)
            except ProcessLookupError:
                pass

    def wait_exit(self, timeout: float) -> int:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(self.describe(f"did not exit within {timeout}s")) from exc

    def kill(self) -> None:
        """SIGKILL the process group and reap the leader."""
        if self.popen is None:
            return
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            pass


class Worker(Process):
    """``celery worker`` in a subprocess, with a unique node name."""

    def __init__(
        self, env: dict[str, str], log_dir: Path, *, pool: str = "prefork", concurrency: int = 2,
        queues: Iterable[str] = ("e2e",), events: bool = False, extra_args: Sequence[str] = (),
    ) -> None:
        self.name = f"e2e-{pool}-{uuid.uuid4().hex[:8]}"
        self.nodename = f"{self.name}@{socket.gethostname()}"
        command = celery_command(
            "worker", f"--pool={pool}", f"--concurrency={concurrency}", "-n", f"{self.name}@%h",
            "-Q", ",".join(queues), "--loglevel=INFO", *(["-E"] if events else []), *extra_args,
        )
        super().__init__(command, env, log_dir / f"{self.name}.log")

    def start(self, timeout: float = 90) -> Worker:
        """Start the worker and wait until it logs that it is ready."""
        super().start()
        wait_for(
            lambda: not self.running or " ready." in self.log(), timeout,
            lambda: self.describe(f"worker {self.nodename} to be ready"),
        )
        assert self.running, self.describe(f"worker {self.nodename} exited during start-up")
        return self
