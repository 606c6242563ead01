"""Wake-ups: one LISTEN connection per transport.

Every publish runs ``pg_notify('pgbroker_' || md5(queue), '')`` in the same
statement as its INSERT, so a consumer hears about a message when its row is
committed. A notification is only a wake-up: the consumer then claims rows
with the usual statement, and a slow safety poll covers any notification lost
while the connection was down. Channel names are hashed because PostgreSQL
identifiers hold at most 63 bytes and Celery queue names hold ``@`` and ``.``.
"""

from __future__ import annotations

import hashlib

import psycopg
from psycopg import sql

from pg_broker import forking
from pg_broker.masking import redacting

from . import deadline
from .connections import close_quietly

CHANNEL_PREFIX = "pgbroker_"


def channel_name(queue: str) -> str:
    """The NOTIFY channel of ``queue`` (the SQL side computes the same)."""
    return CHANNEL_PREFIX + hashlib.md5(queue.encode("utf-8")).hexdigest()


class Listener:
    """An autocommit connection that LISTENs on the channels of some queues.

    The worker's hub watches :meth:`fileno` and calls :meth:`read`; clients
    call :meth:`wait`. Both return the queues that were notified. Connection
    errors propagate: the transport's caller (Celery's consumer, or kombu's
    retry) reconnects, and the transport polls every queue after a reconnect.
    """

    def __init__(self, conninfo: str, connect_kwargs: dict, response_timeout: float = 0) -> None:
        self._conninfo = conninfo
        self._connect_kwargs = connect_kwargs
        self._response_timeout = response_timeout
        self._queues: dict[str, str] = {}  # channel -> queue
        self.conn: psycopg.Connection | None = None
        forking.forget_in_child(self)

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def connect(self) -> None:
        """Open the connection (if needed) and LISTEN on every known channel."""
        if self.connected:
            return
        with redacting(self._conninfo):
            self.conn = deadline.connect(self._conninfo, self._response_timeout,
                                         autocommit=True, **self._connect_kwargs)
        for channel in self._queues:
            self._listen(channel)

    def listen(self, queue: str) -> None:
        channel = channel_name(queue)
        if channel in self._queues:
            return
        self._queues[channel] = queue
        if self.connected:
            self._listen(channel)

    def fileno(self) -> int:
        assert self.conn is not None
        return self.conn.fileno()

    def read(self) -> set[str]:
        """Queues notified since the last read, without blocking."""
        return self._collect(self.conn.notifies(timeout=0))

    def wait(self, timeout: float) -> set[str]:
        """Block up to ``timeout`` seconds for the first notifications."""
        self.connect()
        notified = self._collect(self.conn.notifies(timeout=timeout, stop_after=1))
        if notified:
            notified |= self.read()
        return notified

    def close(self) -> None:
        conn, self.conn = self.conn, None
        close_quietly(conn)

    def forget_after_fork(self) -> None:
        """In a forked child: the connection is the parent's (see
        :mod:`pg_broker.forking`); the child LISTENs on one of its own."""
        forking.disown(self.conn)
        self.conn = None

    def _listen(self, channel: str) -> None:
        self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def _collect(self, notifies) -> set[str]:
        queues = set()
        for notify in notifies:
            queue = self._queues.get(notify.channel)
            if queue is not None:
                queues.add(queue)
        return queues
