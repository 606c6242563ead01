"""A real Flower attached to each broker's -E worker, as in production.

One ``celery -A bench.app flower`` per broker, started with the workers, given
the broker URL in its environment the way the workers get it, and stopped
before the idle measurement (and, being started through
:func:`bench.workers.spawn`, on any exit: failure, Ctrl-C, SIGTERM). Flower
runs with its defaults: its event thread consumes the worker's events into
its state and it broadcasts ``enable_events`` every 5 s.

While the events figure is measured, :func:`dashboard_open` plays a user with
Flower's dashboard open: the workers table refreshing itself every second (the
page's default auto-refresh, ``/workers?json=1``) and the Refresh button
pressed every ``INSPECT_INTERVAL`` seconds (``/api/workers?refresh=1``: Flower
inspects ``stats``, ``active_queues``, ``registered`` and ``conf`` of every
worker at once, waiting its 1 s inspect timeout for replies).

The -E worker and its Flower share a control exchange of their own
(:data:`bench.app.EVENTS_CONTROL_EXCHANGE`): Flower's broadcasts reach that
worker only, so the workers measured without events never get them turned on.
The events-per-task figure is Flower's own count (its per-worker event
counters, the numbers its dashboard shows), so no second event consumer adds
to the load.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.app import (
    BROKER_VARIABLE,
    CONTROL_EXCHANGE_VARIABLE,
    EVENTS_CONTROL_EXCHANGE,
    TRANSPORT_OPTIONS_VARIABLE,
)
from bench.brokers import Broker
from bench.workers import Measured, spawn
from pg_broker.processes import Supervised, celery_command

log = logging.getLogger(__name__)

START_TIMEOUT = 90.0  # Flower answering and showing the worker alive
TABLE_REFRESH = 1.0  # the dashboard's auto-refresh, seconds
INSPECT_INTERVAL = 2.0  # between presses of Refresh, seconds
HTTP_TIMEOUT = 20.0


class Flower(Measured):
    """``celery -A bench.app flower`` on one broker, on a free local port."""

    def __init__(self, broker: Broker, workdir: Path) -> None:
        self.broker = broker
        self.log_file = workdir / f"{broker.name}-flower.log"
        self.process: Supervised | None = None
        self.base = ""

    def start(self) -> None:
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        env = self.broker.worker_env()
        env.update({
            BROKER_VARIABLE: self.broker.url,
            TRANSPORT_OPTIONS_VARIABLE: self.broker.transport_options_json(),
            CONTROL_EXCHANGE_VARIABLE: EVENTS_CONTROL_EXCHANGE,
            "FLOWER_UNAUTHENTICATED_API": "true",
        })
        command = celery_command("bench.app", "flower", f"--port={port}", "--address=127.0.0.1")
        self.process = spawn(command, env, self.log_file)

    def wait_watching(self, nodename: str, timeout: float = START_TIMEOUT) -> None:
        """Until Flower shows the worker alive: its event receiver is then bound
        and it misses no task event. Raises RuntimeError with Flower's log."""
        deadline = time.monotonic() + timeout
        while not (self.get_json("/api/workers?status=1") or {}).get(nodename):
            if not self.alive:
                raise RuntimeError(f"Flower exited\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Flower did not show {nodename} alive within "
                                   f"{timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def task_events(self, nodename: str) -> int:
        """Task events (received, started, succeeded ...) Flower has counted
        for the worker, from the dashboard's own table."""
        table = self.get_json("/workers?json=1") or {}
        for row in table.get("data", []):
            if row.get("hostname") == nodename:
                return sum(count for kind, count in row.items()
                           if kind.startswith("task-") and isinstance(count, int))
        return 0

    def get_json(self, path: str) -> dict | None:
        """The decoded answer to a GET, or None when Flower does not answer 200."""
        try:
            with urllib.request.urlopen(self.base + path, timeout=HTTP_TIMEOUT) as response:
                return json.loads(response.read())
        except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, bad JSON
            log.debug("GET %s%s: %s", self.base, path, exc)
            return None


@contextmanager
def dashboard_open(flower: Flower) -> Iterator[None]:
    """A user on Flower's dashboard for the duration of the block (see the module doc)."""
    closed = threading.Event()

    def refresh_table() -> None:
        while not closed.wait(TABLE_REFRESH):
            flower.get_json("/workers?json=1")

    def press_refresh() -> None:
        while True:
            if flower.get_json("/api/workers?refresh=1") is None:
                log.warning("Flower on %s: inspect refresh failed", flower.broker.name)
            if closed.wait(INSPECT_INTERVAL):
                return

    threads = [threading.Thread(target=refresh_table, daemon=True),
               threading.Thread(target=press_refresh, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        closed.set()
        for thread in threads:  # no request of this run outlives it
            thread.join()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
