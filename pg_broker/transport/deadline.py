"""Replies that never come: a deadline on the transport's connections.

A database that stops answering without closing the connection leaves libpq
waiting for ever: the worker's event loop stops inside a claim and never
notices. TCP keepalives and ``tcp_user_timeout`` (``CONNECT_DEFAULTS`` in
:mod:`.connections`) cover the case where packets are dropped. They see nothing
when something on the path still acknowledges what it is sent but forwards no
reply: a proxy, PgBouncer or load balancer that hangs, a server that stopped
responding. Measured with the chaos suite's proxy (tests/chaos), which stops
forwarding without closing: workers hung for the whole 40 s cut and never
logged a lost connection.

So the work and LISTEN connections are :class:`WatchedConnection`: while one
of them waits for a reply that has no timeout of its own, a watchdog thread
(one per process) looks at it every second, and after ``response_timeout``
seconds shuts its socket down. The waiting statement then fails with
``OperationalError`` like any lost connection, and the transport's callers do
what they do after a restart of the database: Celery's consumer reconnects,
the lease thread retries, a producer's publish is retried by kombu.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from pg_broker import forking

log = logging.getLogger(__name__)

# How often (seconds) the watchdog looks at the connections it watches.
CHECK_INTERVAL = 1.0


class WatchedConnection(psycopg.Connection):
    """A psycopg connection whose waits for a reply the watchdog can cut short."""

    response_timeout: float = 0.0  # seconds; 0: no deadline
    waiting_since: float | None = None  # monotonic time the current wait began
    cut_after: float | None = None  # seconds it had waited when the watchdog cut it

    def wait(self, gen, *args, **kwargs):
        if kwargs.get("timeout") is not None:  # a bounded wait (notifies(timeout=...))
            return super().wait(gen, *args, **kwargs)
        with waiting(self):
            return super().wait(gen, *args, **kwargs)


@contextmanager
def waiting(conn: psycopg.Connection) -> Iterator[None]:
    """Mark ``conn`` as waiting for a reply, for the watchdog (any blocking call
    on it: psycopg's own waits, or libpq's synchronous ``exec_prepared``)."""
    if not isinstance(conn, WatchedConnection) or not conn.response_timeout:
        yield
        return
    conn.waiting_since = time.monotonic()
    try:
        yield
    except psycopg.OperationalError as exc:
        if conn.cut_after is None:
            raise
        raise psycopg.OperationalError(
            f"the database sent no reply for {conn.cut_after:.0f} s (response_timeout "
            f"{conn.response_timeout:g} s): connection dropped; it is opened again"
        ) from exc
    finally:
        conn.waiting_since = None


def connect(conninfo: str, response_timeout: float, **kwargs) -> psycopg.Connection:
    """``psycopg.connect`` for the transport: a watched connection when
    ``response_timeout`` is positive."""
    conn = WatchedConnection.connect(conninfo, **kwargs)
    if response_timeout > 0:
        conn.response_timeout = response_timeout
        _watchdog.watch(conn)
    return conn


class _Watchdog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: weakref.WeakSet[WatchedConnection] = weakref.WeakSet()
        self._thread: threading.Thread | None = None

    def watch(self, conn: WatchedConnection) -> None:
        with self._lock:
            self._conns.add(conn)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="pg_broker-deadline", daemon=True)
                self._thread.start()

    def forget_after_fork(self) -> None:
        """In a forked child: the thread did not survive, the connections are
        the parent's (see :mod:`pg_broker.forking`)."""
        self._lock = threading.Lock()
        self._conns = weakref.WeakSet()
        self._thread = None

    def _run(self) -> None:
        while True:
            time.sleep(CHECK_INTERVAL)
            with self._lock:
                conns = list(self._conns)
            now = time.monotonic()
            for conn in conns:
                since = conn.waiting_since
                if since is not None and now - since > conn.response_timeout and not conn.closed:
                    _cut(conn, now - since)


def _cut(conn: WatchedConnection, waited: float) -> None:
    """Shut the socket down under the waiting call (the descriptor stays libpq's)."""
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        return
    log.warning("no reply from the database for %.0f s on a broker connection "
                "(response_timeout %g s): dropping it", waited, conn.response_timeout)
    conn.cut_after = waited
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:
        log.debug("shutting down a broker connection's socket failed: %s", exc)


_watchdog = _Watchdog()
forking.forget_in_child(_watchdog)
