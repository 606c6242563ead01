"""Pipelined publishing: messages sent without waiting for each reply.

(Longer than ~400 lines on purpose: one class, :class:`Pipeline`, over one
connection, whose every use holds one lock while its confirmer thread waits
for replies without it; that discipline is easier to check in one file than
across several. An eighth of the file is this docstring.)

A durable publish normally returns after its commit: one round trip plus a
WAL flush per message. Two kinds of publish don't wait for theirs:

- transient messages (``delivery_mode`` 1: Celery events, pidbox broadcasts
  and replies), which nobody expects to survive a crash;
- every publish of a transport whose ``confirm_publish`` option is False, the
  semantics of RabbitMQ without publisher confirms, Celery's default there.

When they come in bursts, they go out on a connection of their own in libpq
pipeline mode, each statement followed by a Sync, so each is its own implicit
transaction, committed by the server in order while the producer goes on.
The replies are read later: without blocking whenever the producer sends
another message, by a confirmer thread within ``CONFIRM_INTERVAL`` when it
does not, and all of them before the transport closes or on
:func:`confirm_publishes`.

A durable message commits asynchronously (``synchronous_commit`` off for its
transaction): visible to consumers, and its wake-up sent, without waiting for
a WAL flush of its own. Its confirm is the reply of the next flush
(``transport_flush``: a transaction that commits as the ``synchronous_commit``
option asks, so waits until the WAL written before it is flushed, covering
every message committed before it), which the confirmer sends every
``CONFIRM_INTERVAL`` while messages await one, and :meth:`Pipeline.confirm`
at once. A commit that waited for its own flush made the pipeline's one
server session flush once per message (``python -m bench.hotpath
--transport-options '{"confirm_publish": false}'``, PostgreSQL 15 here:
2,080 messages/s and 0.217 ms of backend CPU each, against 7,355/s and
0.112 ms — 0.127 with the WAL writer's — committing asynchronously), and
held each wake-up back by that flush (≈0.4 ms of publish → start). A lone transient one (``BURST_GAP`` after the
previous, with nothing in flight: Celery's heartbeat events every 2 s, a
remote-control reply) is one statement on the work connection instead,
returning after its commit (no WAL flush: its table is UNLOGGED), and the
pipeline's connection closes ``IDLE_CLOSE`` after its last send: so an idle
worker or producer keeps no third connection open (issue 12: work + LISTEN).

Notifications are rationed in bursts, for confirmed publishes too.
PostgreSQL signals every LISTENing session of the database on each
notification (measured on PostgreSQL 15 here: ~15 µs of server CPU per
listening session per notification), so a worker's stream of events would
otherwise cost the server more than the events themselves. Per route
(exchange, routing key) a message notifies its queues at once when the route
was quiet for ``QUIET`` before it: a lone message, such as each call of a
request/response caller, always wakes its consumer at once. A message that
follows another within ``QUIET`` is part of a burst: it notifies only if the
route's last notification is ``NOTIFY_WINDOW`` old; otherwise it is owed a
trailing notification, sent on the pipeline's connection once the route has
been quiet for ``QUIET`` or the window has passed, whichever comes first. So
a burst costs one notification per window, and its last message waits at most
``QUIET`` (or the window) for its wake-up. A producer slower than one message
per ``QUIET`` on a route is no burst: each of its messages notifies, at most
one per ``QUIET`` (a loop of confirmed publishes on a loaded machine can be
that slow; timing cannot tell it from a caller waiting for each result).

That trailing notification goes out when due, not up to ``CONFIRM_INTERVAL``
later: the confirmer thread is woken whenever a notification is owed. (It
used to sleep a fixed ``CONFIRM_INTERVAL`` and owed a route once per window
even to a request/response caller, whose next call then came within the
window: measured with pgbroker as broker and Redis as result backend, a solo
worker's publish-to-start latency was ~5 ms or ~50 ms, p50 36.6 ms over 30
sequential ``delay().get()`` calls; with this rule, 2-3 ms.)

Until its confirm is read a message stays in memory. When the connection is
lost, the pipeline reconnects and sends every unconfirmed durable message
again, in order — committed but not yet flushed ones too: a database restart,
or crash, loses none (at-least-once; one whose commit happened, or was
flushed, but whose confirm was lost is stored twice; a consumer may have run
a message that a crash then took away before its flush, and runs it again). Unconfirmed
transient messages are dropped then, as a broker restart drops them. A
connection found dead before a send (the server ended the session while the
pipeline was idle) is replaced before the message goes out.

A message the database refuses for its content (SQLSTATE classes 22 and 23:
an unknown ``job_id``, a constraint), or after ``MAX_SENDS`` attempts, is
dropped, and its producer is told: the next publish through this pipeline
raises kombu's ChannelError naming the refused messages (their Celery task
ids) and why, and so does :func:`confirm_publishes` — whichever comes first,
each refusal once. The publish that raises is not sent: the caller learns
before going on, as with a refused confirmed publish. The transport checks
at ``delay()`` time everything it can check without the database. Log lines
and errors carry PostgreSQL's primary message and SQLSTATE, never its DETAIL
(``Failing row contains (...)`` quotes the payload).
"""

