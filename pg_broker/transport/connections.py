"""The transport's PostgreSQL connections: how they are opened (libpq
parameters, the response deadline), which errors mean one was lost, and the
work connection every statement of a process's transport runs on, reopened
when its session is gone and disowned (never closed) in a forked child."""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import psycopg
from kombu.transport import virtual
from kombu.utils import json as kombu_json
from psycopg.conninfo import make_conninfo
from psycopg.types.json import set_json_loads

from pg_broker import forking
from pg_broker.database import DatabaseUnavailable
from pg_broker.masking import redacting
from pg_broker.urls import SCHEME, libpq_url

from . import deadline

log = logging.getLogger(__name__)

# libpq parameters the broker URL may override. When packets stop getting
# through, keepalives find an idle connection (LISTEN) dead after 10 + 3 x 5 =
# 25 s, and tcp_user_timeout one whose data goes unacknowledged (mid-query)
# after 20 s instead of the kernel's ~15 minutes of retransmissions; the
# connect timeout bounds a connect attempt while the database is down. A peer
# that acknowledges but never replies is response_timeout's (deadline.py).
CONNECT_DEFAULTS = {
    "application_name": "pg_broker",
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",
}

# A read-only database (a managed service's answer to a full disk, a standby
# after failover) refuses writes until it is writable again: a connection
# error, so Celery's consumer and kombu's publish retry back off and
# reconnect, and the new session sees the database's settings as they are
# then (an open session keeps default_transaction_read_only).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = virtual.Transport.connection_errors + (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.ReadOnlySqlTransaction,
    DatabaseUnavailable,
)


# A named prepared statement missing from the session, or one already there:
# a transaction-mode pooler (PgBouncer before 1.21 or without
# max_prepared_statements, Supavisor on port 6543) ran the statement on
# another server session than the one it was prepared on. Neither ran it.
STATEMENT_ELSEWHERE: tuple[type[psycopg.Error], ...] = (
    psycopg.errors.InvalidSqlStatementName,
    psycopg.errors.DuplicatePreparedStatement,
)

_warned_unprepared: set[str] = set()

T = TypeVar("T")

# A connection a process opens beside its work and LISTEN connections (the
# pipeline's, the result backend's) closes after this many idle seconds, so
# that an idle worker holds those two only (issue 12); the next use opens it
# again.
IDLE_CLOSE = 10.0


def prepares(conn: psycopg.Connection) -> bool:
    """Whether statements on ``conn`` may be named prepared statements
    (the ``prepared_statements`` transport option, unless a pooler showed
    that they do not survive there: :func:`forgo_prepared`)."""
    return conn.prepare_threshold is not None


def forgo_prepared(conn: psycopg.Connection, conninfo: str) -> None:
    """After a :data:`STATEMENT_ELSEWHERE` error: no named prepared statement
    on ``conn`` from now on (psycopg's nor the publish's), said once per
    process and database."""
    conn.prepare_threshold = None
    if conninfo not in _warned_unprepared:
        _warned_unprepared.add(conninfo)
        log.warning("prepared statements do not survive on this connection: a transaction-mode "
                    "pooler sits in front of the database. Statements go unprepared from now on; "
                    "set the transport option prepared_statements=False to start that way")


def conninfo(client) -> str:
    """The libpq connection string for a kombu Connection (URL form, or separate fields)."""
    hostname = client.hostname or ""
    if "://" in hostname:
        return libpq_url(hostname)
    if not hostname:
        return libpq_url(f"{SCHEME}://")
    # make_conninfo quotes what a URL would have to escape (an @ or : in a password).
    return make_conninfo(
        host=hostname, port=client.port or None, user=client.userid or None,
        password=client.password or None,
        dbname=(client.virtual_host or "").lstrip("/") or None,
    )


class PerProcess(Generic[T]):
    """One ``T`` per process and database (its conninfo, connect keyword
    arguments and response deadline), made on first use; a forked child
    starts with none (each ``T`` disowns its own connection)."""

    def __init__(self, make: Callable[[str, dict, float], T]) -> None:
        self._make = make
        self._objects: dict[tuple, T] = {}
        self._lock = threading.Lock()
        forking.on_fork(self._forget)

    def get(self, conninfo: str, connect_kwargs: dict, response_timeout: float) -> T:
        key = (conninfo, tuple(sorted(connect_kwargs.items())), response_timeout)
        with self._lock:
            made = self._objects.get(key)
            if made is None:
                made = self._objects[key] = self._make(conninfo, connect_kwargs, response_timeout)
            return made

    def find(self, conninfo: str) -> T | None:
        """The one made first for ``conninfo``, whatever its other arguments; None if none."""
        with self._lock:
            return next((made for key, made in self._objects.items() if key[0] == conninfo), None)

    def _forget(self) -> None:
        # A lock another thread held at the fork stays taken in the child.
        self._objects.clear()
        self._lock = threading.Lock()


