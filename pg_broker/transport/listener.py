"""Wake-ups: one LISTEN connection per process and database.

(Longer than ~400 lines on purpose: the shared session, :class:`ListenSession`,
and each transport's subscriptions to it, :class:`Listener`, hand
notifications and wake-ups across threads under one lock discipline —
whoever reads the socket dispatches for everyone, a lost session is replaced
once for all — that is easier to check in one file than across two.)

Every publish runs ``pg_broker_wake(queue)`` in the same statement as its
INSERT: when a consumer waits on the queue (see :mod:`.poller`), it notifies
that consumer's own channel (:attr:`Listener.waiter_channel`, the queue as
payload), or, when no waiter is free, the queue's channel,
``'pgbroker_' || md5(queue)``, which every consumer of the queue LISTENs on
(as do plain ``NOTIFY``s from SQL). So a consumer hears about a message when
its row is committed. Such a notification is only a wake-up: the consumer
then claims rows with the usual statement, and a slow safety poll covers any
notification lost while the connection was down. A plain message published
to a consumer that waits and takes hand-offs is another kind: the publish
inserted its row already claimed for that consumer, and the notification on
the consumer's own channel carries it (:func:`.messages.hand_off`,
migrations/core/220). Channel names are hashed
because PostgreSQL identifiers hold at most 63 bytes and Celery queue names
hold ``@`` and ``.``.

Every kombu connection of a process that consumes (a worker's consumer,
Flower's event receiver and each of its concurrent inspect calls) has a
:class:`Listener`, and all of them LISTEN on one :class:`ListenSession` per
process and database (:func:`shared_session`): Flower held one LISTEN
connection per kombu connection (5 of its 6 connections when idle). Each
listener subscribes to its channels; whoever reads the session's socket
(the worker's hub, or a thread waiting in ``drain_events``) hands every
notification to the listeners of its channel, and wakes a listener that
waits in another thread (:meth:`Listener.wake_with`). When the session is
lost, whoever finds out opens a new one (LISTENing on every channel again)
and every listener learns it at its next look (:meth:`Listener.reconnected`):
notifications sent meanwhile are lost, so each polls its queues.

The result backend's waiters are members too (:func:`session_for`,
:mod:`pg_broker.results.waiting`): they subscribe to their results' channels
and send their LISTENs themselves, in the round trip of their records and
read, so a process that consumes and awaits results holds one LISTEN
connection, not two.

The session holds an advisory lock of a random key while it lives
(:attr:`ListenSession.session_lock`), which its consumers' waiter records
name: a publish that finds the lock free knows the session ended (a killed
worker) and wakes the next waiter instead (migrations/core/210).

The LISTEN connection may take a URL of its own (the ``listen_url`` transport
option, or ``PG_BROKER_LISTEN_URL``): behind a transaction-mode pooler, LISTEN
runs on a pooled server session that is handed to other clients, and its
notifications are dropped (PgBouncer: "got packet 'A' from server when not
linked"), so the listener must reach the database directly or through a
session-mode pooler. Whether notifications arrive is checked, not assumed:
the session sends itself a probe (a NOTIFY on a channel of its own, sent on
a work connection) when it connects and whenever it heard nothing for
``PROBE_INTERVAL``; a probe not heard within ``PROBE_PATIENCE`` is logged as
a warning, naming the fix — wake-ups then come only from the safety poll,
every ``polling_interval``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import select
import threading
from collections.abc import Callable, Iterable
from time import monotonic

import psycopg
from psycopg import sql

from pg_broker import forking
from pg_broker.database import session_defaults
from pg_broker.masking import mask_url, redacting
from pg_broker.queries import queries

from . import deadline
from .connections import CONNECT_DEFAULTS, PerProcess, close_quietly
from .messages import HandOff, hand_off
from .options import DEFAULT_RESPONSE_TIMEOUT

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "pgbroker_"
# A probe goes out when the session heard nothing for this many seconds (a
# busy session never sends one). Every NOTIFY signals every listening
# session of the database: rare, so that hundreds of idle workers cost little.
PROBE_INTERVAL = 600.0
# A probe not heard within this many seconds means notifications are lost.
PROBE_PATIENCE = 5.0


def channel_name(queue: str) -> str:
    """The NOTIFY channel of ``queue`` (the SQL side computes the same)."""
    return CHANNEL_PREFIX + hashlib.md5(queue.encode("utf-8")).hexdigest()


def shared_session(conninfo: str, connect_kwargs: dict, response_timeout: float) -> ListenSession:
    """The process's LISTEN session on this database, shared by its listeners."""
    return _sessions.get(conninfo, connect_kwargs, response_timeout)