from __future__ import annotations

import atexit
import logging
import select
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from time import monotonic, sleep

import psycopg
from kombu.exceptions import ChannelError
from psycopg import pq

from pg_broker import forking
from pg_broker.masking import first_line, redacting

from .connections import IDLE_CLOSE, STATEMENT_ELSEWHERE, close_quietly, forgo_prepared, prepares
from .store import FLUSH, OK, Prepared

log = logging.getLogger(__name__)

# How long a sent message may wait for its confirm to be read when the
# producer sends nothing more.
CONFIRM_INTERVAL = 0.05
# Per route, in a burst at most one notification per this many seconds (see above).
NOTIFY_WINDOW = 0.01
# A message this long after the route's previous one is no part of a burst: it
# notifies at once. Below any request/response round trip through PostgreSQL
# (two commits: 2 ms and more here), above the spacing of a publish loop
# (confirmed: 0.9 ms here; pipelined: a fraction of that).
QUIET = 0.001
# Unconfirmed messages one pipeline holds before a publish waits for the
# database to catch up (memory bound, and back-pressure on a fast producer).
MAX_UNCONFIRMED = 2000
# A message the database turns down for another reason than its content
# (serialization failure, disk full, read-only server) is sent again at most
# this many times.
MAX_SENDS = 10
# SQLSTATE classes meaning "this message can never be stored".
REFUSED_CLASSES = ("22", "23")
# A publish this long after the pipeline's previous one, with nothing in
# flight, is a lone one: it runs on the work connection instead (see
# :meth:`Pipeline.takes`). Celery's heartbeat events (every 2 s) and
# remote-control replies are lone; a worker's task events with ``-E`` and a
# publish loop are not.
BURST_GAP = 0.1
# SQLSTATEs of STATEMENT_ELSEWHERE, as a pipelined result reports them.
STATEMENT_ELSEWHERE_STATES = tuple(error.sqlstate for error in STATEMENT_ELSEWHERE)
# At most this many refused messages are named in one error.
REFUSALS_NAMED = 5
# How strictly a synchronous_commit mode waits (None: the server's setting):
# a flush covering messages of several modes waits as the strictest asks.
_COMMIT_WAITS = {"local": 1, "remote_write": 2, "on": 3, None: 3, "remote_apply": 4}

# One pipeline per process and database (see shared()); every one, for the
# confirms at exit.
_pipelines: weakref.WeakSet[Pipeline] = weakref.WeakSet()
_shared: dict[tuple, Pipeline] = {}
_shared_lock = threading.Lock()


