"""Child processes a harness starts and must be sure to stop: Celery workers,
Flower, the celery CLI.

One helper serves the demo (``tasks.demo``), the end-to-end tests and the
benchmark, because they need the same three guarantees:

- a child runs in a process group of its own (``start_new_session``), so a
  prefork worker's pool processes can be killed with it, and a Ctrl-C in the
  terminal reaches the harness only;
- its output goes to a log file, which is what a failure message shows;
- stopping is a warm shutdown first (SIGTERM to the leader: Celery finishes
  or returns what it holds), then SIGKILL to the whole group, so nothing is
  left behind however the child behaves.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT = 15.0


def celery_command(app: str, *args: str) -> list[str]:
    """``celery -A app <args>`` run by this interpreter."""
    return [sys.executable, "-m", "celery", "-A", app, *args]


def worker_command(
    app: str,
    *,
    hostname: str,
    pool: str = "prefork",
    concurrency: int | None = None,
    queues: Iterable[str] = (),
    events: bool = False,
    loglevel: str = "INFO",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line of ``celery -A app worker`` with the options every
    harness here sets."""
    command = celery_command(app, "worker", "--hostname", hostname, "--pool", pool,
                             "--loglevel", loglevel)
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    queues = list(queues)
    if queues:
        command += ["--queues", ",".join(queues)]
    if events:
        command.append("--task-events")
    return command + list(extra_args)


class Supervised:
    """A long-running child process in its own process group, logging to a file."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_file: Path | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        self.command = list(command)
        self.env = dict(os.environ if env is None else env)
        self.log_file = log_file
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self._terminated = False

    def start(self) -> Self:
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._terminated = False
            self.process = subprocess.Popen(
                self.command, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            if self.log_file:
                output.close()
        return self

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log(self) -> str:
        """Everything the process wrote so far ('' without a log file)."""
        if self.log_file is None or not self.log_file.exists():
            return ""
        return self.log_file.read_text(errors="replace")

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def describe(self, what: str) -> str:
        """``what`` followed by the end of the log: the text of a failure."""
        return f"{what}; log of {' '.join(self.command)}:\n{self.log()[-6000:]}"

    def signal(self, signum: int, group: bool = True) -> None:
        """Send ``signum`` to the process group (pool children included) or to the leader."""
        if self.process is None:
            return
        try:
            if group:
                os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        """The exit status; TimeoutError (with the log) if it runs on after ``timeout`` s."""
        if self.process is None:
            raise RuntimeError(f"{' '.join(self.command)} was never started")
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(self.describe(f"did not exit within {timeout:.0f} s")) from exc

    def wait_for_log(self, text: str, timeout: float, interval: float = 0.1) -> None:
        """Until ``text`` appears in the log. RuntimeError if the process exits
        first, TimeoutError after ``timeout`` seconds; both carry the log."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if not self.alive:
                raise RuntimeError(self.describe(f"exited (status {self.returncode}) before "
                                                 f"logging {text!r}"))
            if time.monotonic() > deadline:
                raise TimeoutError(self.describe(f"did not log {text!r} within {timeout:.0f} s"))
            time.sleep(interval)

    def terminate(self) -> None:
        """Ask for a warm shutdown: SIGTERM to the leader, once (a second
        SIGTERM can cut a shutdown short)."""
        if self.alive and not self._terminated:
            self.signal(signal.SIGTERM, group=False)
            self._terminated = True

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int | None:
        """Warm shutdown (SIGTERM to the leader), then SIGKILL to whatever is
        left of the group after ``timeout`` seconds. The exit status."""
        if self.alive:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                if timeout > 0:
                    log.warning("%s ignored SIGTERM for %.0f s; killing it",
                                " ".join(self.command), timeout)
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL to the whole group (pool children left behind too); the exit status."""
        if self.process is None:
            return None
        self.signal(signal.SIGKILL)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("process %d survived SIGKILL for 30 s", self.process.pid)
            return None


def stop_all(processes: Iterable[Supervised], timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
    """Stop several at once: SIGTERM to every leader, then one shared deadline."""
    processes = list(processes)
    for supervised in processes:
        supervised.terminate()
    deadline = time.monotonic() + timeout
    for supervised in processes:
        supervised.stop(max(0.1, deadline - time.monotonic()))
