"""Metrics for autoscalers and Prometheus, read from the database.

Every figure is read from ``job_tasks`` when asked (the named queries
``queue_backlog`` and ``metrics_queues``), so any process that can reach the
database reports the same numbers, and nothing is counted on the hot path:

- :func:`backlog`: one queue's ready and delayed messages and the age of its
  oldest ready one — the statement KEDA's PostgreSQL scaler (or any
  autoscaler) runs (README, *Autoscaling*);
- :func:`exposition`: those figures for every queue, plus held leases, how
  many were renewed, expired ones not yet reclaimed, the seconds since the
  stalest renewal and the dead letters, in Prometheus's text format;
- :func:`serve`: that text over HTTP at ``/metrics`` (``pg-broker metrics
  --serve``), read afresh on every scrape on a connection of its own.

Lease renewals are read from the rows (``last_heartbeat`` after
``claimed_at``), not counted: a counter would cost a write per renewal.
"""

from __future__ import annotations

import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import psycopg

from pg_broker.database import DatabaseUnavailable, connect
from pg_broker.masking import first_line
from pg_broker.queries import queries

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_PORT = 9808


class Backlog(NamedTuple):
    """One queue's backlog (``queue_backlog``)."""

    ready: int
    delayed: int
    oldest_ready_age: float  # seconds; 0 when nothing is ready


class QueueFigures(NamedTuple):
    """A row of ``metrics_queues``."""

    queue: str
    ready: int
    delayed: int
    oldest_ready_age: float
    held: int
    renewed: int
    expired: int
    renewal_age: float
    dead: int


# Metric name, the QueueFigures field it reports, its help text.
METRICS = (
    ("pg_broker_queue_ready", "ready", "Messages ready to deliver now."),
    ("pg_broker_queue_delayed", "delayed",
     "Messages waiting for their ETA, countdown or retry backoff."),
    ("pg_broker_queue_oldest_ready_age_seconds", "oldest_ready_age",
     "Seconds the oldest ready message has waited since it became deliverable."),
    ("pg_broker_leases_held", "held", "Messages a worker holds under a lease."),
    ("pg_broker_leases_renewed", "renewed",
     "Held messages whose lease was renewed at least once since their claim."),
    ("pg_broker_leases_expired", "expired",
     "Held messages whose lease expired, not yet reclaimed by the watchdog."),
    ("pg_broker_lease_renewal_age_seconds", "renewal_age",
     "Seconds since the stalest held lease was renewed (or claimed)."),
    ("pg_broker_dead_letters", "dead", "Tasks dead or failed for good (pg-broker dead list)."),
)


def backlog(conn: psycopg.Connection, queue: str) -> Backlog:
    """``queue``'s ready and delayed messages and its oldest ready one's age."""
    return Backlog._make(conn.execute(queries["queue_backlog"], {"queue": queue}).fetchone())


def queue_figures(conn: psycopg.Connection) -> list[QueueFigures]:
    """The figures of every queue with messages or dead letters, or declared durable."""
    return [QueueFigures._make(row) for row in conn.execute(queries["metrics_queues"])]


def exposition(conn: psycopg.Connection) -> str:
    """Every queue's figures in Prometheus's text exposition format."""
    figures = queue_figures(conn)
    lines = []
    for name, field, help_text in METRICS:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        for row in figures:
            lines.append(f'{name}{{queue="{_label(row.queue)}"}} {_number(getattr(row, field))}')
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A label value as the format escapes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?", 1)[0] != "/metrics":
            self._reply(404, "only /metrics is served here\n")
            return
        try:
            with connect(self.server.url, autocommit=True) as conn:
                body = exposition(conn)
        except (DatabaseUnavailable, psycopg.Error) as exc:
            log.warning("metrics scrape failed: %s", first_line(exc))
            self._reply(503, f"the database did not answer: {first_line(exc)}\n")
            return
        self._reply(200, body)

    def _reply(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
        log.debug("%s " + format, self.address_string(), *args)


class MetricsServer(ThreadingHTTPServer):
    """``/metrics`` of the database at ``url``, one connection per scrape."""

    daemon_threads = True

    def __init__(self, url: str, host: str, port: int) -> None:
        self.url = url
        super().__init__((host, port), _Handler)


def serve(url: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Serve ``/metrics`` until interrupted."""
    with MetricsServer(url, host, port) as server:
        log.info("metrics at http://%s:%d/metrics", *server.server_address[:2])
        server.serve_forever()