def shared(conninfo: str, connect_kwargs: dict, statement: Prepared) -> Pipeline:
    """The process's pipeline to this database: every kombu Connection of a
    process (Flower holds several, a producer pool up to ten) sends through
    one connection, and rations notifications together."""
    key = (conninfo, tuple(sorted(connect_kwargs.items())), statement.name)
    with _shared_lock:
        pipeline = _shared.get(key)
        if pipeline is None or pipeline.closed:
            pipeline = _shared[key] = Pipeline(conninfo, connect_kwargs, statement)
        return pipeline


@dataclass(slots=True)
class _Sent:
    values: list[bytes | None]
    durable: bool
    label: str
    sends: int = 0
    error: tuple[str, str] | None = None  # (sqlstate, message) of its statement
    # A durable message committed asynchronously: confirmed by a flush after
    # it, which waits as its commit mode asks (the synchronous_commit option).
    awaits_flush: bool = False
    mode: str | None = None
    flush: bool = False  # a flush (transport_flush), not a message


class Pipeline:
    """One connection in pipeline mode publishing one statement (prepared,
    unless the connection takes no prepared statements: see
    :meth:`.store.Prepared.execute`).

    Thread-safe: every use of the connection holds ``_lock``; the confirmer
    thread waits for replies without it.
    """

    def __init__(self, conninfo: str, connect_kwargs: dict, statement: Prepared) -> None:
        self._conninfo = conninfo
        self._connect_kwargs = connect_kwargs
        self.statement = statement
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._unsent: deque[_Sent] = deque()  # to send (again) after a reconnect
        self._in_flight: deque[_Sent] = deque()  # sent; their Sync not yet read
        # Committed asynchronously, their WAL flush not yet confirmed.
        self._unflushed: list[_Sent] = []
        # Messages awaiting a flush sent since the last flush was: (how many,
        # the strictest commit mode among them).
        self._uncovered = 0
        self._uncovered_mode: str | None = "local"
        self._flushes = 0  # flushes in flight (no message: not counted as unconfirmed)
        self._last_publish: float | None = None  # see takes()
        self._last_sent = 0.0  # for the idle close
        self._notified: dict[tuple[str, str], float] = {}  # route -> last notification
        self._published: dict[tuple[str, str], float] = {}  # route -> last message
        # route -> (when its trailing notification is due, the statement's parameters)
        self._owed: dict[tuple[str, str], tuple[float, dict]] = {}
        # Set when a notification is owed: the confirmer re-reckons its sleep.
        self._rescheduled = threading.Event()
        self._broken = False
        self._closed = False
        # Durable messages the database refused, not yet reported to a producer:
        # (label, sqlstate, primary message).
        self._refusals: list[tuple[str, str, str]] = []
        self._thread: threading.Thread | None = None
        _pipelines.add(self)
        forking.forget_in_child(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def unconfirmed(self) -> int:
        return len(self._unsent) + len(self._in_flight) - self._flushes + len(self._unflushed)

    # Sending ----------------------------------------------------------------

    def takes(self) -> bool:
        """Whether a transient publish now goes through the pipeline: one
        less than ``BURST_GAP`` after the previous, or behind messages still
        in flight (it must follow them). A lone one runs as one statement on
        the work connection instead, returning after its commit: an idle
        worker keeps no pipeline connection open (it closes ``IDLE_CLOSE``
        after its last send)."""
        with self._lock:
            now = monotonic()
            previous, self._last_publish = self._last_publish, now
            return bool(self.unconfirmed) or (previous is not None
                                              and now - previous < BURST_GAP)

    def send(self, params: dict, durable: bool, label: str) -> None:
        """Send one message (the statement's parameters); return without
        waiting for its confirm.

        Raises psycopg.OperationalError when the database cannot be reached
        now (the message is then not kept: the caller's retry sends it), and
        ChannelError, without sending it, when the database refused messages
        sent before it (see the module's docstring).
        """
        with self._lock:
            self._report_refusals()
            mode = params["synchronous_commit"]
            awaits_flush = durable and mode != "off"
            if awaits_flush:  # visible at its commit, confirmed by a flush after it
                params = {**params, "synchronous_commit": "off"}
            entry = _Sent(self.statement.values(self._rationed(params)), durable, label,
                          awaits_flush=awaits_flush, mode=mode)
            try:
                if self._broken or self._conn is None or self._ended():
                    self._reconnect()
                self._unsent.append(entry)
                self._owe_notifications(monotonic())
                self._send_unsent()
                self._read(block=False)
                if self.unconfirmed > MAX_UNCONFIRMED:
                    self._send_flush()
                    self._read(block=True)
            except psycopg.OperationalError:
                self._broken = True
                self._forget(entry)
                raise
        self._start_confirmer()

    def ration(self, params: dict) -> dict:
        """For a publish outside the pipeline (confirmed, on the work
        connection): its parameters with the notify decision. Call
        :meth:`owe` once it committed without notifying."""
        with self._lock:
            return self._rationed(params, owe=False)

    def owe(self, params: dict) -> None:
        """A message committed elsewhere without notifying: its route is owed
        a trailing notification (sent by the confirmer on this connection)."""
        with self._lock:
            self._owe((params["exchange"], params["routing_key"]), params, monotonic())
        self._start_confirmer()

    def _rationed(self, params: dict, owe: bool = True) -> dict:
        """The message's parameters, notifying unless it is part of a burst
        whose route notified within the window (it is then owed a trailing
        notification)."""
        route = (params["exchange"], params["routing_key"])
        now = monotonic()
        previous = self._published.get(route)
        self._published[route] = now
        last = self._notified.get(route)
        if (previous is not None and now - previous < QUIET
                and last is not None and now - last < NOTIFY_WINDOW):
            if owe:
                self._owe(route, params, now)
            return {**params, "store": True, "notify": False}
        self._notified[route] = now
        self._owed.pop(route, None)
        return {**params, "store": True, "notify": True}

    def _owe(self, route: tuple[str, str], params: dict, now: float) -> None:
        """A trailing notification for ``route``: once it is quiet for
        ``QUIET``, at the latest a window after its last notification."""
        last = self._notified.get(route, now)
        due = min(now + QUIET, last + NOTIFY_WINDOW)
        previous = self._owed.get(route)
        self._owed[route] = (due, params)
        # The confirmer re-reckons its sleep only when this is sooner than it
        # knew: each message of a burst owes its route again, later, and
        # waking that thread for each one cost the producer a fifth of its
        # samples (py-spy, a pipelined delay() loop).
        if previous is None or due < previous[0]:
            self._rescheduled.set()

    def _owe_notifications(self, due: float) -> None:
        """Queue the trailing notifications due by ``due`` (notify only, store nothing)."""
        for route, (when, params) in list(self._owed.items()):
            if when <= due:
                del self._owed[route]
                self._notified[route] = monotonic()
                values = self.statement.values({**params, "store": False, "notify": True})
                self._unsent.append(_Sent(values, False, f"notification for {route[0] or route[1]}"))

    def _pause(self) -> float:
        """Seconds until the confirmer has something to do (a notification due)."""
        due = min((when for when, _ in list(self._owed.values())), default=None)
        if due is None:
            return CONFIRM_INTERVAL
        return min(CONFIRM_INTERVAL, max(due - monotonic(), 0.0))

    def _doze(self) -> None:
        """Sleep ``CONFIRM_INTERVAL`` (a busy producer reads its own confirms
        meanwhile), or until a trailing notification falls due: woken to
        re-reckon whenever one is owed."""
        deadline = monotonic() + CONFIRM_INTERVAL
        while True:
            self._rescheduled.clear()
            remaining = min(self._pause(), deadline - monotonic())
            if remaining <= 0:
                return
            self._rescheduled.wait(remaining)

    def _send_unsent(self) -> None:
        pgconn = self._conn.pgconn
        while self._unsent:
            entry = self._unsent.popleft()
            entry.sends += 1
            entry.error = None
            statement = FLUSH if entry.flush else self.statement
            statement.send(pgconn, entry.values, prepares(self._conn))
            pgconn.pipeline_sync()
            self._in_flight.append(entry)
            self._last_sent = monotonic()
            if entry.flush:
                self._flushes += 1
            elif entry.awaits_flush:
                self._uncovered += 1
                if _COMMIT_WAITS.get(entry.mode, 3) > _COMMIT_WAITS.get(self._uncovered_mode, 3):
                    self._uncovered_mode = entry.mode
        self._flush()

    def _send_flush(self) -> None:
        """Send a flush behind the messages sent asynchronously since the
        last one: its commit waits until their WAL is flushed (and
        replicated) as their commit mode asks, and its reply confirms them."""
        if not self._uncovered:
            return
        values = FLUSH.values({"synchronous_commit": self._uncovered_mode})
        self._uncovered, self._uncovered_mode = 0, "local"
        self._unsent.append(_Sent(values, False, "flush", flush=True))
        self._send_unsent()

    def _flush(self) -> None:
        """Push libpq's output buffer to the socket, reading replies meanwhile
        (a server blocked writing replies we don't read would stop reading)."""
        pgconn = self._conn.pgconn
        while pgconn.flush():
            readable, writable = _wait(pgconn.socket, write=True, timeout=None)
            if readable:
                self._read(block=False)

    def _ended(self) -> bool:
        """Whether the server ended an idle session: anything to read while
        no reply is due is its last word (or the end of the stream)."""
        if self._in_flight:
            return False
        readable, _ = _wait(self._conn.pgconn.socket, write=False, timeout=0)
        return readable

    def _forget(self, entry: _Sent) -> None:
        for pending in (self._unsent, self._in_flight):
            try:
                pending.remove(entry)
            except ValueError:
                pass

    # Confirms -----------------------------------------------------------------

    def _read(self, block: bool, until: int = 0, deadline: float | None = None) -> bool:
        """Read replies: those available, or (block) until at most ``until``
        messages are in flight. False when ``deadline`` passed first."""
        pgconn = self._conn.pgconn
        while len(self._in_flight) > until:
            pgconn.consume_input()
            while self._in_flight and not pgconn.is_busy():
                self._take(pgconn.get_result())
            if len(self._in_flight) <= until or not block:
                return True
            timeout = None if deadline is None else deadline - monotonic()
            if timeout is not None and timeout <= 0:
                return False
            _wait(pgconn.socket, write=False, timeout=timeout)
        return True

    def _take(self, result: pq.PGresult | None) -> None:
        """One result of the head message: its statement's, the end of them, its Sync."""
        if result is None:  # the end of its statement's results
            return
        entry = self._in_flight[0]
        status = result.status
        if status == pq.ExecStatus.PIPELINE_SYNC:
            self._in_flight.popleft()
            if entry.flush:
                self._flushes -= 1
                if entry.error is None:  # every message committed before it is durable
                    self._unflushed.clear()
                else:  # they wait for the next flush
                    log.warning("flushing published messages: SQLSTATE %s: %s; trying again",
                                *entry.error)
                    self._uncovered += 1
            elif entry.error is not None:
                self._turned_down(entry)
            elif entry.awaits_flush:
                self._unflushed.append(entry)
        elif status not in OK and entry.error is None:
            state = result.error_field(pq.DiagnosticField.SQLSTATE) or b""
            if state.decode() in STATEMENT_ELSEWHERE_STATES:  # sent again, unprepared
                forgo_prepared(self._conn, self._conninfo)
            # The primary message only: the DETAIL may quote the row, payload and all.
            primary = (result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)
                       or result.error_message.split(b"\n", 1)[0])
            entry.error = (state.decode(), primary.decode(errors="replace").strip())

    def _turned_down(self, entry: _Sent) -> None:
        state, message = entry.error
        if state[:2] in REFUSED_CLASSES or entry.sends >= MAX_SENDS:
            log.error("message %s refused by the database and dropped (SQLSTATE %s: %s)",
                      entry.label, state, message)
            if entry.durable:
                self._refusals.append((entry.label, state, message))
        else:
            log.warning("message %s not stored (SQLSTATE %s: %s); sending it again",
                        entry.label, state, message)
            self._unsent.append(entry)

    def _report_refusals(self) -> None:
        """Raise ChannelError for the refusals no producer was told of yet."""
        if not self._refusals:
            return
        refusals, self._refusals = self._refusals, []
        named = "; ".join(f"{label} (SQLSTATE {state}: {message})"
                          for label, state, message in refusals[:REFUSALS_NAMED])
        more = len(refusals) - REFUSALS_NAMED
        raise ChannelError(
            f"{len(refusals)} message(s) published without confirms were refused by the "
            f"database and not stored: {named}" + (f"; and {more} more" if more > 0 else "")
            + ". Fix them and publish them again; this message was not sent."
        )

    def confirm(self, timeout: float | None = None, report: bool = True) -> bool:
        """Wait until the database confirmed every message sent so far
        (reconnecting and sending again if need be). False on timeout;
        ChannelError (when ``report``) if it refused some of them."""
        deadline = None if timeout is None else monotonic() + timeout
        failures = 0
        with self._lock:
            self._owe_notifications(float("inf"))
            while self.unconfirmed:
                if deadline is not None and monotonic() >= deadline:
                    return False
                try:
                    if self._broken or self._conn is None:
                        self._reconnect()
                    self._send_unsent()
                    self._send_flush()
                    self._read(block=True, deadline=deadline)
                except psycopg.OperationalError as exc:
                    self._broken = True
                    if deadline is not None and monotonic() >= deadline:
                        return False
                    if not failures:  # once per outage, not every 100 ms
                        log.warning("confirming publishes: %s; retrying", first_line(exc))
                    failures += 1
                    sleep(0.1)
            if report:
                self._report_refusals()
        return True

    def _start_confirmer(self) -> None:
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._confirm_in_background, name="pg_broker-confirms", daemon=True
            )
            self._thread.start()

    def _confirm_in_background(self) -> None:
        """Send the trailing notifications when due, read confirms the
        producer left unread, recover a lost connection."""
        backoff = CONFIRM_INTERVAL
        while True:
            if not self._wake.wait(None if self._conn is None else IDLE_CLOSE):
                self._close_if_idle()
                continue
            if self._closed:
                return
            self._doze()
            socket_fd = None
            with self._lock:
                if self._closed:
                    return
                try:
                    self._owe_notifications(monotonic())
                    if self._broken:
                        self._reconnect()
                        log.info("publishing again after a lost connection: %d message(s) "
                                 "sent again", self.unconfirmed)
                    elif self._conn is None and self._unsent:
                        self._reconnect()  # the first trailing notification of a confirmed publish
                    if self._conn is not None:
                        self._send_unsent()
                        self._send_flush()
                        self._read(block=False)
                    backoff = CONFIRM_INTERVAL
                except psycopg.OperationalError as exc:
                    self._broken = True
                    log.warning("publishing: %s; %d message(s) wait to be sent again",
                                first_line(exc), self.unconfirmed)
                    backoff = min(backoff * 2, 5.0)
                if not self.unconfirmed and not self._owed:
                    self._wake.clear()
                    continue
                if not self._broken and self.unconfirmed:
                    socket_fd = self._conn.pgconn.socket
            if self._broken:
                sleep(backoff)
            elif socket_fd is not None:
                _wait(socket_fd, write=False, timeout=self._pause())

    # Connection -----------------------------------------------------------------

    def _reconnect(self) -> None:
        """A fresh connection in pipeline mode; every unconfirmed durable
        message is queued to be sent again, transient ones are dropped."""
        self._close_connection()
        # A message committed asynchronously may be lost with the server
        # until a flush confirmed it: it goes again too.
        again = [e for e in (*self._unflushed, *self._in_flight) if e.durable]
        notify = self.statement.names.index("notify")
        for entry in again:  # their trailing notification may be lost with the connection
            entry.values[notify] = b"true"
        dropped = len(self._in_flight) - len(again)
        if dropped:
            log.info("%d unconfirmed transient message(s) dropped with the lost connection",
                     dropped)
        self._in_flight.clear()
        self._unflushed.clear()
        self._uncovered, self._uncovered_mode, self._flushes = 0, "local", 0
        self._unsent = deque([*again, *(e for e in self._unsent if not e.flush)])
        with redacting(self._conninfo):
            conn = psycopg.connect(self._conninfo, autocommit=True, **self._connect_kwargs)
        pgconn = conn.pgconn
        try:
            if prepares(conn):
                self.statement.prepare(pgconn)
                FLUSH.prepare(pgconn)
        except STATEMENT_ELSEWHERE:
            forgo_prepared(conn, self._conninfo)
        except psycopg.Error:
            conn.close()
            raise
        pgconn.enter_pipeline_mode()
        pgconn.nonblocking = 1
        self._conn = conn
        self._broken = False

    def _close_if_idle(self) -> None:
        """Close the connection when nothing was sent for ``IDLE_CLOSE`` and
        nothing waits (the next send opens a new one)."""
        with self._lock:
            if (self._conn is not None and not self._closed and not self.unconfirmed
                    and not self._owed and monotonic() - self._last_sent >= IDLE_CLOSE):
                self._close_connection()

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn)

    def close(self, timeout: float = 10.0) -> None:
        """Confirm what was sent (within ``timeout``), then close."""
        if self._closed:
            return
        if (self.unconfirmed or self._owed) and not self.confirm(timeout, report=False):
            log.error("%d published message(s) were not confirmed by the database within "
                      "%.0f s of closing and may be lost", self.unconfirmed, timeout)
        if self._refusals:
            log.error("closing with %d refused message(s) no publish reported: %s",
                      len(self._refusals), ", ".join(label for label, _, _ in self._refusals))
        with self._lock:
            self._closed = True
            self._wake.set()
            self._close_connection()
            self._unsent.clear()
            self._in_flight.clear()
            self._unflushed.clear()
            self._flushes = 0

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's connection and messages are the
        parent's (see :mod:`pg_broker.forking`)."""
        forking.disown(self._conn)
        self._conn = None
        self._unsent.clear()
        self._in_flight.clear()
        self._unflushed.clear()
        self._uncovered, self._uncovered_mode, self._flushes = 0, "local", 0
        self._notified.clear()
        self._published.clear()
        self._owed.clear()
        self._last_publish = None
        self._refusals.clear()
        self._broken = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._rescheduled = threading.Event()
        self._thread = None