def shared_work(conninfo: str, connect_kwargs: dict, response_timeout: float) -> WorkConnection:
    """The process's work connection to this database: every kombu Connection
    of a process runs its statements on one session (a Celery worker holds
    a consumer and a producer-pool connection, Flower one per concurrent
    inspect call), each of them a user (:meth:`WorkConnection.use`) until it
    closes (:meth:`WorkConnection.leave`)."""
    return _work.get(conninfo, connect_kwargs, response_timeout)


class WorkConnection:
    """The autocommit work connection of a process's transports to one
    database (:func:`shared_work`), opened on first use and again after it
    was lost, closed when its last user leaves. The consuming thread, the
    lease thread and every transport of the process share it (psycopg
    connections are thread-safe; the statements are short, each its own
    transaction)."""

    def __init__(self, conninfo: str, connect_kwargs: dict, response_timeout: float) -> None:
        self.conninfo = conninfo
        self.connect_kwargs = connect_kwargs
        self.response_timeout = response_timeout
        self._conn: psycopg.Connection | None = None
        self._connecting = threading.Lock()
        self._users: set[int] = set()
        forking.forget_in_child(self)

    @property
    def conn(self) -> psycopg.Connection:
        """The connection, reopened when it was lost."""
        conn = self._conn
        if conn is None or conn.closed:
            with self._connecting:  # the lease thread may want it at the same time
                conn = self._conn
                if conn is None or conn.closed:
                    with redacting(self.conninfo):
                        conn = deadline.connect(self.conninfo, self.response_timeout,
                                                autocommit=True, **self.connect_kwargs)
                    set_json_loads(kombu_json.loads, conn)
                    self._conn = conn
        return conn

    def live(self) -> psycopg.Connection:
        """The connection for a statement that must not run twice (a lone
        publish, see :meth:`.pipeline.Pipeline.takes`), replaced first if the
        server ended the session while it was idle (a restart,
        pg_terminate_backend: its socket is readable with no statement
        running), as the pipeline replaces its own."""
        conn = self.conn
        with conn.lock:  # no statement in flight: whatever is readable is the server's last word
            poller = select.poll()  # not select(): a busy process's descriptors pass 1023
            poller.register(conn.pgconn.socket, select.POLLIN)
            ended = bool(poller.poll(0))
        if ended:
            self.drop()
        return self.conn

    @property
    def open(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def execute(self, query: str, params: dict | None = None, row_factory=None) -> psycopg.Cursor:
        """Run a statement.

        A session that turns out to be gone (terminated, or the server
        restarted since) costs one retry on a fresh connection, not a consumer
        restart; one the deadline cut (the path stopped answering,
        :mod:`.deadline`) does not: its error goes up at once. Only for
        statements that may run twice, should the first have committed
        unseen: settlements are fenced by lease tokens, declarations are
        upserts, reads are reads; a claim whose reply was lost leaves its rows
        to their lease, as a crash would. Publishes and purges never come here.
        """
        return self.retrying(
            lambda conn: conn.cursor(row_factory=row_factory).execute(query, params))

    def retrying(self, run: Callable[[psycopg.Connection], T]) -> T:
        """``run(connection)`` as :meth:`execute` runs its statement: again
        on a fresh session when the old one turned out to be gone, again
        unprepared when a pooler lost its prepared statement."""
        conn = self.conn
        try:
            return run(conn)
        except psycopg.errors.ReadOnlySqlTransaction:
            self.drop_read_only(conn)
            raise
        except STATEMENT_ELSEWHERE:
            forgo_prepared(conn, self.conninfo)
        except CONNECTION_ERRORS:
            if not conn.closed or getattr(conn, "cut_after", None) is not None:
                raise
        return run(self.conn)

    def drop_read_only(self, conn: psycopg.Connection) -> None:
        """``conn`` found the database read-only: an open session stays so
        (default_transaction_read_only), so the next statement, of whichever
        transport of the process, opens a new one."""
        if conn is self._conn:
            self.drop()

    def drop(self) -> None:
        """Close the connection once no statement runs on it; its next use
        opens a new session."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with conn.lock:
                close_quietly(conn)

    def use(self, user: object) -> None:
        """``user`` (a transport) runs statements here until it leaves."""
        with self._connecting:
            self._users.add(id(user))

    def leave(self, user: object) -> None:
        """``user`` is done; the last to leave closes the connection (a
        later use opens it again)."""
        with self._connecting:
            self._users.discard(id(user))
            if self._users:
                return
        self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn)

    def forget_after_fork(self) -> None:
        """In a forked child: the connection is the parent's (see :mod:`pg_broker.forking`)."""
        forking.disown(self._conn)
        self._conn = None
        self._connecting = threading.Lock()
        self._users = set()


_work: PerProcess[WorkConnection] = PerProcess(WorkConnection)


def close_quietly(conn: psycopg.Connection | None) -> None:
    """Close ``conn`` if open; a connection that is already broken is just dropped."""
    if conn is not None and not conn.closed:
        try:
            conn.close()
        except psycopg.Error:
            log.debug("closing a broker connection failed", exc_info=True)
