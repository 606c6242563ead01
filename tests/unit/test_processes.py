"""The one supervisor of child processes (workers, Flower, the celery CLI):
command lines, logs, and stopping the whole process group."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from pg_broker.processes import Supervised, stop_all, worker_command

# A leader that ignores SIGTERM and leaves a child behind: what a stuck
# prefork worker looks like to its harness.
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("child", child.pid, flush=True)
time.sleep(120)
"""
# A leader that stops on SIGTERM, as a Celery worker's warm shutdown does.
POLITE = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready.", flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie of an exited child counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_a_worker_command_line_names_the_app_and_every_option() -> None:
    command = worker_command("tasks", hostname="w1@%h", pool="solo", concurrency=3,
                             queues=["audio", "default"], events=True, loglevel="warning",
                             extra_args=("--without-gossip",))
    assert command == [sys.executable, "-m", "celery", "-A", "tasks", "worker",
                       "--hostname", "w1@%h", "--pool", "solo", "--loglevel", "warning",
                       "--concurrency", "3", "--queues", "audio,default", "--task-events",
                       "--without-gossip"]
    assert "--queues" not in worker_command("tasks", hostname="w")


def test_a_warm_stop_ends_the_leader_with_its_own_exit_status(tmp_path: Path) -> None:
    polite = Supervised([sys.executable, "-c", POLITE], log_file=tmp_path / "polite.log").start()
    polite.wait_for_log("ready.", timeout=30)
    assert polite.stop(timeout=30) == 0
    assert not polite.alive


def test_a_leader_that_ignores_sigterm_is_killed_with_its_whole_group(tmp_path: Path) -> None:
    stubborn = Supervised([sys.executable, "-c", STUBBORN], log_file=tmp_path / "stubborn.log")
    stubborn.start().wait_for_log("child", timeout=30)
    child = int(stubborn.log().split()[1])

    stubborn.stop(timeout=0.5)

    assert not stubborn.alive
    deadline = time.monotonic() + 10
    while not _gone(child):
        assert time.monotonic() < deadline, "the leader's child survived the group kill"
        time.sleep(0.05)


def test_a_process_that_exits_early_is_reported_with_its_log(tmp_path: Path) -> None:
    failing = Supervised([sys.executable, "-c", "print('no broker here'); raise SystemExit(3)"],
                         log_file=tmp_path / "failing.log").start()
    with pytest.raises(RuntimeError, match=r"exited \(status 3\).*no broker here"):
        failing.wait_for_log(" ready.", timeout=30)


def test_waiting_too_long_says_so_with_the_log(tmp_path: Path) -> None:
    sleeper = Supervised([sys.executable, "-c", "print('starting', flush=True);"
                          "import time; time.sleep(60)"], log_file=tmp_path / "sleeper.log").start()
    try:
        sleeper.wait_for_log("starting", timeout=30)
        with pytest.raises(TimeoutError, match=r"did not exit within 0 s.*starting"):
            sleeper.wait(0.2)
    finally:
        sleeper.kill()


def test_stop_all_stops_several_under_one_deadline(tmp_path: Path) -> None:
    group = [Supervised([sys.executable, "-c", POLITE], log_file=tmp_path / f"{n}.log").start()
             for n in range(3)]
    for supervised in group:
        supervised.wait_for_log("ready.", timeout=30)
    stop_all(group, timeout=30)
    assert [s.returncode for s in group] == [0, 0, 0]
