"""Celery worker (and Flower) subprocesses, each in its own process group.

Every process the harness starts goes through :func:`spawn`, is registered
here and killed, with its whole process group (prefork children included),
when the harness ends — normally, on an exception, on Ctrl-C or on SIGTERM.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.app import (
    BROKER_VARIABLE,
    CONTROL_EXCHANGE_VARIABLE,
    EVENTS_CONTROL_EXCHANGE,
    MARK_FILE_VARIABLE,
    RECORD,
    TRANSPORT_OPTIONS_VARIABLE,
)

log = logging.getLogger(__name__)

_running: list[subprocess.Popen] = []


def spawn(command: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen:
    """Start a process in a new session (its own process group), output to log_file."""
    env = dict(env)
    env["PYTHONPATH"] = _repo_root() + os.pathsep + env.get("PYTHONPATH", "")
    with open(log_file, "ab") as log_out:
        process = subprocess.Popen(
            command, env=env, cwd=_repo_root(), stdin=subprocess.DEVNULL,
            stdout=log_out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    _running.append(process)
    return process


def terminate(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the group, then SIGKILL whatever is left after timeout."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        if timeout > 0:
            log.warning("%s ignored SIGTERM for %.0fs; killing it", process.args, timeout)
    _signal_group(process, signal.SIGKILL)
    process.wait()
    if process in _running:
        _running.remove(process)


class Supervised:
    """A long-running subprocess started with :func:`spawn`: its liveness,
    resources, log and stop. Subclasses set ``process`` and ``log_file``."""

    process: subprocess.Popen | None
    log_file: Path

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the process and all its children."""
        return int(self._sum_over_tree(lambda proc: proc.memory_info().rss))

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process and its children so far."""
        # cpu_times() starts (user, system, ...)
        return self._sum_over_tree(lambda proc: sum(proc.cpu_times()[:2]))

    def _sum_over_tree(self, measure: Callable[[psutil.Process], float]) -> float:
        """``measure`` summed over the process and all its children (0 when it
        is not running; children that exit meanwhile count 0)."""
        if not self.alive:
            return 0.0
        parent = psutil.Process(self.process.pid)
        total = 0.0
        for proc in [parent, *parent.children(recursive=True)]:
            try:
                total += measure(proc)
            except psutil.NoSuchProcess:
                pass
        return total

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to the group (a worker's warm shutdown), then SIGKILL what is left."""
        if self.process is not None:
            terminate(self.process, timeout)


@dataclass
class Worker(Supervised):
    """One ``celery -A bench.app worker`` consuming one queue."""

    broker: str
    role: str  # solo | threads | prefork | events
    pool: str
    concurrency: int
    queue: str
    mark_file: Path
    log_file: Path
    events: bool = False
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def nodename(self) -> str:
        return f"bench-{self.role}-{self.broker}@{socket.gethostname()}"

    def start(self, broker_url: str, env: dict[str, str], transport_options: str) -> None:
        self.mark_file.write_bytes(b"")
        command = [
            sys.executable, "-m", "celery", "-A", "bench.app", "worker",
            "-P", self.pool, "-c", str(self.concurrency), "-Q", self.queue,
            "-n", self.nodename, "--without-gossip", "--without-mingle", "-l", "warning",
        ]
        worker_env = dict(env)
        if self.events:
            command.append("-E")
            # Shared with its Flower only (see bench.flower).
            worker_env[CONTROL_EXCHANGE_VARIABLE] = EVENTS_CONTROL_EXCHANGE
        worker_env[BROKER_VARIABLE] = broker_url
        worker_env[MARK_FILE_VARIABLE] = str(self.mark_file)
        worker_env[TRANSPORT_OPTIONS_VARIABLE] = transport_options
        self.process = spawn(command, worker_env, self.log_file)

    def marks(self) -> list[tuple[float, float]]:
        """(sent, started) of every task run since the file was last cleared."""
        data = self.mark_file.read_bytes()
        usable = len(data) - len(data) % RECORD.size
        return [RECORD.unpack_from(data, i) for i in range(0, usable, RECORD.size)]

    def mark_count(self) -> int:
        return self.mark_file.stat().st_size // RECORD.size

    def clear_marks(self) -> None:
        os.truncate(self.mark_file, 0)


def stop_all(processes: list[Supervised], timeout: float = 5.0) -> None:
    """Stop several workers (or Flowers) at once: signal them all, then wait."""
    for supervised in processes:
        if supervised.process is not None:
            _signal_group(supervised.process, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for supervised in processes:
        if supervised.process is not None:
            terminate(supervised.process, max(0.1, deadline - time.monotonic()))


def kill_all() -> None:
    """SIGKILL every process group still registered (end of run, atexit, signals)."""
    for process in list(_running):
        _signal_group(process, signal.SIGKILL)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        _running.remove(process)


def install_cleanup() -> None:
    """Kill the workers at exit and on SIGTERM/SIGHUP (Ctrl-C raises in Python)."""
    atexit.register(kill_all)

    def on_signal(signum, frame):
        kill_all()
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)
