"""The result backend's connection, and the only code of :mod:`pg_broker.results`
that runs SQL (the ``result_*`` statements of ``pg_broker/sql/queries.sql``).

One :class:`ResultStore` per process and database (:func:`shared_store`):
Celery keeps one backend object per thread, and every one of them shares
this one autocommit connection for writes and reads. Statements hold its lock
for their round trip only. A statement that loses the connection drops it,
and the next one reconnects. The waiters' statements (their LISTENs, records
and reads: :meth:`ResultStore.listen_and_read`) run on the process's LISTEN
session instead, which the transport's consumers share (:mod:`.waiting`).

In a forked child (a prefork pool's process) every store forgets the parent's
connection without closing it (closing would end the parent's session) and
opens its own when first used.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import psycopg
from psycopg import pq, sql

from pg_broker import forking
from pg_broker.database import connect, session_defaults
from pg_broker.maintenance import ResultExpiry
from pg_broker.migrate import ensure_migrated
from pg_broker.queries import queries
from pg_broker.transport import connections, deadline
from pg_broker.transport.connections import CONNECT_DEFAULTS, close_quietly
from pg_broker.transport.store import OK, check, pipeline_results, positional

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

    def _connected(self) -> psycopg.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        ensure_migrated(self.conninfo)
        conn = connect(self.conninfo, **self.connect_kwargs)
        with conn.pipeline():
            conn.execute(queries["result_session_isolation"])
            if self.synchronous_commit is not None:
                conn.execute(queries["result_session_commit"], {"mode": self.synchronous_commit})
        self._conn = conn
        if self._closer is None:
            self._closer = threading.Thread(target=self._close_when_idle, daemon=True,
                                            name="pg_broker-results-idle")
            self._closer.start()
        return conn

    def _close_when_idle(self) -> None:
        """Close the connection once unused for ``IDLE_CLOSE`` seconds (its
        waiters LISTEN elsewhere): a worker stores results on it, and an idle
        worker keeps its work and LISTEN connections only (issue 12). The
        next statement connects again."""
        while True:
            idle = connections.IDLE_CLOSE
            time.sleep(max(self._used_at + idle - time.monotonic(), min(idle, 1.0)))
            with self.lock:
                if self._conn is None or self._conn.closed:
                    self._closer = None
                    return
                if time.monotonic() - self._used_at >= idle:
                    conn, self._conn = self._conn, None
                    close_quietly(conn)
                    self._closer = None
                    return

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

    def listen_and_read(self, conn: psycopg.Connection, listen: dict[str, str],
                        unlisten: dict[str, str], keys: Iterable[str],
                        isolate: bool = False) -> dict[str, bytes]:
        """On ``conn`` (the process's LISTEN session, idle, autocommit; the
        caller holds its lock): start waiting for the keys of ``listen``
        (channel -> key: LISTEN on their channels and record the keys as
        awaited, so that their writes notify: migrations/core/200), stop
        waiting for those of ``unlisten`` (UNLISTEN, records deleted), then
        read ``keys`` and the keys of ``listen`` (as :meth:`mget`): one round
        trip, pipelined, one transaction (read committed, which ``isolate``
        sets for the session first: the read sees what committed before the
        records), or one more per further ``AWAIT_BATCH`` keys recorded.
        Raises OperationalError when the connection was lost (not retried:
        the waiters LISTEN again on the new one).

        Run through libpq, waiting for the socket with ``poll`` (without the
        interpreter lock): a record can wait for a write's commit (its key's
        lock), and that write may be this process's own, in another thread;
        a statement of psycopg's pipeline was once seen waiting inside libpq
        holding the interpreter lock, so that the write never committed."""
        statements: list[Statement | None] = []  # None: a transaction ends there
        if isolate:
            statements.append((ISOLATION, []))
        statements += [(sql.SQL("LISTEN {}").format(sql.Identifier(c)).as_bytes(conn), [])
                       for c in listen]
        statements += [(sql.SQL("UNLISTEN {}").format(sql.Identifier(c)).as_bytes(conn), [])
                       for c in unlisten]
        if unlisten:
            statements.append((UNWAIT, [text_array(unlisten.values())]))
        awaited = list(listen.values())
        for start in range(0, len(awaited), AWAIT_BATCH):
            if start:  # each further batch its own transaction: a bounded number of locks
                statements.append(None)
            statements.append((AWAIT, [text_array(awaited[start:start + AWAIT_BATCH])]))
        keys = list(dict.fromkeys([*keys, *awaited]))
        if keys:
            statements.append((MGET, [text_array(keys)]))
        if not statements:
            return {}
        last = pipelined(conn, statements)
        if not keys:
            return {}
        return {last.get_value(row, 0).decode(): last.get_value(row, 1)
                for row in range(last.ntuples)}

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

    def chord_header(self, key: str, prefix: str) -> list[tuple[str, bytes | None]]:
        """(part, its task's encoded meta or None) for every part the chord
        counted; a task's key is ``prefix`` and its id."""
        return [(part, value) for part, value in
                self._run(queries["result_chord_header"], {"key": key, "prefix": prefix})]

    def chord_size(self, key: str, size: int, expires: float | None) -> None:
        self._run(queries["result_chord_size"], {"key": key, "size": size,
                                        "expires": _interval(expires)})

    def chord_done(self, key: str) -> None:
        self._run(queries["result_chord_done"], {"key": key})

    def cleanup(self) -> int:
        """Delete every expired result and chord counter (:class:`ResultExpiry`)."""
        with self.connection() as conn:
            return ResultExpiry().run(conn)


# The waiters' statements, run through libpq (ResultStore.listen_and_read).
Statement = tuple[bytes, list[bytes | None]]  # the query, its parameters in text format
ISOLATION = positional(queries["result_session_isolation"])[0].encode()
UNWAIT = positional(queries["result_unwait"])[0].encode()
AWAIT = positional(queries["result_await"])[0].encode()
MGET = positional(queries["result_mget"])[0].encode()


def text_array(values: Iterable[str]) -> bytes:
    """A ``text[]`` parameter in PostgreSQL's text format."""
    quoted = ('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for value in values)
    return ("{" + ",".join(quoted) + "}").encode()


def pipelined(conn: psycopg.Connection, statements: list[Statement | None]) -> pq.abc.PGresult:
    """Run ``statements`` on ``conn`` (idle, autocommit) in one round trip
    (libpq pipeline mode; None ends a transaction, as does the last one), results
    in binary format; the last one's result. Waits for the socket with
    ``poll``, never inside libpq (see :meth:`ResultStore.listen_and_read`).
    Raises the first statement's error, if one failed; notifications that
    arrived meanwhile go to the connection's handler."""
    with conn.lock, deadline.waiting(conn):
        pgconn = conn.pgconn
        pgconn.enter_pipeline_mode()
        syncs = 0
        try:
            for statement in statements:
                if statement is None:
                    pgconn.pipeline_sync()
                    syncs += 1
                else:
                    pgconn.send_query_params(statement[0], statement[1],
                                             result_format=pq.Format.BINARY)
            pgconn.pipeline_sync()
            syncs += 1
            results, failed = _pipeline_results(pgconn, syncs)
        finally:
            if pgconn.status != pq.ConnStatus.BAD:
                pgconn.exit_pipeline_mode()
        while (notify := pgconn.notifies()) is not None:
            pgconn.notify_handler(notify)
    if failed is not None or len(results) < len([s for s in statements if s is not None]):
        check(pgconn, failed)
    return results[-1]


def _pipeline_results(pgconn: pq.abc.PGconn, syncs: int
                      ) -> tuple[list[pq.abc.PGresult], pq.abc.PGresult | None]:
    """Every result up to the ``syncs``-th sync that succeeded, and the first
    that failed (not counting those aborted after it)."""
    results: list[pq.abc.PGresult] = []
    failed = None
    for result in pipeline_results(pgconn, syncs):
        if result.status in OK:
            results.append(result)
        elif failed is None and result.status != pq.ExecStatus.PIPELINE_ABORTED:
            failed = result
    return results, failed


@forking.on_fork
def _forget_stores_lock() -> None:
    """A lock another thread held at the fork stays taken in the child (the
    stores forget their own connections)."""
    global _stores_lock
    _stores_lock = threading.Lock()
