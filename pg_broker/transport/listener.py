"""Wake-ups: one LISTEN connection per transport.

Every publish runs ``pg_broker_wake(queue)`` in the same statement as its
INSERT: when a consumer waits on the queue (see :mod:`.poller`), it notifies
that consumer's own channel (:attr:`Listener.waiter_channel`, the queue as
payload), or, when no waiter is free, the queue's channel,
``'pgbroker_' || md5(queue)``, which every consumer of the queue LISTENs on
(as do plain ``NOTIFY``s from SQL). So a consumer hears about a message when
its row is committed. A notification is only a wake-up: the consumer then
claims rows with the usual statement, and a slow safety poll covers any
notification lost while the connection was down. Channel names are hashed
because PostgreSQL identifiers hold at most 63 bytes and Celery queue names
hold ``@`` and ``.``.

The LISTEN connection may take a URL of its own (the ``listen_url`` transport
option, or ``PG_BROKER_LISTEN_URL``): behind a transaction-mode pooler, LISTEN
runs on a pooled server session that is handed to other clients, and its
notifications are dropped (PgBouncer: "got packet 'A' from server when not
linked"), so the listener must reach the database directly or through a
session-mode pooler. Whether notifications arrive is checked, not assumed:
:class:`Listener` sends itself a probe (a NOTIFY on a channel of its own,
sent on the work connection) when it connects and whenever it heard nothing
for ``PROBE_INTERVAL``; a probe not heard within ``PROBE_PATIENCE`` is
logged as a warning, naming the fix — wake-ups then come only from the
safety poll, every ``polling_interval``.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from time import monotonic

import psycopg
from psycopg import sql

from pg_broker import forking
from pg_broker.masking import mask_url, redacting
from pg_broker.queries import queries

from . import deadline
from .connections import close_quietly

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "pgbroker_"
# A probe goes out when the listener heard nothing for this many seconds (a
# busy listener never sends one). Every NOTIFY signals every listening
# session of the database: rare, so that hundreds of idle workers cost little.
PROBE_INTERVAL = 600.0
# A probe not heard within this many seconds means notifications are lost.
PROBE_PATIENCE = 5.0


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

    def __init__(self, conninfo: str, connect_kwargs: dict, response_timeout: float = 0,
                 notify: Callable[[str], None] | None = None) -> None:
        """``notify(channel)`` sends a notification on another session (the
        probe's); None: no probe."""
        self._conninfo = conninfo
        self._connect_kwargs = connect_kwargs
        self._response_timeout = response_timeout
        self._queues: dict[str, str] = {}  # channel -> queue
        self.conn: psycopg.Connection | None = None
        self._notify = notify
        self._probe_channel = f"{CHANNEL_PREFIX}probe_{secrets.token_hex(8)}"
        # A publish wakes one waiting consumer on a channel of its own, the
        # queue as payload (migrations/core/140).
        self.waiter_channel = _waiter_channel()
        # The advisory lock the LISTEN session holds while it lives, named
        # by this consumer's waiter records (migrations/core/210).
        self.session_lock: int | None = None
        self._heard_at: float | None = None  # last notification of any channel
        self._probe_sent_at: float | None = None  # the probe awaited, if any
        self.notifications_lost = False
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
        self._listen(self.waiter_channel)
        self.session_lock = self._lock_session()
        if self._notify is not None:
            self._listen(self._probe_channel)
            self._heard_at = self._probe_sent_at = None  # a new session: probe it

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

    def check_notifications(self) -> None:
        """Send a probe when one is due, and judge the one awaited: call it
        now and then (the safety poll does) while connected."""
        if self._notify is None or not self.connected:
            return
        now = monotonic()
        if self._probe_sent_at is not None:
            if self._heard_at is not None and self._heard_at >= self._probe_sent_at:
                self._probe_sent_at = None
                if self.notifications_lost:
                    self.notifications_lost = False
                    log.info("notifications arrive again on the LISTEN connection")
            elif now - self._probe_sent_at > PROBE_PATIENCE:
                self._probe_sent_at = None
                self._heard_at = now  # the next probe after PROBE_INTERVAL
                if not self.notifications_lost:
                    self.notifications_lost = True
                    log.warning(
                        "notifications do not arrive on the LISTEN connection (%s): a probe "
                        "sent %.0f s ago was not heard, so workers wake only at the safety "
                        "poll. A transaction-mode pooler (PgBouncer, Supavisor on port 6543) "
                        "drops them: point the transport option listen_url, or "
                        "PG_BROKER_LISTEN_URL, at the database directly or at a session-mode "
                        "pooler", mask_url(self._conninfo), PROBE_PATIENCE)
            return
        if self._heard_at is None or now - self._heard_at > PROBE_INTERVAL:
            self._probe_sent_at = now
            self._notify(self._probe_channel)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        close_quietly(conn)

    def forget_after_fork(self) -> None:
        """In a forked child: the connection is the parent's (see
        :mod:`pg_broker.forking`); the child LISTENs on one of its own."""
        forking.disown(self.conn)
        self.conn = None
        self.session_lock = None
        self._probe_channel = f"{CHANNEL_PREFIX}probe_{secrets.token_hex(8)}"
        self.waiter_channel = _waiter_channel()
        self._heard_at = self._probe_sent_at = None

    def _lock_session(self) -> int:
        """Take an advisory lock of a random key for this session's life: a
        publish that finds it free knows this consumer's waiter records are
        dead (its session ended) and wakes the next waiter instead."""
        while True:
            key = secrets.randbits(32) - 2**31
            if self.conn.execute(queries["transport_listener_lock"], {"key": key}).fetchone()[0]:
                return key

    def _listen(self, channel: str) -> None:
        self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def _collect(self, notifies) -> set[str]:
        queues = set()
        for notify in notifies:
            self._heard_at = monotonic()
            if notify.channel == self.waiter_channel:
                if notify.payload in self._listened:
                    queues.add(notify.payload)
                continue
            queue = self._queues.get(notify.channel)
            if queue is not None:
                queues.add(queue)
        return queues

    @property
    def _listened(self) -> set[str]:
        return set(self._queues.values())


def _waiter_channel() -> str:
    return f"{CHANNEL_PREFIX}w_{secrets.token_hex(16)}"
