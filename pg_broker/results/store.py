"""The result backend's connection, and the only code of :mod:`pg_broker.results`
that runs SQL (the ``result_*`` statements of ``pg_broker/sql/queries.sql``).

One :class:`ResultStore` per process and database (:func:`shared_store`):
Celery keeps one backend object per thread, and every one of them, with every
waiter, shares this one autocommit connection. Statements hold its lock for
their round trip only; waiting for notifications happens without it (see
:mod:`.waiting`). A statement that loses the connection drops it, and the next
one reconnects (the waiters re-LISTEN then: :attr:`ResultStore.generation`).

In a forked child (a prefork pool's process) every store forgets the parent's
connection without closing it (closing would end the parent's session) and
opens its own when first used.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import psycopg
from psycopg import sql

from pg_broker import forking
from pg_broker.database import connect, session_defaults
from pg_broker.maintenance import ResultExpiry
from pg_broker.migrate import ensure_migrated
from pg_broker.queries import queries
from pg_broker.transport import connections
from pg_broker.transport.connections import CONNECT_DEFAULTS, close_quietly

log = logging.getLogger(__name__)

# Errors that mean "the database is out of reach now"; anything else is a bug
# or a refusal, and propagates as it is.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (psycopg.OperationalError, psycopg.InterfaceError)

# Keys recorded as awaited per transaction (each key takes an advisory lock
# until its transaction ends: PostgreSQL's lock table is finite).
AWAIT_BATCH = 100

_stores: dict[tuple[str, str | None], ResultStore] = {}
_stores_lock = threading.Lock()


def shared_store(conninfo: str, synchronous_commit: str | None) -> ResultStore:
    """This process's store for a database (created on first use)."""
    key = (conninfo, synchronous_commit)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = ResultStore(conninfo, synchronous_commit)
        return store


def _interval(seconds: float | None) -> timedelta | None:
    return None if seconds is None else timedelta(seconds=seconds)