def confirm_publishes(timeout: float | None = None) -> bool:
    """Wait until the database confirmed every message this process sent
    without waiting (transient ones, and all with ``confirm_publish=False``).

    False if some were still unconfirmed after ``timeout`` seconds: they may
    yet be stored. Raises kombu's ChannelError, naming them, if the database
    refused durable messages no publish has reported yet: those never will be.
    """
    confirmed = True
    for pipeline in list(_pipelines):
        confirmed = pipeline.confirm(timeout) and confirmed
    return confirmed


def _wait(fd: int, write: bool, timeout: float | None) -> tuple[bool, bool]:
    """Wait until ``fd`` is readable (or writable); (readable, writable)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | (select.POLLOUT if write else 0))
    events = poller.poll(None if timeout is None else max(timeout, 0) * 1000)
    mask = events[0][1] if events else 0
    failed = mask & (select.POLLERR | select.POLLHUP)
    return bool(mask & select.POLLIN or failed), bool(mask & select.POLLOUT)


@atexit.register
def _confirm_at_exit() -> None:
    for pipeline in list(_pipelines):
        pipeline.close()


@forking.on_fork
def _forget_shared() -> None:
    """In a forked child: the shared pipelines are the parent's; a lock
    another thread held at the fork stays taken in the child."""
    global _shared_lock
    _shared.clear()
    _shared_lock = threading.Lock()
