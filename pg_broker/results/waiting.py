"""Waiting for results: LISTEN/NOTIFY on the store's one connection, shared
by every waiter of the process.

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

Nothing polls. The thread that waits reads the socket (``poll``, without the
connection's lock, so other threads keep storing and reading); other threads
waiting meanwhile wait for it to finish a read, which serves them too. A
notification that arrives while some statement runs on the connection is
caught by the connection's handler and wakes the reader through a pipe.
After a lost connection the next wait reconnects, LISTENs again and re-reads
every result still waited for from the table: no wake-up is lost.
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
    """Who waits for which result, and the reads that wake them."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        # Whether values carried by notifications are taken (see trust_carried).
        self.take_carried = True
        self._reset()
        store.on_notify = self._notified_on

    def _reset(self) -> None:
        self._state = threading.Lock()  # the fields below; never held during I/O
        self._waiting: dict[str, dict[int, Consumer]] = {}  # key -> consumers
        # (consumer id, key) to stop waiting for: appended without a lock,
        # because Celery cancels from AsyncResult.__del__ (any thread, any time).
        self._cancelled: deque[tuple[int, str]] = deque()
        # channel -> key, LISTENed on (and the key recorded as awaited on) the current connection
        self._listening: dict[str, str] = {}
        self._generation = 0  # the store's connection they were LISTENed on
        # channel -> payload of its latest notification not yet handed out
        self._notified: dict[str, str] = {}
        self._reading = False
        self._read_done = threading.Condition(self._state)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

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
        try:
            self._read(set())
            with self._state:
                pending = bool(self._notified)
            if not pending:
                self._wait_readable(self.store.socket(), timeout)
            self.store.read_notifications()
            with self._state:
                notified, self._notified = self._notified, {}
            if notified:
                self._take_notified(notified)
        except CONNECTION_ERRORS as exc:
            log.warning("waiting for results: %s; reconnecting", exc)
            time.sleep(RECONNECT_PAUSE if timeout is None else min(timeout, RECONNECT_PAUSE))
        finally:
            with self._state:
                self._reading = False
                self._read_done.notify_all()

    def _read(self, keys: set[str]) -> None:
        """Bring the LISTENs up to date and read ``keys`` and every key newly
        LISTENed for, in one round trip; hand out what was found.

        The LISTEN/UNLISTEN batch commits before the read starts (pipelined,
        each its own transaction), so a result written meanwhile is seen by
        the read or notified. A result already there costs a LISTEN it did
        not need (a chord's join reads its whole header so), taken back with
        the next batch; the usual case, a result still to come, costs the
        caller one round trip before it waits, where reading first, then
        LISTENing, then reading again cost three.
        """
        with self.store.connection():
            if self.store.generation != self._generation:
                # A new connection has no LISTENs (and a result written while
                # the old one was down notified nobody: read them all).
                self._generation = self.store.generation
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
                return
            found = self.store.listen_and_read(listen, stale, keys)
            if listen or stale:
                self._listening = wanted
        self._hand_out(found)

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

    # Waking -----------------------------------------------------------------

    def _notified_on(self, channel: str, payload: str) -> None:
        """The connection's notification handler (called under its lock)."""
        with self._state:
            self._notified[channel] = payload
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # the pipe is full: the reader is awake already
            pass

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
        """In a forked child (its store's at-fork hook calls it): waiters and
        channels were the parent's."""
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._reset()