def session_for(conninfo: str) -> ListenSession:
    """The process's LISTEN session on ``conninfo`` for the result backend's
    waiters (:mod:`pg_broker.results.waiting`): the one its transports use,
    whatever their options, else one with the transport's defaults (which a
    transport with defaults, made later, shares)."""
    return _sessions.find(conninfo) or shared_session(
        conninfo, session_defaults(conninfo, CONNECT_DEFAULTS), DEFAULT_RESPONSE_TIMEOUT)


def _server_probes(parameters: dict[str, str]) -> dict[str, str]:
    """The server-side TCP keepalive and user-timeout settings for a LISTEN
    session: the client's own (its connection parameters, CONNECT_DEFAULTS
    unless the URL says otherwise); zeros (the server's defaults) when the
    URL turned keepalives off."""
    probing = parameters.get("keepalives", "1") != "0"
    probes = {key: parameters.get(f"keepalives_{key}", "0") if probing else "0"
              for key in ("idle", "interval", "count")}
    return {**probes, "user_timeout": parameters.get("tcp_user_timeout", "0")}


class ListenSession:
    """An autocommit connection LISTENing for every listener of the process.

    Opened when its first listener joins, again after it was lost, closed
    when its last listener leaves. Statements and reads hold :attr:`lock` for
    their round trip only; waiting for the socket happens without it.
    """

    def __init__(self, conninfo: str, connect_kwargs: dict, response_timeout: float) -> None:
        self._conninfo = conninfo
        self._connect_kwargs = connect_kwargs
        self._response_timeout = response_timeout
        self.lock = threading.RLock()
        self.conn: psycopg.Connection | None = None
        # Bumped at every connect: a listener that saw an older one lost notifications.
        self.generation = 0
        self.session_lock: int | None = None  # see _lock_session()
        # channel -> id -> listener (a Listener, or a result waiter: anything
        # with heard(channel, payload) and wake_up())
        self._listeners: dict[str, dict[int, Listener]] = {}
        self._members: dict[int, Listener] = {}  # the listeners that joined, by id
        self._probe_channel = f"{CHANNEL_PREFIX}probe_{secrets.token_hex(8)}"
        self._heard_at: float | None = None  # last notification of any channel
        self._probe_sent_at: float | None = None  # the probe awaited, if any
        self.notifications_lost = False
        forking.forget_in_child(self)

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def join(self, listener: Listener, channels: set[str]) -> None:
        """``listener`` hears its ``channels`` from now on (connecting if need be)."""
        with self.lock:
            self._members[id(listener)] = listener
            new = [channel for channel in channels if channel not in self._listeners]
            for channel in channels:
                self._listeners.setdefault(channel, {})[id(listener)] = listener
            if not self.connected:
                self._connect()
            elif new:
                try:
                    self._execute_listens(new, "LISTEN")
                except psycopg.OperationalError:
                    if self.connected:
                        raise
                    # The session was lost before this listener joined (its
                    # other listeners learn it at their next look): a new
                    # one, which LISTENs on every channel, this one's too.
                    self.reconnect(self.generation)

    def subscribe(self, member, listen: Iterable[str], unlisten: Iterable[str]
                  ) -> tuple[list[str], list[str]]:
        """For a member that sends its LISTENs itself, in the round trip of
        its own statements on :attr:`conn` (the result waiters): ``member``
        hears ``listen`` and no longer ``unlisten``. Returns the channels the
        session now has to LISTEN on and to UNLISTEN, which the caller sends,
        under :attr:`lock` as this is called. A reconnect LISTENs again on
        every channel subscribed."""
        with self.lock:
            new = [channel for channel in listen if channel not in self._listeners]
            for channel in listen:
                self._listeners.setdefault(channel, {})[id(member)] = member
            gone = []
            for channel in unlisten:
                heard_by = self._listeners.get(channel)
                if heard_by is not None and heard_by.pop(id(member), None) is not None:
                    if not heard_by:
                        del self._listeners[channel]
                        gone.append(channel)
            return new, gone

    def leave(self, listener: Listener, channels: set[str], part: bool = False) -> None:
        """``listener`` stops hearing ``channels``; with ``part`` it is no
        longer a member, and the last member's parting closes the session."""
        with self.lock:
            gone = []
            for channel in channels:
                heard_by = self._listeners.get(channel)
                if heard_by is not None:
                    heard_by.pop(id(listener), None)
                    if not heard_by:
                        del self._listeners[channel]
                        gone.append(channel)
            if part:
                self._members.pop(id(listener), None)
                if not self._members:
                    self.close()
                    return
            if gone and self.connected:
                try:
                    self._execute_listens(gone, "UNLISTEN")
                except psycopg.Error:  # a notification on a stale channel is only ignored
                    log.debug("UNLISTEN failed", exc_info=True)

    def has_member(self, listener: Listener) -> bool:
        return id(listener) in self._members

    def _connect(self) -> None:
        with redacting(self._conninfo):
            conn = deadline.connect(self._conninfo, self._response_timeout,
                                    autocommit=True, **self._connect_kwargs)
        conn.add_notify_handler(self._dispatch)
        self.conn = conn
        self.generation += 1
        self._execute_listens([*self._listeners, self._probe_channel], "LISTEN")
        self.session_lock = self._lock_session()
        self._heard_at = self._probe_sent_at = None  # a new session: probe it
        if self.generation > 1:
            # Listeners that waited on the lost one, in other threads, look again.
            for listener in list(self._members.values()):
                listener.wake_up()

    def reconnect(self, generation: int) -> None:
        """The session of ``generation`` was found lost: a new one, unless
        another listener opened it already. Raises when the database
        cannot be reached."""
        with self.lock:
            if self.generation == generation or not self.connected:
                self.close()
                self._connect()

    def _execute_listens(self, channels: list[str], command: str) -> None:
        if channels:  # one simple-protocol message, one round trip
            self.conn.execute(sql.SQL("; ").join(
                sql.SQL(command + " {}").format(sql.Identifier(c)) for c in channels))

    def _lock_session(self) -> int:
        """Take an advisory lock of a random key for this session's life: a
        publish that finds it free knows the waiter records naming it are
        dead (the session ended) and wakes the next waiter instead."""
        probes = _server_probes(self.conn.info.get_parameters())
        while True:
            key = secrets.randbits(32) - 2**31
            if self.conn.execute(queries["transport_listener_lock"],
                                 {"key": key, **probes}).fetchone()[0]:
                return key

    def fileno(self) -> int:
        with self.lock:
            assert self.conn is not None
            return self.conn.fileno()

    def read(self) -> None:
        """Take what arrived on the socket, without blocking: each
        notification goes to the listeners of its channel."""
        with self.lock:
            if self.conn is None:
                raise psycopg.OperationalError("the LISTEN connection is closed")
            pgconn = self.conn.pgconn
            pgconn.consume_input()
            if pgconn.status == psycopg.pq.ConnStatus.BAD:
                raise psycopg.OperationalError("the LISTEN connection was lost")
            while (notify := pgconn.notifies()) is not None:
                pgconn.notify_handler(notify)

    def _dispatch(self, notify: psycopg.Notify) -> None:
        """The connection's notification handler (called under its lock)."""
        self._heard_at = monotonic()
        for listener in list(self._listeners.get(notify.channel, {}).values()):
            listener.heard(notify.channel, notify.payload)

    def check_notifications(self, notify: Callable[[str], None]) -> None:
        """Send a probe (``notify(channel)``, on another session) when one is
        due, and judge the one awaited. Any listener may call it now and then
        (its safety poll does) while connected."""
        with self.lock:
            if not self.connected:
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
                            "poll. A transaction-mode pooler (PgBouncer, Supavisor on port "
                            "6543) drops them: point the transport option listen_url, or "
                            "PG_BROKER_LISTEN_URL, at the database directly or at a "
                            "session-mode pooler", mask_url(self._conninfo), PROBE_PATIENCE)
                return
            if self._heard_at is not None and now - self._heard_at <= PROBE_INTERVAL:
                return
            self._probe_sent_at = now
        notify(self._probe_channel)  # not under the lock: another session's round trip

    def close(self) -> None:
        with self.lock:
            conn, self.conn = self.conn, None
            self.session_lock = None
            close_quietly(conn)

    def forget_after_fork(self) -> None:
        """In a forked child: the connection is the parent's (see
        :mod:`pg_broker.forking`); the child's listeners join a session of
        their own."""
        forking.disown(self.conn)
        self.conn = None
        self.lock = threading.RLock()
        self._listeners = {}
        self._members = {}


