"""The transport's store: the only code that runs its statements.

(Longer than ~400 lines on purpose: being the one place that runs the
transport's statements is its job — one short method per statement, plus the
libpq path (:class:`Prepared`) the publish, the flush and the claim share.
Splitting it by statement would scatter that rule.)

Every statement is a named one of ``pg_broker/sql/queries.sql``
(``transport_*``); each method here runs one and returns what it returned as
named rows (the ``NamedTuple`` types below) or plain values. The channel,
the delivery and settlement code and the lease thread (:mod:`.leases`) call
it; the publish pipeline (:mod:`.pipeline`) sends the store's prepared
publish statement, :data:`PUBLISH`.

Statements run on the transport's work connection
(:class:`.connections.WorkConnection`), retried once on a fresh session
when the old one turned out to be gone — except the publish and the purge,
which must never run twice.

The publish and the claim are the hottest statements: :class:`Prepared` runs
them through libpq directly, without a cursor or psycopg's adaptation (every
parameter is text the statement casts), a fraction of psycopg's per-call cost.
"""

from __future__ import annotations

import re
import select
import uuid
import weakref
from collections.abc import Iterable
from datetime import timedelta
from typing import NamedTuple

import psycopg
from kombu.utils import json as kombu_json
from psycopg import pq
from psycopg.rows import scalar_row
from psycopg.types.json import Jsonb

from pg_broker.maintenance import Retention
from pg_broker.queries import queries

from . import deadline
from .connections import STATEMENT_ELSEWHERE, WorkConnection, forgo_prepared, prepares
from .messages import dumps

OK = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)

Held = tuple[int, uuid.UUID]  # a held row: (job_tasks id, lease token)


# Rows --------------------------------------------------------------------------


class Claimed(NamedTuple):
    """A row of ``transport_claim``: a row claimed (``claimed``) or one acked."""

    claimed: bool
    id: int
    payload: object  # the Kombu message (decoded by kombu's JSON); None for an acked row
    attempts: int | None
    priority: int | None
    sequence: int | None


class Transient(NamedTuple):
    """A message taken from a non-durable queue (``transport_take_transient``)."""

    id: int
    payload: object
    priority: int


class Binding(NamedTuple):
    """A row of an exchange's binding table, as kombu's exchange types read it."""

    routing_key: str
    pattern: str
    queue: str


class Failed(NamedTuple):
    """A row ``transport_fail`` rejected: its status after, None when its lease was lost."""

    id: int
    status: str | None


class Maintenance(NamedTuple):
    """What a run of ``transport_maintain`` did."""

    reclaimed: int
    dropped: int


def _rows(row_type: type[NamedTuple]):
    """A psycopg row factory making ``row_type`` rows (by position)."""
    make = row_type._make
    return lambda cursor: make


TRANSIENT_ROWS = _rows(Transient)
BINDING_ROWS = _rows(Binding)
FAILED_ROWS = _rows(Failed)
MAINTENANCE_ROWS = _rows(Maintenance)


# Statements run through libpq directly -------------------------------------------


def positional(query: str) -> tuple[str, list[str]]:
    """``%(name)s`` placeholders as ``$n``; returns the query and the names in order."""
    names: list[str] = []

    def number(match: re.Match) -> str:
        if match.group(0) == "%%":
            return "%"
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return re.sub(r"%%|%\((\w+)\)s", number, query), names


def text_value(value: object) -> bytes | None:
    """A parameter in PostgreSQL's text format (the statement casts each one);
    a list of numbers or UUIDs as an array."""
    if value is None:
        return None
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if hasattr(value, "total_seconds"):  # a timedelta, for an interval
        return f"{value.total_seconds()} seconds".encode()
    if isinstance(value, list):
        return ("{" + ",".join(map(str, value)) + "}").encode()
    return str(value).encode()