class ResultStore:
    """Named result statements on one shared, self-healing connection."""

    def __init__(self, conninfo: str, synchronous_commit: str | None) -> None:
        self.conninfo = conninfo
        self.synchronous_commit = synchronous_commit
        self.connect_kwargs = {**session_defaults(conninfo, CONNECT_DEFAULTS), "autocommit": True}
        if "application_name" in self.connect_kwargs:
            self.connect_kwargs["application_name"] = "pg_broker results"
        self.lock = threading.RLock()
        # Bumped at every (re)connect: LISTENs of an earlier connection are gone.
        self.generation = 0
        # Called with the channel and payload of every notification the connection receives.
        self.on_notify: Callable[[str, str], None] = lambda channel, payload: None
        # Its waiters' ResultListener (pg_broker.results.waiting), once one waits.
        self.listener = None
        self._conn: psycopg.Connection | None = None
        self._used_at = 0.0
        self._closer: threading.Thread | None = None  # see _close_when_idle
        forking.forget_in_child(self)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """The connection, under its lock, (re)connected if need be; dropped
        when a statement finds it broken."""
        with self.lock:
            conn = self._connected()
            try:
                yield conn
            except CONNECTION_ERRORS:
                if self._conn is conn and (conn.closed or conn.broken):
                    self._conn = None
                    close_quietly(conn)
                raise
            finally:
                self._used_at = time.monotonic()

    def socket(self) -> int:
        """The connection's socket (connecting if need be), to wait on without the lock."""
        with self.lock:
            return self._connected().pgconn.socket

    def _connected(self) -> psycopg.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        ensure_migrated(self.conninfo)
        conn = connect(self.conninfo, **self.connect_kwargs)
        with conn.pipeline():
            conn.execute(queries["result_session_isolation"])
            if self.synchronous_commit is not None:
                conn.execute(queries["result_session_commit"], {"mode": self.synchronous_commit})
        conn.add_notify_handler(lambda notify: self.on_notify(notify.channel, notify.payload))
        self._conn = conn
        self.generation += 1
        if self._closer is None:
            self._closer = threading.Thread(target=self._close_when_idle, daemon=True,
                                            name="pg_broker-results-idle")
            self._closer.start()
        return conn

    def _close_when_idle(self) -> None:
        """Close the connection once unused for ``IDLE_CLOSE`` seconds while
        no result is awaited (no LISTEN to keep): a worker stores results on
        it, and an idle worker keeps its work and LISTEN connections only
        (issue 12). The next statement connects again."""
        while True:
            idle = connections.IDLE_CLOSE
            time.sleep(max(self._used_at + idle - time.monotonic(), min(idle, 1.0)))
            with self.lock:
                if self._conn is None or self._conn.closed:
                    self._closer = None
                    return
                awaited = self.listener is not None and self.listener.busy()
                if time.monotonic() - self._used_at >= idle and not awaited:
                    conn, self._conn = self._conn, None
                    close_quietly(conn)
                    self._closer = None
                    return

    def read_notifications(self) -> None:
        """Take what arrived on the socket: notifications go to :attr:`on_notify`."""
        with self.connection() as conn:
            pgconn = conn.pgconn
            pgconn.consume_input()
            if pgconn.status == psycopg.pq.ConnStatus.BAD:
                raise psycopg.OperationalError("the result backend's connection was lost")
            while (notify := pgconn.notifies()) is not None:
                pgconn.notify_handler(notify)

    def close(self) -> None:
        with self.lock:
            conn, self._conn = self._conn, None
            close_quietly(conn)

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's connection (and waiters) are the
        parent's (see :mod:`pg_broker.forking`)."""
        forking.disown(self._conn)
        self._conn = None
        self._closer = None
        self.lock = threading.RLock()
        if self.listener is not None:
            self.listener.forget_after_fork()

    # Statements -------------------------------------------------------------

    def _run(self, query: str, params: dict, retry: bool = True) -> list[tuple]:
        """Run a statement; once more on a new connection when the session
        turned out to be gone (a database restart, an idle session ended):
        every statement here but ``result_incr`` gives the same result when
        run twice."""
        try:
            return self._once(query, params)
        except CONNECTION_ERRORS as exc:
            if not retry or self._conn is not None:  # not dropped: the session is alive
                raise
            log.info("result backend: %s; again on a new connection", exc)
        return self._once(query, params)

    def _once(self, query: str, params: dict) -> list[tuple]:
        with self.connection() as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def get(self, key: str) -> bytes | None:
        rows = self._run(queries["result_get"], {"key": key})
        return rows[0][0] if rows else None

    def mget(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        if not keys:
            return {}
        return dict(self._run(queries["result_mget"], {"keys": keys}))

    def listen_and_read(self, listen: dict[str, str], unlisten: dict[str, str],
                        keys: Iterable[str]) -> dict[str, bytes]:
        """Start waiting for the keys of ``listen`` (channel -> key: LISTEN
        on their channels and record the keys as awaited, so that their
        writes notify: migrations/core/200), stop waiting for those of
        ``unlisten`` (UNLISTEN, records deleted), then read ``keys`` and the
        keys of ``listen`` (as :meth:`mget`): one round trip, pipelined, one
        transaction (read committed: the read sees what committed before the
        records), or one more per further ``AWAIT_BATCH`` keys recorded. Not
        retried: after a lost connection the waiters LISTEN again."""
        batch = ([sql.SQL("LISTEN {}").format(sql.Identifier(c)) for c in listen]
                 + [sql.SQL("UNLISTEN {}").format(sql.Identifier(c)) for c in unlisten])
        awaited = list(listen.values())
        keys = list(dict.fromkeys([*keys, *awaited]))
        if not batch:
            return self.mget(keys)
        with self.connection() as conn:
            with conn.pipeline() as pipeline:
                for statement in batch:
                    conn.execute(statement)
                if unlisten:
                    conn.execute(queries["result_unwait"], {"keys": list(unlisten.values())})
                for start in range(0, len(awaited), AWAIT_BATCH):
                    if start:  # each further batch its own transaction: a bounded number of locks
                        pipeline.sync()
                    conn.execute(queries["result_await"],
                                 {"keys": awaited[start:start + AWAIT_BATCH]})
                if not keys:
                    return {}
                cursor = conn.execute(queries["result_mget"], {"keys": keys})
            return dict(cursor.fetchall())

    def set(self, key: str, value: bytes, state: str | None, expires: float | None,
            keep_success: bool = False) -> bool:
        """Write ``key`` and wake its waiters, if any; False when
        ``keep_success`` found a SUCCESS there (nothing written)."""
        (written,), = self._run(queries["result_set"], {
            "key": key, "value": value, "state": state, "expires": _interval(expires),
            "keep_success": keep_success,
        })
        return written is not None

    def delete(self, key: str) -> None:
        self._run(queries["result_delete"], {"key": key})

    def expire(self, key: str, expires: float | None) -> None:
        self._run(queries["result_expire"], {"key": key, "expires": _interval(expires)})

    def incr(self, key: str) -> int:
        return self._run(queries["result_incr"], {"key": key}, retry=False)[0][0]

    def chord_part_returned(self, key: str, part: str, size: int | None, claimer: str,
                            claim: float, expires: float | None) -> tuple[int, bool, int | None]:
        """(parts counted, whether ``claimer`` now holds the chord and sends
        its callback, the size that decided: None when neither the chord nor
        ``size`` says)."""
        parts, claimed, size = self._run(queries["result_chord_part_returned"], {
            "key": key, "part": part, "size": size, "claimer": claimer,
            "claim": _interval(claim), "expires": _interval(expires),
        })[0]
        return parts, claimed, size

    def chord_part_stored(self, key: str, value: bytes, state: str | None,
                          expires: float | None, chord: str, part: str, claimer: str,
                          claim: float, chord_expires: float | None
                          ) -> tuple[int, bool, int | None]:
        """:meth:`set` (keeping a SUCCESS) and :meth:`chord_part_returned`
        (without a size) in one statement: a chord's header task returned."""
        parts, claimed, size = self._run(queries["result_chord_part_stored"], {
            "key": key, "value": value, "state": state, "expires": _interval(expires),
            "keep_success": True, "chord": chord, "part": part, "claimer": claimer,
            "claim": _interval(claim), "chord_expires": _interval(chord_expires),
        })[0]
        return parts, claimed, size

    def chord_size(self, key: str, size: int, expires: float | None) -> None:
        self._run(queries["result_chord_size"], {"key": key, "size": size,
                                        "expires": _interval(expires)})

    def chord_done(self, key: str) -> None:
        self._run(queries["result_chord_done"], {"key": key})

    def cleanup(self) -> int:
        """Delete every expired result and chord counter (:class:`ResultExpiry`)."""
        with self.connection() as conn:
            return ResultExpiry().run(conn)


@forking.on_fork
def _forget_stores_lock() -> None:
    """A lock another thread held at the fork stays taken in the child (the
    stores forget their own connections)."""
    global _stores_lock
    _stores_lock = threading.Lock()