class Listener:
    """One transport's channels on its process's :class:`ListenSession`.

    The worker's hub watches :meth:`fileno` and calls :meth:`read`; clients
    call :meth:`wait`. Both return the queues that were notified. Connection
    errors propagate: the caller reconnects (:meth:`reconnect`) and polls
    every queue, as it does when :meth:`reconnected` says that another
    listener of the process replaced the session.
    """

    def __init__(self, conninfo: str, connect_kwargs: dict, response_timeout: float = 0,
                 notify: Callable[[str], None] | None = None) -> None:
        """``notify(channel)`` sends a notification on another session (the
        probe's); None: no probe."""
        self._key = (conninfo, connect_kwargs, response_timeout)
        self._session: ListenSession | None = None
        self._generation = 0  # of the session this listener last looked at
        self._queues: dict[str, str] = {}  # channel -> queue
        self._notify = notify
        # A publish wakes one waiting consumer on a channel of its own, the
        # queue as payload (migrations/core/140).
        self.waiter_channel = _waiter_channel()
        self._inbox: set[str] = set()  # queues notified, not yet taken
        self._handed: list[HandOff] = []  # rows handed to this consumer, not yet taken
        self._inbox_lock = threading.Lock()
        self._wake: Callable[[], None] | None = None
        self._reading = False  # this listener's own read hands notifications to it
        self._pipe: tuple[int, int] | None = None  # wakes wait() from another thread's read
        forking.forget_in_child(self)

    @property
    def session(self) -> ListenSession:
        if self._session is None:
            self._session = shared_session(*self._key)
        return self._session

    @property
    def channels(self) -> set[str]:
        return {*self._queues, self.waiter_channel}

    @property
    def conn(self) -> psycopg.Connection | None:
        return self.session.conn

    @property
    def connected(self) -> bool:
        return self._session is not None and self._session.connected

    @property
    def session_lock(self) -> int | None:
        """The advisory lock this listener's waiter records name (core 210)."""
        return self.session.session_lock

    @property
    def notifications_lost(self) -> bool:
        return self.session.notifications_lost

    def connect(self) -> None:
        """Join the process's session (opening it if need be). A member that
        finds the session closed opens a new one, and :meth:`reconnected`
        then says so."""
        session = self.session
        with session.lock:
            member = session.has_member(self)
            if not member or not session.connected:
                session.join(self, self.channels)
            if not member:
                self._generation = session.generation

    def listen(self, queue: str) -> None:
        channel = channel_name(queue)
        if channel in self._queues:
            return
        self._queues[channel] = queue
        if self.connected and self.session.has_member(self):
            self.session.join(self, {channel})

    def unlisten(self, queue: str) -> None:
        channel = channel_name(queue)
        if self._queues.pop(channel, None) is not None and self.connected:
            self._session.leave(self, {channel})

    def wake_with(self, wake: Callable[[], None] | None) -> None:
        """Call ``wake()`` (any thread) when another thread's read brings
        this listener a notification; None: :meth:`wait`'s pipe."""
        self._wake = wake

    def fileno(self) -> int:
        return self.session.fileno()

    def reconnected(self) -> bool:
        """Whether the session was replaced since this listener last looked
        (notifications may have been lost meanwhile: poll every queue)."""
        session = self.session
        if session.generation != self._generation and session.connected:
            self._generation = session.generation
            return True
        return False

    def reconnect(self) -> None:
        """This listener found the session lost: a new one (or the one
        another listener opened meanwhile)."""
        session = self.session
        session.reconnect(self._generation)
        with session.lock:
            session.join(self, self.channels)
            self._generation = session.generation

    def read(self) -> set[str]:
        """Queues notified since the last read, without blocking."""
        self._reading = True
        try:
            self.session.read()
        finally:
            self._reading = False
        return self.take()

    def take(self) -> set[str]:
        """Queues notified (by any thread's read) and not yet taken."""
        with self._inbox_lock:
            queues, self._inbox = self._inbox, set()
        return queues

    def take_handed(self) -> list[HandOff]:
        """Rows handed to this consumer (by any thread's read) and not yet taken."""
        with self._inbox_lock:
            handed, self._handed = self._handed, []
        return handed

    def wait(self, timeout: float) -> set[str]:
        """Block up to ``timeout`` seconds for the first notifications."""
        self.connect()
        end = monotonic() + timeout
        if self._pipe is None:
            self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        wake = self._pipe[0]
        session = self.session
        poller = select.poll()  # not select(): a busy process's descriptors pass 1023
        poller.register(session.fileno(), select.POLLIN)
        poller.register(wake, select.POLLIN)
        while True:
            notified = self.read()
            remaining = end - monotonic()
            if (notified or self._handed or remaining <= 0
                    or session.generation != self._generation):
                return notified  # a new session: the caller sees reconnected()
            poller.poll(remaining * 1000)
            try:
                while os.read(wake, 4096):
                    pass
            except BlockingIOError:
                pass
            except OSError:  # closed meanwhile (the connection closed from another thread)
                return notified

    def heard(self, channel: str, payload: str) -> None:
        """A notification on one of this listener's channels (from the
        session's read, in whichever thread read)."""
        handed: HandOff | None = None
        if channel == self.waiter_channel:
            queue = payload if payload in self._queues.values() else None
            if queue is None:
                # A row claimed for this consumer (migrations/core/220): kept
                # even for a queue no longer consumed, so that it goes back.
                handed = hand_off(payload)
        else:
            queue = self._queues.get(channel)
        if queue is None and handed is None:
            return
        with self._inbox_lock:
            if handed is not None:
                self._handed.append(handed)
            else:
                self._inbox.add(queue)
        if not self._reading:
            self.wake_up()

    def wake_up(self) -> None:
        """Wake this listener's waiter (its hub, or its :meth:`wait`)."""
        if self._wake is not None:
            self._wake()
        elif self._pipe is not None:
            try:
                os.write(self._pipe[1], b"\0")
            except OSError:  # full: the waiter is awake already
                pass

    def check_notifications(self) -> None:
        """Let the session send or judge its probe (see :class:`ListenSession`)."""
        if self._notify is not None and self.connected:
            self.session.check_notifications(self._notify)

    def close(self) -> None:
        if self._session is not None:
            self._session.leave(self, self.channels, part=True)
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def forget_after_fork(self) -> None:
        """In a forked child: the session is the parent's (see
        :mod:`pg_broker.forking`); the child's joins one of its own."""
        self._session = None
        self._generation = 0
        self.waiter_channel = _waiter_channel()
        self._inbox = set()
        self._handed = []
        self._inbox_lock = threading.Lock()
        self._reading = False
        self._pipe = None  # the parent's descriptors, shared: left open


_sessions: PerProcess[ListenSession] = PerProcess(ListenSession)


def _waiter_channel() -> str:
    return f"{CHANNEL_PREFIX}w_{secrets.token_hex(16)}"
