"""Celery worker (and Flower) subprocesses, each in its own process group.

Every process the harness starts goes through :func:`spawn` (a
:class:`pg_broker.processes.Supervised`), is registered here and killed, with
its whole process group (prefork children included), when the harness ends —
normally, on an exception, on Ctrl-C or on SIGTERM.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
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
    RESULT_BACKEND_VARIABLE,
    TRANSPORT_OPTIONS_VARIABLE,
)
from pg_broker import processes
from pg_broker.processes import Supervised, worker_command

log = logging.getLogger(__name__)

_running: list[Supervised] = []


def spawn(command: list[str], env: dict[str, str], log_file: Path) -> Supervised:
    """Start a process from the repository (its own process group, output to
    log_file) and register it for :func:`kill_all`."""
    env = dict(env)
    env["PYTHONPATH"] = _repo_root() + os.pathsep + env.get("PYTHONPATH", "")
    process = Supervised(command, env=env, log_file=log_file, cwd=_repo_root()).start()
    _running.append(process)
    return process


class Measured:
    """A process of the run (a worker, a Flower): once started, a
    :class:`~pg_broker.processes.Supervised` child whose resources the
    benchmark reads with psutil. Subclasses set ``process`` and ``log_file``."""

    process: Supervised | None
    log_file: Path

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive

    def pids(self) -> list[int]:
        """The process and its children (empty when it is not running)."""
        if not self.alive:
            return []
        parent = psutil.Process(self.process.pid)
        return [parent.pid, *(child.pid for child in parent.children(recursive=True))]

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
        return self.process.log_tail(lines) if self.process is not None else ""

    def stop(self, timeout: float = 5.0) -> None:
        """Warm shutdown, then SIGKILL of what is left of the group."""
        if self.process is not None:
            self.process.stop(timeout)
            if self.process in _running:
                _running.remove(self.process)


@dataclass
class Worker(Measured):
    """One ``celery -A bench.app worker`` (or another app module) consuming one queue."""

    broker: str
    role: str  # solo | threads | prefork | events | results
    pool: str
    concurrency: int
    queue: str
    mark_file: Path
    log_file: Path
    events: bool = False
    app: str = "bench.app"  # the Celery app module (bench.roundtrip: with probes)
    process: Supervised | None = field(default=None, repr=False)

    @property
    def nodename(self) -> str:
        return f"bench-{self.role}-{self.broker}@{socket.gethostname()}"

    def start(self, broker_url: str, env: dict[str, str], transport_options: str,
              result_backend: str | None = None) -> None:
        self.mark_file.write_bytes(b"")
        command = worker_command(
            self.app, hostname=self.nodename, pool=self.pool, concurrency=self.concurrency,
            queues=[self.queue], events=self.events, loglevel="warning",
            extra_args=("--without-gossip", "--without-mingle"),
        )
        worker_env = dict(env)
        if self.events:
            # Shared with its Flower only (see bench.flower).
            worker_env[CONTROL_EXCHANGE_VARIABLE] = EVENTS_CONTROL_EXCHANGE
        worker_env[BROKER_VARIABLE] = broker_url
        worker_env[MARK_FILE_VARIABLE] = str(self.mark_file)
        worker_env[TRANSPORT_OPTIONS_VARIABLE] = transport_options
        worker_env[RESULT_BACKEND_VARIABLE] = result_backend or ""
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


def stop_all(measured: list[Measured], timeout: float = 5.0) -> None:
    """Stop several workers (or Flowers) at once: signal them all, then wait."""
    started = [m.process for m in measured if m.process is not None]
    processes.stop_all(started, timeout)
    for process in started:
        if process in _running:
            _running.remove(process)


def kill_all() -> None:
    """SIGKILL every process group still registered (end of run, atexit, signals)."""
    while _running:
        _running.pop().kill()


def install_cleanup() -> None:
    """Kill the workers at exit and on SIGTERM/SIGHUP (Ctrl-C raises in Python)."""
    atexit.register(kill_all)

    def on_signal(signum, frame):
        kill_all()
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)
