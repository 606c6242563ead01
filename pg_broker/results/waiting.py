"""Waiting for results: LISTEN/NOTIFY on the process's one LISTEN session per
database, shared by every waiter of the process and by its transport's
consumers (:class:`~pg_broker.transport.listener.ListenSession`): a worker
that consumes and awaits results holds its work and LISTEN connections, not
a third (issue 12).

A write of a result notifies ``pgbroker_r_`` + md5(key) (the SQL side
computes the same name: ``pg_broker_result_set``, migrations/core/200) when
a session awaits that key, with the value itself as payload when it fits
one (up to 5,400 bytes). A process LISTENs on the channels of the results
it waits for, however many threads and results that is: a thousand waiters
are a thousand channels on one connection. Before waiting, a waiter LISTENs
on its channels (channels no longer waited for are UNLISTENed in the same
batch), then records their keys as awaited (``task_result_waiters``; a
key nobody awaits is written without a notification, which would signal
every listening session of the database), then reads its results from the
table, pipelined in one round trip, each part committed before the next:
a result written meanwhile is seen by the read or notified (the lock order
of migrations/core/200). (Reading first, then LISTENing, then reading again
cost three round trips, on the way from the publish to the caller's wait.) A
notification that carries its value hands it to every consumer (one per
Celery backend object, so per thread) waiting for it, with no read: the
round trip it saves is on the way from the worker's write to the caller
(a process wake-up each way on a busy machine). The values of the others (an
empty payload) are read from ``task_results`` in one statement. Notifications
come in commit order, so the last one per channel carries the latest value.

The waiter's statements (LISTENs, records, read) run on the LISTEN session
itself, so that the one round trip covers them and the records name the
session that LISTENs (a record of an ended session is deleted by the
retention). They go through libpq with the socket awaited by ``poll``: a
record can wait for a write's commit, and the write may be this process's.

Nothing polls. The thread that waits reads the session's socket (``poll``,
without its lock, so other threads keep storing and reading); other threads
waiting meanwhile wait for it to finish a read, which serves them too.
Whoever reads the session's socket (a worker's event loop, a transport's
``drain_events``, a waiter) hands each notification to the member whose
channel it is: a result's wakes its waiter through a pipe. After a lost
session the next wait opens a new one (or finds the one another member
opened), LISTENs again and re-reads every result still waited for from the
table: no wake-up is lost. The listener leaves the session ``IDLE_CLOSE``
seconds after its last wait.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from pg_broker.database import DatabaseUnavailable
from pg_broker.migrate import ensure_migrated
from pg_broker.transport import connections
from pg_broker.transport.listener import ListenSession, session_for

from .store import CONNECTION_ERRORS, ResultStore

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "pgbroker_r_"
# How long a wait backs off after finding the database out of reach.
RECONNECT_PAUSE = 1.0
# Channels no longer waited for are UNLISTENed with the next LISTENs, or once
# this many have piled up.
STALE_MAX = 256


def channel_name(key: str) -> str:
    """The NOTIFY channel of a result key (``result_set`` computes the same)."""
    return CHANNEL_PREFIX + hashlib.md5(key.encode("utf-8")).hexdigest()


def _carried_value(payload: str) -> bytes | None:
    """The value a notification carries (``result_set``: base64 with line
    breaks), or None: an empty payload (too large to carry) or one that is not
    base64 (a NOTIFY from elsewhere): read the row."""
    if not payload:
        return None
    try:
        return base64.b64decode(payload.replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        return None


class Consumer(Protocol):
    def deliver(self, key: str, value: bytes) -> None: ...


def listener_of(store: ResultStore) -> ResultListener:
    """The one listener of a store (so of a process and database)."""
    with store.lock:
        if store.listener is None:
            store.listener = ResultListener(store)
        return store.listener


class ResultListener:
    """Who waits for which result, and the reads that wake them.

    A member of the process's LISTEN session for the store's database
    (:func:`~pg_broker.transport.listener.session_for`) while results are
    awaited, and ``IDLE_CLOSE`` after: the session then closes if no
    transport consumes on it.
    """

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        # Whether values carried by notifications are taken (see trust_carried).
        self.take_carried = True
        self._reset()

    def _reset(self) -> None:
        self._state = threading.Lock()  # the fields below; never held during I/O
        self._waiting: dict[str, dict[int, Consumer]] = {}  # key -> consumers
        # (consumer id, key) to stop waiting for: appended without a lock,
        # because Celery cancels from AsyncResult.__del__ (any thread, any time).
        self._cancelled: deque[tuple[int, str]] = deque()
        # channel -> key, LISTENed on (and the key recorded as awaited on) the
        # current session; changed under the session's lock
        self._listening: dict[str, str] = {}
        self._generation = 0  # the session's connection they were LISTENed on
        # channel -> payload of its latest notification not yet handed out
        self._notified: dict[str, str] = {}
        self._reading = False
        self._read_done = threading.Condition(self._state)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._session: ListenSession | None = None
        self._used_at = time.monotonic()
        self._parter: threading.Thread | None = None  # see _part_when_idle

    @property
    def session(self) -> ListenSession:
        """The process's LISTEN session on the store's database."""
        if self._session is None:
            self._session = session_for(self.store.conninfo)
        return self._session

    def trust_carried(self, trusted: bool) -> None:
        """Whether to take values from notifications (any session of the
        database can NOTIFY; only the result backend's roles write the rows).
        Once a backend of the process distrusts them, none takes them."""
        self.take_carried = self.take_carried and trusted

    # Registry -------------------------------------------------------------

    def want(self, consumer: Consumer, keys: Iterable[str]) -> None:
        with self._state:
            self._take_cancels()
            for key in keys:
                self._waiting.setdefault(key, {})[id(consumer)] = consumer

    def cancel(self, consumer: Consumer, key: str) -> None:
        """Stop waiting for ``key`` (never blocks; UNLISTEN follows with the next batch)."""
        self._cancelled.append((id(consumer), key))

    def busy(self) -> bool:
        """Whether a result is awaited or a read runs (the store keeps its
        connection, and the LISTENs on it, open meanwhile)."""
        with self._state:
            self._take_cancels()
            return bool(self._waiting) or self._reading

    def waiting_for(self) -> set[str]:
        with self._state:
            self._take_cancels()
            return set(self._waiting)

    def _take_cancels(self) -> None:
        while self._cancelled:
            consumer_id, key = self._cancelled.popleft()
            consumers = self._waiting.get(key)
            if consumers is not None:
                consumers.pop(consumer_id, None)
                if not consumers:
                    del self._waiting[key]

    # Reads ---------------------------------------------------------------

    def check(self, consumer: Consumer, keys: Iterable[str]) -> None:
        """Before waiting: ``consumer`` waits for ``keys``; read them, LISTEN
        for those still awaited and read those once more (after a reconnect,
        every result waited for)."""
        keys = set(keys)
        self.want(consumer, keys)
        self._read(keys)

    def drain(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for notifications and hand out the
        results they announce; returns after one read (or the timeout)."""
        with self._state:
            if self._reading:  # another thread reads for everyone
                self._read_done.wait(timeout)
                return
            self._reading = True
        session = self.session
        generation = session.generation
        try:
            fd = self._read(set())
            with self._state:
                pending = bool(self._notified)
            if not pending:
                self._wait_readable(fd, timeout)
            generation = session.generation
            session.read()
            with self._state:
                notified, self._notified = self._notified, {}
            if notified:
                self._take_notified(notified)
        except CONNECTION_ERRORS as exc:
            log.warning("waiting for results: %s; reconnecting", exc)
            self._lost(generation)
            time.sleep(RECONNECT_PAUSE if timeout is None else min(timeout, RECONNECT_PAUSE))
        finally:
            with self._state:
                self._reading = False
                self._read_done.notify_all()

    def _read(self, keys: set[str]) -> int:
        """Bring the LISTENs up to date and read ``keys`` and every key newly
        LISTENed for, in one round trip on the LISTEN session; hand out what
        was found. Returns the session's socket, to wait on.

        The LISTEN/UNLISTEN batch commits before the read starts (pipelined,
        each its own transaction), so a result written meanwhile is seen by
        the read or notified. A result already there costs a LISTEN it did
        not need (a chord's join reads its whole header so), taken back with
        the next batch; the usual case, a result still to come, costs the
        caller one round trip before it waits, where reading first, then
        LISTENing, then reading again cost three.
        """
        session = self.session
        if not session.has_member(self):
            ensure_migrated(self.store.conninfo)  # once per process (the records' table)
        with session.lock:
            self._used_at = time.monotonic()
            if not session.has_member(self) or not session.connected:
                session.join(self, set())  # connects if need be
                self._start_parter()
            conn, generation = session.conn, session.generation
            assert conn is not None
            isolate = generation != self._generation
            if isolate:
                # A new connection: its records are gone, and a result written
                # while the old one was down notified nobody: read them all.
                self._generation = generation
                self._listening = {}
                keys = keys | self.waiting_for()
            wanted = {channel_name(key): key for key in self.waiting_for()}
            listen = {c: key for c, key in wanted.items() if c not in self._listening}
            stale = {c: key for c, key in self._listening.items() if c not in wanted}
            # UNLISTENs wait for the next LISTENs (or pile up to STALE_MAX):
            # a notification on a stale channel is only ignored.
            if not listen and len(stale) < STALE_MAX:
                listen = stale = {}
            if not (keys or listen or stale):
                return conn.fileno()
            _, gone = session.subscribe(self, listen, stale)
            try:
                found = self.store.listen_and_read(
                    conn, listen, {c: stale[c] for c in gone}, keys, isolate)
            except CONNECTION_ERRORS:
                self._lost(generation)
                raise
            if listen or stale:
                self._listening = wanted
            fd = conn.fileno()
        self._hand_out(found)
        return fd

    def _lost(self, generation: int) -> None:
        """The session of ``generation`` failed: a new one (its other members
        learn it), unless another member replaced it already; if the
        database cannot be reached, the next wait tries again."""
        try:
            self.session.reconnect(generation)
        except (*CONNECTION_ERRORS, DatabaseUnavailable) as exc:
            log.debug("results: no new LISTEN session yet: %s", exc)

    def _take_notified(self, notified: dict[str, str]) -> None:
        """Hand out the values notifications carried; read those they did not."""
        carried: dict[str, bytes] = {}
        unread: set[str] = set()
        for key in self.waiting_for():
            payload = notified.get(channel_name(key))
            if payload is None:
                continue
            value = _carried_value(payload) if self.take_carried else None
            if value is None:
                unread.add(key)
            else:
                carried[key] = value
        self._hand_out(carried)
        self._read(unread)

    def _hand_out(self, values: dict[str, bytes]) -> None:
        """Give each result read to every consumer waiting for it."""
        if not values:
            return
        with self._state:
            self._take_cancels()
            deliveries = [(consumer, key, value) for key, value in values.items()
                          for consumer in list(self._waiting.get(key, {}).values())]
        for consumer, key, value in deliveries:
            consumer.deliver(key, value)
        with self._state:  # threads waiting for the reader: theirs may be among them
            self._read_done.notify_all()

    # The session's member ------------------------------------------------------

    def heard(self, channel: str, payload: str) -> None:
        """A notification on one of this listener's channels (from the
        session's read, in whichever thread read: a worker's event loop, or a
        waiter's :meth:`drain`)."""
        with self._state:
            self._notified[channel] = payload
        self.wake_up()

    def wake_up(self) -> None:
        """Wake the thread waiting in :meth:`drain` (a notification, or a
        new session: its next read LISTENs and reads again)."""
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # the pipe is full: the reader is awake already
            pass

    def _start_parter(self) -> None:
        if self._parter is None or not self._parter.is_alive():
            self._parter = threading.Thread(target=self._part_when_idle, daemon=True,
                                            name="pg_broker-results-listen")
            self._parter.start()

    def _part_when_idle(self) -> None:
        """Leave the session once no result was awaited for ``IDLE_CLOSE``
        seconds: its channels UNLISTENed and its records deleted, or the
        session closed if no transport of the process consumes on it (a
        producer that awaited results holds its work connection only)."""
        session = self.session
        while True:
            idle = connections.IDLE_CLOSE
            time.sleep(max(self._used_at + idle - time.monotonic(), min(idle, 1.0)))
            with session.lock:
                if not session.has_member(self):
                    return
                if self.busy() or time.monotonic() - self._used_at < idle:
                    continue
                listening, self._listening = self._listening, {}
                _, gone = session.subscribe(self, [], listening)
                if gone and session.connected:
                    try:
                        self.store.listen_and_read(
                            session.conn, {}, {c: listening[c] for c in gone}, [])
                    except CONNECTION_ERRORS:  # the records die with the session
                        log.debug("results: UNLISTEN failed", exc_info=True)
                session.leave(self, set(), part=True)
                return

    # Waking -----------------------------------------------------------------

    def _wait_readable(self, fd: int, timeout: float | None) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        poller.poll(None if timeout is None else max(timeout, 0) * 1000)
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def forget_after_fork(self) -> None:
        """In a forked child (its store's at-fork hook calls it): waiters,
        channels and the session were the parent's (the child's session
        forgets its connection on its own)."""
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._reset()