class Prepared:
    """A named statement of queries.sql run through libpq directly: no cursor,
    no adaptation (every parameter is text the statement casts), a fraction
    of psycopg's per-call cost on the hottest path, the publish."""

    def __init__(self, name: str, query: str) -> None:
        self.name = name.encode()
        text, names = positional(query)
        self.text = text.encode()
        self.names = tuple(names)
        self._prepared_on: weakref.WeakSet[psycopg.Connection] = weakref.WeakSet()

    def values(self, params: dict) -> list[bytes | None]:
        return [text_value(params[name]) for name in self.names]

    def prepare(self, pgconn: pq.abc.PGconn) -> None:
        """Prepare on a connection not in pipeline mode (blocks)."""
        check(pgconn, pgconn.prepare(self.name, self.text))

    def send(self, pgconn: pq.abc.PGconn, values: list[bytes | None], prepared: bool) -> None:
        """Send it in pipeline mode: by name (prepared on the connection), or
        as an unnamed statement."""
        if prepared:
            pgconn.send_query_prepared(self.name, values)
        else:
            pgconn.send_query_params(self.text, values)

    def execute(self, conn: psycopg.Connection, params: dict) -> pq.abc.PGresult:
        """Run on ``conn`` (idle in autocommit, or in an open transaction) and
        wait; prepares the statement once per connection, unless the
        connection takes no prepared statements (``prepare_threshold`` None:
        the ``prepared_statements`` option, or a transaction-mode pooler
        found out; then it is one unnamed statement, parsed each time)."""
        values = self.values(params)
        with conn.lock, deadline.waiting(conn):
            pgconn = conn.pgconn
            if not prepares(conn):
                return check(pgconn, pgconn.exec_params(self.text, values))
            if conn not in self._prepared_on:
                self.prepare(pgconn)
                self._prepared_on.add(conn)
            return check(pgconn, pgconn.exec_prepared(self.name, values))


def execute_then(first: Prepared, first_params: dict, then: Prepared, then_params: dict,
                 conn: psycopg.Connection) -> tuple[pq.abc.PGresult, pq.abc.PGresult]:
    """Run ``first`` and then ``then`` on ``conn`` (idle, autocommit), each its
    own transaction, in one round trip (libpq pipeline mode: the server runs
    the second once the first committed, whether or not it succeeded).
    Returns both results, unchecked (see :func:`check`); raises
    OperationalError when the connection was lost."""
    values = (first.values(first_params), then.values(then_params))
    with conn.lock, deadline.waiting(conn):
        pgconn = conn.pgconn
        prepared = prepares(conn)
        if prepared:
            for statement in (first, then):
                if conn not in statement._prepared_on:
                    statement.prepare(pgconn)
                    statement._prepared_on.add(conn)
        pgconn.enter_pipeline_mode()
        try:
            first.send(pgconn, values[0], prepared)
            pgconn.pipeline_sync()
            then.send(pgconn, values[1], prepared)
            pgconn.pipeline_sync()
            results = pipeline_results(pgconn, 2)
        finally:
            if pgconn.status != pq.ConnStatus.BAD:
                pgconn.exit_pipeline_mode()
        if len(results) < 2:
            check(pgconn, None)
        return results[0], results[1]


def pipeline_results(pgconn: pq.abc.PGconn, syncs: int) -> list[pq.abc.PGresult]:
    """Every result of a pipeline (in pipeline mode, ``syncs`` syncs sent)
    up to its ``syncs``-th sync, unchecked; fewer when the connection is lost.
    get_result() blocks holding the GIL while libpq is busy, so the socket is
    awaited here, without it (and flushed first: a long batch may fill its
    buffer)."""
    results: list[pq.abc.PGresult] = []
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN | select.POLLOUT)
    while pgconn.flush():
        poller.poll()
        pgconn.consume_input()
    poller.modify(pgconn.socket, select.POLLIN)
    while syncs and pgconn.status != pq.ConnStatus.BAD:
        pgconn.consume_input()
        if pgconn.is_busy():
            poller.poll()
            continue
        result = pgconn.get_result()
        if result is None:
            continue
        if result.status == pq.ExecStatus.PIPELINE_SYNC:
            syncs -= 1
        else:
            results.append(result)
    return results


def check(pgconn: pq.abc.PGconn, result: pq.abc.PGresult | None) -> pq.abc.PGresult:
    """``result`` if it succeeded; else the psycopg exception it means
    (OperationalError when the connection is gone)."""
    if result is not None and result.status in OK:
        return result
    message = (result.error_message if result is not None else pgconn.error_message)
    if pgconn.status == pq.ConnStatus.BAD or result is None:
        raise psycopg.OperationalError(message.decode(errors="replace").strip())
    raise psycopg.errors.error_from_result(result)


PUBLISH = Prepared("pg_broker_publish", queries["transport_publish"])
FLUSH = Prepared("pg_broker_flush", queries["transport_flush"])
CLAIM = Prepared("pg_broker_claim_rows", queries["transport_claim"])


def _claimed(result: pq.abc.PGresult) -> list[Claimed]:
    """``transport_claim``'s rows, from its text-format result."""
    value = result.get_value
    rows = []
    for row in range(result.ntuples):
        payload, attempts, priority, sequence = (value(row, column) for column in (2, 3, 4, 5))
        rows.append(Claimed(
            value(row, 0) == b"t", int(value(row, 1)),
            None if payload is None else kombu_json.loads(payload),
            None if attempts is None else int(attempts),
            None if priority is None else int(priority),
            None if sequence is None else int(sequence)))
    return rows


def _held(held: Iterable[Held]) -> dict:
    held = list(held)
    return {"ids": [row_id for row_id, _ in held], "tokens": [token for _, token in held]}


class Store:
    """The transport's statements, on its work connection."""

    def __init__(self, work: WorkConnection) -> None:
        self.work = work

    # Publishing ---------------------------------------------------------------

    def publish(self, params: dict, lone: bool = False,
                visible_before_flush: bool = False) -> None:
        """Store and notify one message (``transport_publish``) in a
        transaction of its own; returns after the commit. A prepared
        statement a pooler lost ran nothing: the publish goes again unprepared.
        ``lone``: a publish that would be pipelined in a burst (see
        :meth:`.connections.WorkConnection.live`).

        ``visible_before_flush`` (the transport option): the publish commits
        asynchronously, so a waiting consumer claims it at once, then
        ``transport_flush``, pipelined behind it (one round trip), waits for
        its WAL flush as the publish's own commit mode would have (nothing to
        wait for when that is ``off``)."""
        conn = self.work.live() if lone else self.work.conn
        mode = params["synchronous_commit"]
        flush = visible_before_flush and mode != "off"
        if flush:
            params = dict(params, synchronous_commit="off")
        flushed = {"synchronous_commit": mode}
        try:
            if not flush:
                self._run(PUBLISH, conn, params)
                return
            try:  # the publish and its flush in one round trip
                published, flush_result = execute_then(PUBLISH, params, FLUSH, flushed, conn)
                check(conn.pgconn, published)
            except STATEMENT_ELSEWHERE:  # the publish ran nothing: again, unprepared
                forgo_prepared(conn, self.work.conninfo)
                published, flush_result = execute_then(PUBLISH, params, FLUSH, flushed, conn)
                check(conn.pgconn, published)
        except psycopg.errors.ReadOnlySqlTransaction:
            self.work.drop_read_only(conn)
            raise
        try:
            check(conn.pgconn, flush_result)
        except STATEMENT_ELSEWHERE:  # running it again waits for nothing it has not waited for
            self._run(FLUSH, conn, flushed)

    def _run(self, statement: Prepared, conn: psycopg.Connection, params: dict) -> None:
        """Run ``statement`` on ``conn``; when its prepared statement was lost
        behind a pooler (which ran nothing), again unprepared, as every
        statement on ``conn`` goes from then on."""
        try:
            statement.execute(conn, params)
        except STATEMENT_ELSEWHERE:
            forgo_prepared(conn, self.work.conninfo)
            statement.execute(conn, params)

    @staticmethod
    def publish_in(conn: psycopg.Connection, params: dict) -> None:
        """Store one message in the caller's transaction on ``conn`` (see
        :func:`.channel.enqueue_in`): visible, and notified, at its commit.
        Never handed off to a waiting consumer: its lease would run while
        the caller's transaction stays open."""
        params = {**params, "hand_off": False}
        if (conn.pgconn.transaction_status == pq.TransactionStatus.INTRANS
                and not conn.pgconn.pipeline_status):
            PUBLISH.execute(conn, params)  # the caller's open transaction
        else:  # psycopg opens the caller's transaction, or runs its pipeline
            conn.execute(queries["transport_publish"], params)

    # Queues, exchanges, bindings ---------------------------------------------

    def declare_queue(self, name: str, durable: bool, exclusive: bool, auto_delete: bool,
                      message_ttl: timedelta | None, expires: timedelta | None,
                      max_priority: object, arguments: dict) -> bool:
        """Declare (or re-declare) a queue; whether it is durable."""
        return self.work.execute(queries["transport_declare_queue"], {
            "name": name,
            "durable": durable,
            "exclusive": exclusive,
            "auto_delete": auto_delete,
            "message_ttl": message_ttl,
            "expires": expires,
            "max_priority": max_priority,
            "arguments": Jsonb(arguments, dumps=dumps),
        }, scalar_row).fetchone()

    def queue_durable(self, name: str) -> bool | None:
        """Whether a declared queue is durable; None if it was never declared."""
        return self.work.execute(
            queries["transport_queue_durable"], {"name": name}, scalar_row).fetchone()

    def queue_size(self, name: str) -> int:
        return self.work.execute(
            queries["transport_queue_size"], {"name": name}, scalar_row).fetchone()

    def purge(self, name: str) -> int:
        """Remove a queue's ready messages; how many. Never run twice: no retry."""
        return self.work.conn.cursor(row_factory=scalar_row).execute(
            queries["transport_purge"], {"name": name}).fetchone()

    def delete_queue(self, name: str) -> int:
        """Drop a queue, its bindings and its ready messages; how many messages went."""
        purged = self.purge(name)
        self.work.execute(queries["transport_delete_queue"], {"name": name})
        return purged

    def bind(self, exchange: str, exchange_type: str, routing_key: str, pattern: str,
             queue: str) -> None:
        self.work.execute(queries["transport_bind"], {
            "exchange": exchange, "exchange_type": exchange_type,
            "routing_key": routing_key, "pattern": pattern, "queue": queue,
        })

    def unbind(self, exchange: str, routing_key: str, queue: str) -> None:
        self.work.execute(queries["transport_unbind"], {
            "exchange": exchange, "routing_key": routing_key, "queue": queue,
        })

    def delete_exchange(self, exchange: str) -> None:
        self.work.execute(queries["transport_exchange_delete"], {"exchange": exchange})

    def bindings(self, exchange: str) -> list[Binding]:
        return self.work.execute(
            queries["transport_bindings"], {"exchange": exchange}, BINDING_ROWS).fetchall()

    def exchange_type(self, exchange: str) -> str | None:
        """The type an exchange was bound with; None if it has no binding."""
        return self.work.execute(
            queries["transport_exchange_type"], {"exchange": exchange}, scalar_row).fetchone()

    # Consuming ----------------------------------------------------------------

    def ack_and_claim(self, acks: list[Held], worker_id: str, lease_token: uuid.UUID,
                      lease: timedelta, queue: str, limit: int,
                      delete_acked: bool) -> list[Claimed]:
        """Ack held rows (a plain message's row deleted if ``delete_acked``)
        and claim up to ``limit`` rows of ``queue`` under ``lease_token``: one
        statement. Claimed rows first, then the acked ones.

        Run through libpq directly (:class:`Prepared`), as the publish: a
        worker's claim sits on every wake-up's path, and through psycopg's
        cursor (parameter adaptation, row making) an empty claim cost its
        client ≈0.07 ms more CPU than a ``SELECT 1``, ≈0.02 ms this way
        (2,000 in a loop, PostgreSQL 15 here)."""
        params = {
            "ack_ids": [row_id for row_id, _ in acks],
            "ack_tokens": [lease for _, lease in acks],
            "delete_acked": delete_acked,
            "worker_id": worker_id,
            "lease_token": lease_token,
            "lease": lease,
            "queue": queue,
            "limit": limit,
        }
        return _claimed(self.work.retrying(lambda conn: CLAIM.execute(conn, params)))

    def take_transient(self, queue: str, limit: int) -> list[Transient]:
        """Take (delete and return) up to ``limit`` messages of a non-durable queue."""
        return self.work.execute(queries["transport_take_transient"],
                                 {"queue": queue, "limit": limit}, TRANSIENT_ROWS).fetchall()

    def notify(self, channel: str) -> None:
        """A notification on ``channel`` (a listener's probe, see :mod:`.listener`)."""
        self.work.execute(queries["transport_notify_probe"], {"channel": channel})

    def wait(self, queue: str, waiter: uuid.UUID, channel: str, session_lock: int,
             hand_off: tuple[str, timedelta, uuid.UUID] | None = None) -> bool:
        """Record ``waiter`` as waiting on ``queue`` (a publish there takes
        the record and notifies ``channel``, unless the advisory lock
        ``session_lock`` is free: its LISTEN session is gone); whether a
        message is ready after all. With ``hand_off`` (worker id, lease,
        lease token), a plain message's publish may insert its row claimed
        that way and notify it (migrations/core/220)."""
        worker_id, lease, token = hand_off or (None, None, None)
        return self.work.execute(queries["transport_wait"],
                                 {"queue": queue, "waiter": waiter, "channel": channel,
                                  "session_lock": session_lock, "worker_id": worker_id,
                                  "lease": lease, "lease_token": token},
                                 scalar_row).fetchone()

    def wake_only(self, queues: list[str], waiter: uuid.UUID) -> None:
        """``waiter``'s records on ``queues`` no longer offer hand-offs."""
        self.work.execute(queries["transport_wake_only"], {"queues": queues, "waiter": waiter})

    def give_back(self, worker_id: str, tokens: list[uuid.UUID]) -> list[int]:
        """Rows handed to ``worker_id`` under ``tokens`` and not taken: back to
        pending, un-counted, their queues woken; the ids given back."""
        return self.work.execute(queries["transport_give_back"],
                                 {"worker_id": worker_id, "tokens": tokens},
                                 scalar_row).fetchall()

    def handed(self, row_id: int, token: uuid.UUID) -> object:
        """The message of a row handed to this consumer (decoded by kombu's
        JSON); None when ``token`` no longer holds it."""
        payload = self.work.execute(queries["transport_handed"],
                                    {"id": row_id, "lease_token": token},
                                    scalar_row).fetchone()
        return None if payload is None else kombu_json.loads(payload)

    def unwait(self, queues: list[str], waiter: uuid.UUID) -> None:
        """``waiter`` no longer waits on ``queues``."""
        self.work.execute(queries["transport_unwait"], {"queues": queues, "waiter": waiter})

    def pass_wake(self, queue: str) -> None:
        """Wake the next waiter of ``queue`` (this consumer cannot claim now)."""
        self.work.execute(queries["transport_pass_wake"], {"queue": queue})

    def probe(self, queues: list[str]) -> list[str]:
        """Which of ``queues`` have a message ready now (the safety poll)."""
        return self.work.execute(
            queries["transport_probe"], {"queues": queues}, scalar_row).fetchall()

    # Settling held rows (each fenced by its lease token) -----------------------

    def requeue(self, held: list[Held], refund: int, error: str | None) -> list[int]:
        """Back to pending (dead after max_attempts); the ids requeued."""
        return self.work.execute(queries["transport_requeue"],
                                 {**_held(held), "refund": refund, "error": error},
                                 scalar_row).fetchall()

    def fail(self, held: list[Held], backoff: timedelta) -> list[Failed]:
        """Rejected without requeue: retried with backoff, or failed (``fail_task``)."""
        return self.work.execute(queries["transport_fail"],
                                 {**_held(held), "backoff": backoff}, FAILED_ROWS).fetchall()

    def bury(self, held: list[Held], error: str) -> list[int]:
        """Dead at once, with ``error`` (no Kombu message); the ids buried."""
        return self.work.execute(queries["transport_bury"], {**_held(held), "error": error},
                                 scalar_row).fetchall()

    # The lease thread ---------------------------------------------------------

    def renew_leases(self, held: dict[int, uuid.UUID], lease: timedelta) -> list[int]:
        """Extend the leases of held rows; the ids still held."""
        return self.work.execute(queries["transport_renew_leases"],
                                 {**_held(held.items()), "lease": lease}, scalar_row).fetchall()

    def touch_queues(self, queues: list[str]) -> None:
        self.work.execute(queries["transport_touch_queues"], {"queues": queues})

    def register_consumers(self, queues: list[str], worker_id: str, ttl: timedelta) -> None:
        self.work.execute(queries["transport_register_consumers"],
                          {"queues": queues, "worker_id": worker_id, "ttl": ttl})

    def unregister_consumers(self, queues: list[str], worker_id: str) -> None:
        self.work.execute(queries["transport_unregister_consumers"],
                          {"queues": queues, "worker_id": worker_id})

    def maintain(self) -> Maintenance:
        return self.work.execute(queries["transport_maintain"], None,
                                 MAINTENANCE_ROWS).fetchone()

    def vacuum(self, threshold: int) -> float | None:
        """VACUUM job_tasks when ``transport_needs_vacuum`` says so, on a
        connection of its own (a vacuum of a bloated table may take seconds,
        the work connection carries claims): None when it was not needed,
        else how many seconds the oldest snapshot of another session of the
        database has been open (rows that died since then stay, however
        often anyone vacuums)."""
        (needed,) = self.work.execute(queries["transport_needs_vacuum"],
                                      {"threshold": threshold}).fetchone()
        if not needed:
            return None
        with psycopg.connect(self.work.conninfo, autocommit=True,
                             **self.work.connect_kwargs) as conn:
            conn.execute(queries["transport_vacuum"])
            (oldest,) = conn.execute(queries["transport_oldest_snapshot"]).fetchone()
        return oldest

    def delete_finished(self, retention: Retention) -> tuple[int | None, int | None, int | None]:
        """One batch of ``retention`` (``delete_finished_tasks``): rows deleted
        of each kind, NULLs when another session holds its lock."""
        return self.work.execute(queries["delete_finished_tasks"], retention.params()).fetchone()

    def move_to_history(self, retention: Retention) -> tuple[int | None, int | None]:
        """One batch of ``move_to_history`` (partitioned history): rows moved
        and partitions dropped, NULLs when another session holds its lock."""
        return self.work.execute(queries["move_to_history"],
                                 retention.history_params()).fetchone()
