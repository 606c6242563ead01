"""The Kombu transport: ``QoS``, ``Channel`` and ``Transport`` over PostgreSQL.

A message on a durable queue is a ``job_tasks`` row; on a non-durable queue
(Celery events, pidbox, replies) a ``broker_transient_messages`` row. Routing
(direct, topic, fanout) reads the bindings every process shares in
``broker_bindings``, inside the one statement that stores the message and
notifies its queue. Consumers claim rows in batches sized to their prefetch
window with ``FOR UPDATE SKIP LOCKED`` under a lease; ack, reject, requeue and
restore act on the claimed row, fenced by its lease token.

No message may stop a consumer: a row that is no Kombu message is dead at
claim (``malformed``), a delivery whose consumer raised is requeued and
counted (``Transport._deliver``), and a delivery counts as soon as it started,
whatever killed the worker (``QoS.restore_unacked``). No lost connection may
cost a lease: a lost session is replaced on the spot (``Transport.execute``,
``_relisten``), and what could not be settled meanwhile is settled on a fresh
connection by the lease thread.

Wake-ups come from LISTEN/NOTIFY (:mod:`.listener`); leases are renewed by a
thread (:mod:`.leases`). Every statement is in ``pg_broker/sql/queries.sql``.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import logging
import os
import re
import socket
import sys
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from time import monotonic, sleep

import psycopg
from amqp.protocol import queue_declare_ok_t
from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils import json as kombu_json
from kombu.utils.uuid import uuid as kombu_uuid
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb, set_json_loads

from pg_broker.database import DatabaseUnavailable, session_defaults
from pg_broker.masking import redacting
from pg_broker.migrate import ensure_migrated
from pg_broker.queries import queries
from pg_broker.urls import SCHEME, libpq_url, masked_url

from . import deadline
from .connections import close_quietly, disown, first_line
from .leases import SETTLE_BACKOFF_MAX, SETTLE_BACKOFF_MIN, LeaseKeeper
from .listener import Listener
from .pipeline import Pipeline, Prepared, shared

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_POLLING_INTERVAL = 1.0
DEFAULT_MAINTENANCE_INTERVAL = 10.0
DEFAULT_CLAIM_BATCH_MAX = 100
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
DEFAULT_RETRY_BACKOFF_SECONDS = 10.0
# Under a hub, how long (seconds) acks may wait for the next claim to carry
# them before they go out on their own.
ACK_WAIT = 0.02
TRANSIENT_TAG_PREFIX = "transient:"
# How long closing a transport waits for the confirms of pipelined publishes.
CONFIRM_AT_CLOSE = 10.0
# How long a process about to exit tries to send the settlements still waiting.
SETTLE_AT_EXIT = 10.0
# The longest reason (characters) a row's error or a log line gets for an
# exception a consumer raised.
REASON_LENGTH = 500
# What job_tasks accepts (migrations/002): queue names of 1 to 1024
# characters, max_attempts a positive integer.
MAX_QUEUE_NAME = 1024
MAX_INT = 2**31 - 1
# A NUL character in a JSON string (escaped by the encoder): jsonb refuses it.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
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
DEFAULT_RESPONSE_TIMEOUT = 20.0

PUBLISH = Prepared("pg_broker_publish", queries["transport_publish"])

_enqueue = threading.local()
# Every live transport, so a forked child can disown the connections it
# inherited (see _after_fork_in_child). Weak: this is no cache.
_transports: weakref.WeakSet[Transport] = weakref.WeakSet()


@contextmanager
def enqueue_in(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """Publish through ``conn`` (the caller's transaction) while active.

    In the current thread, every message this process publishes to a
    ``pgbroker://`` broker is inserted through ``conn`` and is not committed
    by the transport: it becomes visible (and its NOTIFY fires) when the
    caller commits, and a rollback means it was never sent.
    """
    previous = getattr(_enqueue, "conn", None)
    _enqueue.conn = conn
    try:
        yield conn
    finally:
        _enqueue.conn = previous


def delivery_tag(row_id: int, lease_token: uuid.UUID) -> str:
    return f"{row_id}:{lease_token.hex}"


def held_row(tag: object) -> tuple[int, uuid.UUID] | None:
    """(row id, lease token) of a durable delivery tag; None for others."""
    if not isinstance(tag, str) or tag.startswith(TRANSIENT_TAG_PREFIX):
        return None
    row_id, _, token = tag.partition(":")
    try:
        return int(row_id), uuid.UUID(token)
    except ValueError:
        return None


# Envelope fields a consumer reads as text: (field, where), where is the
# payload itself or its properties.
_TEXT_FIELDS = (("content-type", "payload"), ("content-encoding", "payload"),
                ("body", "payload"), ("body_encoding", "properties"))


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages that must not quote it."""
    for kind, name in ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"),
                       (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def malformed(payload: object) -> str | None:
    """Why a stored payload is no Kombu message, or None if it is one.

    A row anyone inserted (SQL, another client, a bug) can hold any JSON;
    what kombu's ``Message`` and the consumers after it read must have the
    types kombu writes (VB ``Message.__init__``, ``Channel.decode_body``),
    or the consumer raises on it. Never raises; the reason names fields and
    JSON types, never values from the payload.
    """
    if not isinstance(payload, dict):
        return f"payload is a JSON {_json_type(payload)}, not a Kombu message"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "payload has no properties object"
    info = properties.get("delivery_info", {})
    if not isinstance(info, dict):
        return f"properties.delivery_info is a JSON {_json_type(info)}, not an object"
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return f"headers is a JSON {_json_type(headers)}, not an object"
    for field, where in _TEXT_FIELDS:
        value = (payload if where == "payload" else properties).get(field)
        if value is not None and not isinstance(value, str):
            name = field if where == "payload" else f"{where}.{field}"
            return f"{name} is a JSON {_json_type(value)}, not a string"
    body = payload.get("body")
    encoding = properties.get("body_encoding")
    if body and encoding and encoding.lower() != "utf-8":
        if encoding != "base64":
            return "properties.body_encoding is neither utf-8 nor base64"
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not valid base64"
    return None


def _milliseconds(value: object) -> timedelta | None:
    if value in (None, ""):
        return None
    try:
        return timedelta(milliseconds=float(value))
    except (TypeError, ValueError):
        return None


# kombu's JSON (as its Redis transport stores messages): datetimes, UUIDs,
# decimals and bytes in headers survive the round trip through jsonb.
_dumps = partial(kombu_json.dumps, separators=(",", ":"))


class QoS(virtual.QoS):
    """Prefetch accounting as in kombu; settlement acts on the claimed rows."""

    def __init__(self, channel: Channel, prefetch_count: int = 0) -> None:
        super().__init__(channel, prefetch_count)
        self.transport: Transport = channel.connection
        self._pid = os.getpid()

    def ack(self, delivery_tag) -> None:
        held = held_row(delivery_tag)
        if held is not None and (delivery_tag in self._delivered
                                 or self.transport.unkeep(delivery_tag)):
            self.transport.ack(held)
        self.transport.settled(delivery_tag)
        super().ack(delivery_tag)
        self.transport.capacity_freed()

    def reject(self, delivery_tag, requeue: bool = False) -> None:
        held = held_row(delivery_tag)
        message = self._delivered.get(delivery_tag)
        if held is not None and (message is not None or self.transport.unkeep(delivery_tag)):
            self.transport.settle("transport_requeue" if requeue else "transport_fail", [held])
        elif requeue and message is not None:
            self.channel.republish(message)
        self.transport.settled(delivery_tag)
        super().ack(delivery_tag)
        self.transport.capacity_freed()

    def restore_unacked(self) -> list:
        """Give back, when the channel closes, what was delivered and never settled.

        kombu calls this from ``Channel.close`` and, for a channel never
        closed, from a finaliser at exit (VB ``QoS.restore_unacked_once``).
        What happens to each unacked message depends on whether its delivery
        started:

        - never started (prefetched, held by Celery as reserved or ETA, or
          a plain consumer's message never settled): back to ``pending`` at
          once, the delivery not counted;
        - running in Celery's pool (its request is in
          ``celery.worker.state.active_requests``: accepted by the pool,
          ``Request.on_accepted``, and not yet ready): kept held. Celery's
          consumer restarts after a lost connection by closing this channel
          first (``Consumer.on_connection_error_after_connected`` collects
          the connection before ``on_close``), but the task runs on and
          Celery acks it through this very channel when it ends
          (``Request.acknowledge`` calls the message's own channel). The
          transport keeps that row's lease and settles the ack on a fresh
          connection (see ``Transport.close_connection``); a process that
          exits first returns the row counted (``_settle_at_exit``);
        - its consumer callback raised (``Transport._deliver``; in the solo
          pool the task runs inside that callback, so this is how a task
          that kills its worker is counted) and the requeue it scheduled did
          not run before the worker stopped: requeued, counted, with the
          reason.
        """
        if os.getpid() != self._pid:  # a forked child: these are the parent's
            return []
        self._flush()
        delivered = list(self._delivered.items())
        self._delivered.clear()
        running = running_deliveries() if delivered else set()
        returned = []
        errors = []
        for tag, message in delivered:
            row = held_row(tag)
            failed = self.transport.failed(tag)
            if row is None:
                try:
                    self.channel.republish(message)
                except Exception as exc:
                    errors.append((exc, message))
            elif failed is not None:
                self.transport.settled(tag)
                self.transport.settle("transport_requeue", [row],
                                      error=f"the consumer raised {failed}")
            elif tag in running:
                self.transport.keep(tag, row)
            else:
                returned.append(row)
        if returned:
            self.transport.settle("transport_requeue", returned, refund=1)
        return errors


def running_deliveries() -> set[str]:
    """Delivery tags of the messages whose tasks run in this Celery worker's
    pool now (empty outside a Celery worker: nothing imported it)."""
    state = sys.modules.get("celery.worker.state")
    if state is None:
        return set()
    tags = set()
    for request in list(state.active_requests):
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if isinstance(tag, str):
            tags.add(tag)
    return tags


class Channel(virtual.Channel):
    """A virtual channel whose queues, bindings and messages live in PostgreSQL."""

    QoS = QoS
    supports_fanout = True
    do_restore = True

    def __init__(self, connection: Transport, **kwargs) -> None:
        super().__init__(connection, **kwargs)
        self.transport: Transport = connection
        self._durable: dict[str, bool] = {}
        self._noack_queues: set[str] = set()
        self._auto_delete: set[str] = set()
        # A forked child closing an inherited channel must not delete the
        # parent's queues or return the parent's messages.
        self._pid = os.getpid()

    # Declarations ---------------------------------------------------------

    def prepare_queue_arguments(self, arguments, **kwargs):
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def queue_declare(self, queue=None, passive=False, durable=True, exclusive=False,
                      auto_delete=False, arguments=None, nowait=False, **kwargs):
        queue = queue or f"amq.gen-{kombu_uuid()}"
        if passive:
            if not self._has_queue(queue):
                raise ChannelError(
                    f"NOT_FOUND - no queue {queue!r} in vhost '/'",
                    (50, 10), "Channel.queue_declare", "404",
                )
        else:
            arguments = dict(arguments or {})
            expires = _milliseconds(arguments.get("x-expires"))
            row = self.transport.execute(queries["transport_declare_queue"], {
                "name": queue,
                "durable": bool(durable),
                "exclusive": bool(exclusive),
                "auto_delete": bool(auto_delete),
                "message_ttl": _milliseconds(arguments.get("x-message-ttl")),
                "expires": expires,
                "max_priority": arguments.get("x-max-priority"),
                "arguments": Jsonb(arguments, dumps=_dumps),
            }).fetchone()
            self._durable[queue] = row[0]
            if auto_delete or exclusive:
                self._auto_delete.add(queue)
            if expires is not None:
                self.transport.expiring[queue] = expires.total_seconds()
        return queue_declare_ok_t(queue, self._size(queue), 0)

    def queue_bind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        exchange = exchange or "amq.direct"
        self.state.binding_declare(queue, exchange, routing_key, arguments)
        self._queue_bind(
            exchange, *self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        )

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        self.transport.execute(queries["transport_bind"], {
            "exchange": exchange,
            "exchange_type": self.typeof(exchange).type,
            "routing_key": routing_key or "",
            "pattern": pattern or "",
            "queue": queue,
        })

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        exchange = exchange or "amq.direct"
        self.state.binding_delete(queue, exchange, routing_key)
        self.transport.execute(queries["transport_unbind"], {
            "exchange": exchange, "routing_key": routing_key or "", "queue": queue,
        })

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        if if_empty and self._size(queue):
            return 0
        purged = self.transport.delete_queue(queue)
        self.state.queue_bindings_delete(queue)
        self._durable.pop(queue, None)
        self._auto_delete.discard(queue)
        self.transport.expiring.pop(queue, None)
        return purged

    def exchange_delete(self, exchange, if_unused=False, nowait=False):
        self.transport.execute(queries["transport_exchange_delete"], {"exchange": exchange})
        self.state.exchanges.pop(exchange, None)

    def get_table(self, exchange):
        return [
            tuple(row) for row in self.transport.execute(
                queries["transport_bindings"], {"exchange": exchange}
            )
        ]

    def typeof(self, exchange, default="direct"):
        try:
            kind = self.state.exchanges[exchange]["type"]
        except KeyError:
            row = self.transport.execute(
                queries["transport_exchange_type"], {"exchange": exchange}
            ).fetchone()
            kind = row[0] if row else default
        return self.exchange_types[kind]

    def _has_queue(self, queue, **kwargs):
        return self._lookup_durable(queue) is not None

    def _size(self, queue):
        return self.transport.execute(
            queries["transport_queue_size"], {"name": queue}
        ).fetchone()[0]

    def _purge(self, queue):
        return self.transport.conn.execute(
            queries["transport_purge"], {"name": queue}
        ).fetchone()[0]

    def _lookup_durable(self, queue: str) -> bool | None:
        row = self.transport.execute(
            queries["transport_queue_durable"], {"name": queue}
        ).fetchone()
        return None if row is None else row[0]

    def is_durable(self, queue: str) -> bool:
        """Where the queue's messages live; a queue never declared is durable."""
        durable = self._durable.get(queue)
        if durable is None:
            durable = self._lookup_durable(queue)
            durable = True if durable is None else durable
            self._durable[queue] = durable
        return durable

    # Publishing -----------------------------------------------------------

    def basic_publish(self, message, exchange, routing_key, **kwargs):
        self._inplace_augment_message(message, exchange, routing_key)
        self.transport.publish(message, exchange or "", routing_key or "", self)

    def _put(self, queue, message, **kwargs):
        self.transport.publish(message, "", queue, self)

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        self.transport.publish(message, exchange, routing_key or "", self)

    def republish(self, message) -> None:
        """Requeue a transient delivery: publish a copy where it was sent."""
        info = message.delivery_info
        raw = message.serializable()
        raw["properties"]["delivery_info"]["redelivered"] = True
        self.transport.publish(raw, info.get("exchange") or "", info.get("routing_key") or "", self)

    # Consuming ------------------------------------------------------------

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        if no_ack:
            self._noack_queues.add(queue)
        else:
            self._noack_queues.discard(queue)
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        self.transport.consume(queue, self, durable_acks=not no_ack and self.is_durable(queue))
        return result

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._noack_queues.discard(queue)
            self.transport.cancel(queue, self)
            if queue in self._auto_delete and not self.closed:
                self.queue_delete(queue)
        return result

    def basic_get(self, queue, no_ack=False, **kwargs):
        payloads, _ = self.fetch(queue, 1, no_ack)
        if not payloads:
            return None
        message = self.Message(payloads[0], channel=self)
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def is_no_ack(self, queue: str) -> bool:
        return queue in self._noack_queues

    def fetch_limit(self) -> int:
        """How many messages this channel should claim now (0: not yet).

        The free part of the prefetch window; while messages are in flight,
        only once half the window is free, so that one claim feeds several
        deliveries instead of one claim per finished task.
        """
        estimate = self.qos.can_consume_max_estimate()
        if estimate is None:
            return self.transport.claim_batch_max
        room = estimate - self.transport.buffered(self)
        in_flight = self.qos.prefetch_count - estimate
        if in_flight > 0 and room * 2 < self.qos.prefetch_count:
            return 0
        return max(min(room, self.transport.claim_batch_max), 0)

    def fetch(self, queue: str, limit: int, no_ack: bool) -> tuple[list[dict], int]:
        """Claim (durable) or take (transient) up to ``limit`` messages.

        Returns the Kombu payloads, in delivery order, with their delivery
        tags set, and the number of rows the statement returned (a full batch
        means the queue may hold more).
        """
        if self.is_durable(queue):
            return self._claim(queue, limit, no_ack)
        return self._take(queue, limit)

    def _claim(self, queue: str, limit: int, no_ack: bool) -> tuple[list[dict], int]:
        transport = self.transport
        rows, token = transport.claim(queue, limit)
        rows.sort(key=lambda row: (-row[3], row[4]))
        payloads = []
        held = []
        for row_id, payload, attempts, _priority, _sequence in rows:
            problem = malformed(payload)
            if problem:
                transport.bury(row_id, token, problem)
                continue
            properties = payload["properties"]
            properties["delivery_tag"] = delivery_tag(row_id, token)
            properties.setdefault("delivery_info", {})["redelivered"] = attempts > 1
            payloads.append(payload)
            held.append((row_id, token))
        if no_ack and held:
            transport.ack_and_claim(held)
        elif held:
            for row in held:
                transport.leases.hold(*row)
            transport.leases.start()
        return payloads, len(rows)

    def _take(self, queue: str, limit: int) -> tuple[list[dict], int]:
        rows = self.transport.execute(
            queries["transport_take_transient"], {"queue": queue, "limit": limit}
        ).fetchall()
        rows.sort(key=lambda row: (-row[2], row[0]))
        payloads = []
        for row_id, payload, _priority in rows:
            problem = malformed(payload)
            if problem:
                log.error("dropped transient message %s of queue %r: %s", row_id, queue, problem)
                continue
            properties = payload["properties"]
            properties["delivery_tag"] = f"{TRANSIENT_TAG_PREFIX}{row_id}"
            properties.setdefault("delivery_info", {})
            payloads.append(payload)
        return payloads, len(rows)

    def close(self):
        if not self.closed:
            owner = self._pid == os.getpid() and self.transport is not None
            if owner:
                self.transport.flush_acks()
                self.transport.return_buffered(self.transport.queues_of(self))
            super().close()
            if owner:
                for queue in list(self._auto_delete):
                    try:
                        self.transport.delete_queue(queue)
                    except self.transport.connection_errors:
                        log.debug("could not delete queue %r at close", queue, exc_info=True)
                self._auto_delete.clear()


class Transport(virtual.Transport):
    """``pgbroker://``: a Celery broker over PostgreSQL.

    Transport options (``broker_transport_options``):

    ``lease_seconds`` (60)
        How long a claimed message stays invisible to other workers without
        renewal; renewed every third of it while the worker holds it.
    ``polling_interval`` (1.0)
        Seconds between safety polls (notifications do the real work).
    ``maintenance_interval`` (10)
        Seconds between a consumer's runs of ``reclaim_stale_tasks()`` and of
        the sweep of expired queues and transient messages.
    ``claim_batch_max`` (100)
        Upper bound of one claim when the prefetch window is unlimited.
    ``confirm_publish`` (True)
        A durable publish returns after the database committed the message
        (RabbitMQ's publisher confirms). False: it returns once the message
        is sent; the transport reads the database's confirm in the background
        (within 50 ms), sends unconfirmed messages again after a lost
        connection, and waits for every confirm when it closes (or on
        ``pg_broker.transport.confirm_publishes()``). About twice as fast
        for a producer (a ``delay()`` loop measured 2,321/s against 1,132/s);
        what it risks is only messages sent by a process that dies in the same
        instant as its database connection. Transient
        messages (delivery_mode 1: events, pidbox) are always sent this way.
    ``synchronous_commit`` (unset: the server's setting)
        For publishes: ``off`` makes them return before their WAL is flushed,
        several times faster; a crash of the database server can then lose
        the last fraction of a second of them (never corrupts). Consumer
        statements (claims, acks, lease renewals) always commit this way: one
        of them lost only redelivers a message.
    ``max_message_size`` (64 MiB)
        Larger messages are refused at publish with a ChannelError.
    ``retry_backoff`` (10)
        Seconds before a rejected (failed) message is delivered again; doubles
        with each attempt (SQL ``fail_task``), at most one hour.
    ``response_timeout`` (20)
        Seconds a statement may wait for the database's reply before its
        connection is dropped and opened again (:mod:`.deadline`): a path that
        stops answering without closing is noticed. 0: wait for ever.
    """

    Channel = Channel

    driver_type = "pgbroker"
    driver_name = "psycopg"
    can_parse_url = True
    default_port = 5432
    polling_interval = DEFAULT_POLLING_INTERVAL

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    # A read-only database (a managed service's answer to a full disk, a
    # standby after failover) refuses writes until it is writable again: a
    # connection error, so Celery's consumer and kombu's publish retry back
    # off and reconnect, and the new session sees the database's settings as
    # they are then (an open session keeps default_transaction_read_only).
    connection_errors = virtual.Transport.connection_errors + (
        psycopg.OperationalError,
        psycopg.InterfaceError,
        psycopg.errors.ReadOnlySqlTransaction,
        DatabaseUnavailable,
    )
    channel_errors = virtual.Transport.channel_errors + (
        psycopg.DataError,
        psycopg.IntegrityError,
        psycopg.ProgrammingError,
    )
    recoverable_connection_errors = connection_errors
    recoverable_channel_errors = ()

    def __init__(self, client, **kwargs) -> None:
        super().__init__(client, **kwargs)
        options = client.transport_options
        self.conninfo = _conninfo(client)
        self.lease = timedelta(seconds=float(options.get("lease_seconds", DEFAULT_LEASE_SECONDS)))
        self.polling_interval = float(options.get("polling_interval", DEFAULT_POLLING_INTERVAL))
        self.claim_batch_max = int(options.get("claim_batch_max", DEFAULT_CLAIM_BATCH_MAX))
        self.max_message_size = int(options.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE))
        self.retry_backoff = timedelta(
            seconds=float(options.get("retry_backoff", DEFAULT_RETRY_BACKOFF_SECONDS))
        )
        self.confirm_publish = _flag(options.get("confirm_publish", True))
        synchronous_commit = options.get("synchronous_commit")
        self.synchronous_commit = None if synchronous_commit is None else str(synchronous_commit)
        self.connect_kwargs = session_defaults(self.conninfo, CONNECT_DEFAULTS)
        self.response_timeout = float(
            options.get("response_timeout", DEFAULT_RESPONSE_TIMEOUT))
        self.leases = LeaseKeeper(
            self.execute, self.lease.total_seconds(),
            float(options.get("maintenance_interval", DEFAULT_MAINTENANCE_INTERVAL)),
            settle=self._settle_deferred, finished=self._finished_settling,
            reconnect=self.drop_connection,
        )
        self.expiring: dict[str, float] = {}  # queue -> x-expires seconds
        self._listener = Listener(self.conninfo, self.connect_kwargs, self.response_timeout)
        self._conn: psycopg.Connection | None = None
        self._connecting = threading.Lock()
        self._pipeline: Pipeline | None = None
        self._consumers: dict[str, Channel] = {}
        self._ready: set[str] = set()
        # Claimed, not yet delivered: the hub hands out one message per callback.
        self._buffers: dict[str, deque[dict]] = {}
        # Acked by Celery, not yet by the database (see ack()).
        self._acks: deque[tuple[int, uuid.UUID]] = deque()
        # Requeues and fails a lost connection kept from being sent (see settle()).
        self._deferred: deque[tuple[str, list[tuple[int, uuid.UUID]], int, str | None]] = deque()
        # Running in Celery's pool when their channel closed: delivery tag -> row
        # (see QoS.restore_unacked).
        self._kept: dict[str, tuple[int, uuid.UUID]] = {}
        # The delivery inside the consumer callback, until the consumer settles it.
        self._delivering: str | None = None
        # Deliveries whose consumer raised, not settled yet: tag -> reason.
        self._failed: dict[str, str] = {}
        self._loop = None
        self._poll_timer = None
        self._listen_fd: int | None = None
        self._wake_fds: tuple[int, int] | None = None
        self._kicked = False
        self._ack_timer = None
        self._closed = False
        self._settling = threading.Lock()
        self._pid = os.getpid()
        self.worker_id = f"{socket.gethostname()}:{self._pid}"
        _transports.add(self)

    # Connections ------------------------------------------------------------

    def owns_connections(self) -> bool:
        return self._pid == os.getpid()

    @property
    def conn(self) -> psycopg.Connection:
        """The work connection (autocommit), reopened when it was lost."""
        if not self.owns_connections():
            self.forget_after_fork()
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

    def execute(self, query: str, params: dict | None = None) -> psycopg.Cursor:
        """Run a statement on the work connection.

        A session that turns out to be gone (terminated, or the server
        restarted since) costs one retry on a fresh connection, not a consumer
        restart; one the deadline cut (the path stopped answering,
        :mod:`.deadline`) does not: its error goes up at once. Only for
        statements that may run twice, should the first have committed
        unseen: settlements are fenced by lease tokens, declarations are
        upserts, reads are reads; a claim whose reply was lost leaves its rows
        to their lease, as a crash would. Publishes and purges never come here.
        """
        conn = self.conn
        try:
            return conn.execute(query, params)
        except self.connection_errors:
            if not conn.closed or getattr(conn, "cut_after", None) is not None:
                raise
        return self.conn.execute(query, params)

    def drop_connection(self) -> None:
        """Close the work connection once no statement runs on it; its next use
        opens a new session."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with conn.lock:
                close_quietly(conn)

    def establish_connection(self):
        self._closed = False
        ensure_migrated(self.conninfo)
        self.conn  # noqa: B018 - connect now, so an unreachable database fails here
        return super().establish_connection()

    def close_connection(self, connection) -> None:
        """Close the channels (their unacked messages given back, see
        ``QoS.restore_unacked``), the LISTEN connection and, once nothing is
        left to settle, the work connection.

        What a lost connection kept from being settled, and the rows of tasks
        still running (Celery acks them through their old channel after a
        consumer restart), stay with the lease thread: it renews those leases
        and settles them on a fresh connection as soon as it can; then it
        closes the work connection and ends.
        """
        if not self.owns_connections():
            self.forget_after_fork()
            return
        try:
            self.flush_acks()
            super().close_connection(connection)
        finally:
            self._closed = True
            self.unregister_from_event_loop(connection, self._loop)
            self._listener.close()
            # Refusals are not this close's to raise (the pipeline is the
            # process's): the next publish or confirm_publishes() reports them.
            if (self._pipeline is not None
                    and not self._pipeline.confirm(CONFIRM_AT_CLOSE, report=False)):
                log.error("%d published message(s) were not confirmed by the database within "
                          "%.0f s of closing", self._pipeline.unconfirmed, CONFIRM_AT_CLOSE)
            self.leases.stop_maintaining()
            if self._finished_settling():
                self.leases.stop()
            else:
                self._settle_later()

    def _finished_settling(self) -> bool:
        """Closed and nothing held: the work connection goes (the lease thread asks)."""
        if not self._closed or self._acks or self._deferred or self.leases.held():
            return False
        conn, self._conn = self._conn, None
        close_quietly(conn)
        return True

    def _collect(self, connection) -> None:
        """kombu's pool cleanup (after a fork): never touch inherited connections."""
        if self.owns_connections():
            self.close_connection(connection)
        else:
            self.forget_after_fork()

    def forget_after_fork(self) -> None:
        """In a forked child: disown the parent's connections, start afresh."""
        for conn in (self._conn, self._listener.conn):
            disown(conn)
        self._conn = None
        self._listener.conn = None
        self._pipeline = None  # the parent's (pipeline.py disowns its connection)
        self.leases.forget_after_fork()
        self._ready.clear()
        self._buffers.clear()
        self._acks.clear()
        self._deferred.clear()
        self._kept.clear()
        self._delivering = None
        self._failed.clear()
        self._loop = None
        self._poll_timer = None
        self._listen_fd = None
        self._ack_timer = None
        self._wake_fds = None
        # A lock another thread held at the fork stays taken in the child.
        self._connecting = threading.Lock()
        self._settling = threading.Lock()
        self._pid = os.getpid()
        self.worker_id = f"{socket.gethostname()}:{self._pid}"

    def verify_connection(self, connection) -> bool:
        return self._conn is not None and not self._conn.closed

    def driver_version(self) -> str:
        return psycopg.__version__

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        uri = uri if "://" in (uri or "") else f"{SCHEME}://{uri or ''}"
        return uri if include_password else masked_url(uri, mask)

    # Publishing -------------------------------------------------------------

    def publish(self, message: dict, exchange: str, routing_key: str, channel: Channel) -> None:
        """Store ``message`` in every queue the route reaches; return after commit."""
        data = _dumps(message)
        if len(data) > self.max_message_size:
            raise ChannelError(
                f"message of {len(data)} bytes exceeds max_message_size "
                f"({self.max_message_size}); store large payloads elsewhere and send a reference"
            )
        headers = message.get("headers") or {}
        properties = message["properties"]
        if not exchange and len(routing_key) > MAX_QUEUE_NAME:
            raise ChannelError(f"message refused: a queue name has at most {MAX_QUEUE_NAME} "
                               f"characters, not {len(routing_key)}")
        params = {
            "exchange": exchange,
            "routing_key": routing_key,
            "ttl": None if _revoked_by_worker(headers) else _milliseconds(
                properties.get("expiration")),
            "priority": channel._get_message_priority(message),
            "payload": data,
            "task_type": _text(headers.get("task")),
            "task_id": _text(headers.get("id")),
            "job_id": _uuid_header(headers, "job_id"),
            "user_id": _uuid_header(headers, "user_id"),
            "max_attempts": _max_attempts(headers),
            "synchronous_commit": None,
            "store": True,
            "notify": True,
        }
        conn = getattr(_enqueue, "conn", None)
        if conn is None:  # our own transaction: the options decide how durable
            params["synchronous_commit"] = self.synchronous_commit
            transient = properties.get("delivery_mode") in (1, "transient")
            if transient or not self.confirm_publish:
                self._send(params, durable=not transient)
                return
        try:
            if conn is None:
                params = self.pipeline.ration(params)
                PUBLISH.execute(self.conn, params)
                if not params["notify"]:
                    self.pipeline.owe(params)
            elif (conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.INTRANS
                  and not conn.pgconn.pipeline_status):
                PUBLISH.execute(conn, params)  # the caller's open transaction
            else:  # psycopg opens the caller's transaction, or runs its pipeline
                conn.execute(queries["transport_publish"], params)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            raise ChannelError(f"message refused by the database (SQLSTATE {exc.sqlstate}: "
                               f"{first_line(exc)})") from exc

    @property
    def pipeline(self) -> Pipeline:
        """Pipelined publishes and rationed notifications (one per process and
        database, shared with the other connections); connects when first needed."""
        if self._pipeline is None or self._pipeline.closed:
            self._pipeline = shared(self.conninfo, self.connect_kwargs, PUBLISH)
        return self._pipeline

    def _send(self, params: dict, durable: bool) -> None:
        """Publish without waiting for the commit (see :mod:`.pipeline`).

        The database's refusals come too late for the caller (at its next
        publish), so what it would refuse is refused here first.
        """
        if _JSON_NUL.search(params["payload"]):
            raise ChannelError("message refused: PostgreSQL's jsonb cannot store "
                               "the NUL character (\\u0000) it contains")
        label = f"{params['task_id'] or 'message'} for {params['exchange'] or params['routing_key']}"
        self.pipeline.send(params, durable, label)

    # Settling held rows -------------------------------------------------------
    #
    # Every settlement is fenced by the row's lease token, so sending one twice
    # is harmless (the second is refused). A session lost while sending one
    # costs a retry on a fresh connection (execute()); when the database
    # cannot be reached at all, the settlement waits in memory and the lease
    # thread sends it as soon as it can, renewing the lease meanwhile
    # (_settle_later). A closed transport leaves every settlement to that
    # thread: it must never block the hub that calls it.

    def ack(self, held: tuple[int, uuid.UUID]) -> None:
        """Ack a held row: at once, or with the next batch when a hub runs us.

        Under the hub, acks wait (at most one claimed batch, or ``ACK_WAIT``
        when idle) and go out in the statement of the next claim, or on their
        own; a crash in between redelivers those messages (at-least-once, as
        with every broker).
        """
        if self._closed:
            self._acks.append(held)
            self._settle_later()
        elif self._wake_fds is not None and self.owns_connections():
            self._acks.append(held)
            self.kick()
        else:
            self._ack_now([held])

    def take_acks(self) -> list[tuple[int, uuid.UUID]]:
        batch = []
        while self._acks:
            batch.append(self._acks.popleft())
        return batch

    def flush_acks(self) -> None:
        """Send the acks waiting; the lease thread does if the database cannot be reached."""
        batch = self.take_acks()
        if batch:
            self._ack_now(batch)

    def _ack_now(self, acks: list[tuple[int, uuid.UUID]]) -> None:
        try:
            self.ack_and_claim(acks)
        except self.connection_errors as exc:
            self._acks.extend(acks)
            self._settle_later(exc)

    def claim(self, queue: str, limit: int) -> tuple[list[tuple], uuid.UUID]:
        """Claim up to ``limit`` rows of ``queue``; the acks waiting ride along
        in the same statement (and wait on if it fails)."""
        acks = self.take_acks()
        try:
            return self.ack_and_claim(acks, queue, limit)
        except BaseException:
            self._acks.extendleft(reversed(acks))
            raise

    def ack_and_claim(
        self, acks: list[tuple[int, uuid.UUID]], queue: str = "", limit: int = 0,
    ) -> tuple[list[tuple], uuid.UUID]:
        """Ack held rows and claim up to ``limit`` rows of ``queue``: one statement.

        Returns the claimed rows (id, payload, attempts, priority, sequence)
        and the lease token they were claimed under.
        """
        token = uuid.uuid4()
        rows = self.execute(queries["transport_claim"], {
            "ack_ids": [row_id for row_id, _ in acks],
            "ack_tokens": [lease for _, lease in acks],
            "worker_id": self.worker_id,
            "lease_token": token,
            "lease": self.lease,
            "queue": queue,
            "limit": limit,
        }).fetchall()
        self.leases.release(row_id for row_id, _ in acks)
        self._refused(acks, {row[1] for row in rows if not row[0]}, "ack")
        return [row[1:] for row in rows if row[0]], token

    def settle(
        self, query: str, held: list[tuple[int, uuid.UUID]], refund: int = 0,
        error: str | None = None,
    ) -> None:
        """Requeue, fail or bury held rows, fenced by their lease tokens.

        ``refund`` 1 un-counts the delivery of a requeued row that never
        started; ``error`` is the reason kept on the row. Sent now, or by the
        lease thread once the database can be reached.
        """
        if not self._closed:
            try:
                self._settle_now(query, held, refund, error)
                return
            except self.connection_errors as exc:
                self._deferred.append((query, held, refund, error))
                self._settle_later(exc)
                return
        self._deferred.append((query, held, refund, error))
        self._settle_later()

    def _settle_now(
        self, query: str, held: list[tuple[int, uuid.UUID]], refund: int, error: str | None,
    ) -> None:
        params = {"ids": [row_id for row_id, _ in held], "tokens": [token for _, token in held]}
        if query == "transport_requeue":
            params["refund"] = refund
            params["error"] = error
        elif query == "transport_fail":
            params["backoff"] = self.retry_backoff
        elif query == "transport_bury":
            params["error"] = error
        rows = self.execute(queries[query], params).fetchall()
        self.leases.release(row_id for row_id, _ in held)
        if query == "transport_fail":
            settled = {row[0] for row in rows if row[1] is not None}
        else:
            settled = {row[0] for row in rows}
        self._refused(held, settled, query.removeprefix("transport_"))

    def _settle_later(self, exc: BaseException | None = None) -> None:
        """Leave what waits (acks, deferred settlements) to the lease thread."""
        if exc is not None:
            log.warning(
                "could not settle %d message(s) now (%s); the lease thread retries on a "
                "fresh connection, renewing their leases meanwhile",
                len(self._acks) + sum(len(held) for _, held, _, _ in self._deferred),
                first_line(exc),
            )
        self.leases.start()
        self.leases.settle_soon()

    def _settle_deferred(self) -> None:
        """Send every settlement waiting (the lease thread, and at exit);
        raises psycopg.Error when the database cannot be reached."""
        with self._settling:
            acks = self.take_acks()
            if acks:
                try:
                    self.ack_and_claim(acks)
                except BaseException:
                    self._acks.extendleft(reversed(acks))
                    raise
            while self._deferred:
                self._settle_now(*self._deferred[0])
                self._deferred.popleft()

    def keep(self, tag: str, held: tuple[int, uuid.UUID]) -> None:
        """A delivery still running after its channel closed: its row stays
        held (the lease thread renews it) until Celery settles it."""
        self._kept[tag] = held

    def unkeep(self, tag: str) -> bool:
        """Whether ``tag`` was kept (it is not any more)."""
        return self._kept.pop(tag, None) is not None

    def settled(self, tag: str) -> None:
        """The consumer settled ``tag`` (see ``_deliver``)."""
        if self._delivering == tag:
            self._delivering = None
        if self._failed:
            self._failed.pop(tag, None)

    def settle_before_exit(self, timeout: float) -> None:
        """Before the process exits: send what waits, and requeue the rows of
        deliveries still running (counted: they started)."""
        kept = list(self._kept.values())
        self._kept.clear()
        if kept:
            self._deferred.append(("transport_requeue", kept, 0,
                                   "the worker process exited while it ran"))
        deadline = monotonic() + timeout
        backoff = SETTLE_BACKOFF_MIN
        while self._acks or self._deferred:
            try:
                self._settle_deferred()
            except psycopg.Error as exc:
                if monotonic() + backoff > deadline:
                    log.error(
                        "could not settle %d message(s) before exiting (%s); they come back "
                        "when their leases expire",
                        len(self._acks) + sum(len(held) for _, held, _, _ in self._deferred),
                        first_line(exc),
                    )
                    return
                sleep(backoff)
                backoff = min(backoff * 2, SETTLE_BACKOFF_MAX)

    def _refused(self, held: list[tuple[int, uuid.UUID]], settled: set[int], action: str) -> None:
        for row_id, token in held:
            if row_id not in settled:
                log.warning(
                    "lease lost: job_tasks row %s is no longer held by lease %s "
                    "(it expired and the message moved on); %s refused",
                    row_id, token, action,
                )

    def bury(self, row_id: int, token: uuid.UUID, problem: str) -> None:
        log.error("job_tasks row %s is not a Kombu message (%s): marked dead", row_id, problem)
        self.settle("transport_bury", [(row_id, token)], error=f"malformed message: {problem}")

    def delete_queue(self, queue: str) -> int:
        """Drop a queue, its bindings and its ready messages; how many messages went."""
        purged = self.conn.execute(queries["transport_purge"], {"name": queue}).fetchone()[0]
        self.execute(queries["transport_delete_queue"], {"name": queue})
        self.expiring.pop(queue, None)
        return purged

    # Consuming ---------------------------------------------------------------

    def consume(self, queue: str, channel: Channel, durable_acks: bool) -> None:
        self._consumers[queue] = channel
        self._listener.listen(queue)
        # Poll once after LISTEN: messages published before it sent no wake-up.
        self._ready.add(queue)
        if queue in self.expiring:
            # From the lease thread: a long task blocking the hub must not let
            # the queue (Celery's remote-control queue, say) expire.
            self.leases.keep_alive(queue, self.expiring[queue])
        if durable_acks or queue in self.expiring:
            self.leases.start(maintain=durable_acks)

    def cancel(self, queue: str, channel: Channel) -> None:
        if self._consumers.get(queue) is channel:
            del self._consumers[queue]
            self.leases.let_expire(queue)
        self._ready.discard(queue)
        self.return_buffered([queue])

    def deliver_ready(self, most: int | None = None) -> int:
        """Deliver up to ``most`` buffered messages, claiming for ready queues first.

        A queue's buffer is refilled (one claim, sized to the consumer's free
        prefetch window) only once it is empty, so each claim feeds many
        deliveries. Returns how many messages were delivered.
        """
        for queue in list(self._ready):
            if not self._buffers.get(queue):
                self._refill(queue)
        delivered = 0
        for queue, buffer in list(self._buffers.items()):
            while buffer and (most is None or delivered < most):
                self._deliver(buffer.popleft(), queue)
                delivered += 1
            if not buffer:
                del self._buffers[queue]
        return delivered

    def _refill(self, queue: str) -> None:
        channel = self._consumers.get(queue)
        if channel is None or channel.closed:
            self._ready.discard(queue)
            return
        limit = channel.fetch_limit()
        if limit <= 0:
            return  # prefetch window full: stays ready
        payloads, returned = channel.fetch(queue, limit, channel.is_no_ack(queue))
        if returned < limit:
            self._ready.discard(queue)
        if payloads:
            self._buffers[queue] = deque(payloads)

    def queues_of(self, channel: Channel) -> list[str]:
        return [queue for queue, consumer in self._consumers.items() if consumer is channel]

    def buffered(self, channel: Channel) -> int:
        return sum(
            len(buffer) for queue, buffer in self._buffers.items()
            if self._consumers.get(queue) is channel
        )

    def return_buffered(self, queues: Iterable[str]) -> None:
        """Claimed messages never delivered go back to their queues at once, uncounted."""
        held = []
        for queue in queues:
            for payload in self._buffers.pop(queue, ()):
                row = held_row(payload["properties"]["delivery_tag"])
                if row is not None:
                    held.append(row)
        if held:
            self.settle("transport_requeue", held, refund=1)

    def _deliver(self, message: dict, queue: str) -> None:
        """Hand one message to its consumer (VB ``Transport._deliver``: the
        callback of ``Channel.basic_consume`` builds the kombu Message, adds
        it to the QoS and calls the consumer, Celery's ``on_task_received``).

        An exception that leaves the callback before the consumer settled
        the message means the consumer could not make sense of it (Celery
        raises on a body that is a JSON object instead of ``[args, kwargs,
        embed]``), or the task killed the consumer (in the solo pool it runs
        inside this callback: ``SystemExit`` in a task comes out as a
        TypeError of Celery's, ``WorkerShutdown`` as itself). That delivery
        started, so it counts: the row is requeued at once with the reason,
        and after ``max_attempts`` deliveries it is dead, with that reason.
        Under the worker's hub the exception ends there and the worker goes
        on with the next message (Celery would stop with "Unrecoverable
        error" and, restarted, crash on the same message again); connection
        errors and exceptions that stop a process (SystemExit,
        KeyboardInterrupt) go on up, as does everything on the
        ``drain_events`` path, whose caller decides.

        Under the hub Celery acks with ``hub.call_soon`` (``Consumer.
        call_soon_ack``): a task acked early (``acks_late`` off) has its ack
        scheduled, not sent, when it crashes. So the requeue waits for a
        timer of 0 s: the hub runs what ``call_soon`` scheduled (a set, in no
        order) before its timers (kombu ``Hub.create_loop``), and an ack or
        reject that came first wins.
        """
        tag = message["properties"]["delivery_tag"]
        self._delivering = tag
        try:
            super()._deliver(message, queue)
        except BaseException as exc:
            if self._delivering == tag:
                self._failed[tag] = _reason(exc)
                log.error("%s of queue %r: the consumer raised %s", _label(tag), queue,
                          self._failed[tag], exc_info=exc)
                if self._loop is None:
                    self._settle_failed(tag, queue)
                else:
                    self._loop.call_later(0, self._settle_failed, tag, queue)
            if (self._loop is None or not isinstance(exc, Exception)
                    or isinstance(exc, self.connection_errors)):
                raise
        finally:
            self._delivering = None

    def _settle_failed(self, tag: str, queue: str) -> None:
        """A delivery whose consumer raised, unless settled since: requeued,
        counted (see ``_deliver``)."""
        reason = self._failed.pop(tag, None)
        channel = self._consumers.get(queue)
        if reason is None or channel is None:
            return
        row = held_row(tag)
        channel.qos._delivered.pop(tag, None)
        if row is None or channel.is_no_ack(queue):
            log.warning("%s dropped: it was taken without ack, or is transient", _label(tag))
        else:
            log.warning("%s requeued; the delivery counts (dead after max_attempts)", _label(tag))
            self.settle("transport_requeue", [row], error=f"the consumer raised {reason}")
        self.capacity_freed()

    def failed(self, tag: str) -> str | None:
        """Why the consumer of ``tag`` raised, if it did and it was not settled since."""
        return self._failed.get(tag)

    def drain_events(self, connection, timeout=None):
        """The client path (``celery inspect``, Flower, plain kombu consumers)."""
        deadline = None if timeout is None else monotonic() + timeout
        self._listener.connect()
        while True:
            if (self._ready or self._buffers) and self.deliver_ready():
                return
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError()
            wait = self.polling_interval if remaining is None else min(remaining, self.polling_interval)
            try:
                notified = self._listener.wait(wait)
            except self.connection_errors:
                self._relisten()
                notified = set()
            if notified:
                self._ready |= notified
            else:
                self._ready |= set(self._consumers)

    # The worker's event loop ----------------------------------------------------

    def register_with_event_loop(self, connection, loop) -> None:
        """Deliver from the hub: woken by NOTIFY, by a kick, or by the safety poll.

        Messages are only delivered from reader callbacks: Celery schedules
        work with ``call_soon`` while it receives a message, and the hub runs
        that work right after its reader callbacks, but only after its next
        poll when the message was delivered from a tick or a timer.
        """
        self._loop = loop
        self._listener.connect()
        if self._wake_fds is None:
            self._wake_fds = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._listen_fd = self._listener.fileno()
        loop.add_reader(self._listen_fd, self._on_readable)
        loop.add_reader(self._wake_fds[0], self._on_kick)
        loop.on_tick.add(self._on_tick)
        if self._poll_timer is not None:
            self._poll_timer.cancel()
        self._poll_timer = loop.call_repeatedly(self.polling_interval, self._safety_poll)
        self._ready |= set(self._consumers)
        self.kick()

    def unregister_from_event_loop(self, connection, loop) -> None:
        if loop is None:
            return
        loop.on_tick.discard(self._on_tick)
        for timer in (self._poll_timer, self._ack_timer):
            if timer is not None:
                timer.cancel()
        self._poll_timer = self._ack_timer = None
        if self._listen_fd is not None:
            loop.remove_reader(self._listen_fd)
            self._listen_fd = None
        if self._wake_fds is not None:
            loop.remove_reader(self._wake_fds[0])
            for fd in self._wake_fds:
                os.close(fd)
            self._wake_fds = None
        self._loop = None

    def kick(self) -> None:
        """Make the hub deliver the ready queues soon (any thread may call it)."""
        fds = self._wake_fds
        if fds is None or self._kicked:
            return
        self._kicked = True
        try:
            os.write(fds[1], b"\0")
        except (BlockingIOError, OSError):
            pass

    def capacity_freed(self) -> None:
        """A message was settled: queues waiting for prefetch room may go on."""
        if self._ready:
            self.kick()

    def _on_kick(self) -> None:
        try:
            os.read(self._wake_fds[0], 4096)
        except (BlockingIOError, OSError):
            pass
        self._kicked = False
        self._deliver_one()

    def _on_readable(self) -> None:
        try:
            self._ready |= self._listener.read()
        except self.connection_errors:
            self._relisten()
        self._deliver_one()

    def _relisten(self) -> None:
        """The LISTEN session was lost: a fresh one, and every queue polled
        (notifications sent meanwhile are lost). Raises when the database
        cannot be reached: the consumer then restarts."""
        loop = self._loop
        if loop is not None and self._listen_fd is not None:
            loop.remove_reader(self._listen_fd)
            self._listen_fd = None
        self._listener.close()
        self._listener.connect()
        if loop is not None:
            self._listen_fd = self._listener.fileno()
            loop.add_reader(self._listen_fd, self._on_readable)
        self._ready |= set(self._consumers)
        log.info("listening again after a lost connection")

    def _deliver_one(self) -> None:
        # One message per hub iteration: between two, Celery sees a shutdown
        # request and runs what the last message scheduled.
        self.deliver_ready(most=1)
        if self._buffers:
            self.kick()
        elif self._acks and self._ack_timer is None:
            # Idle for now: the acks wait a moment for the next claim to take them.
            self._ack_timer = self._loop.call_later(ACK_WAIT, self._flush_acks_later)

    def _flush_acks_later(self) -> None:
        self._ack_timer = None
        self.flush_acks()

    def _on_tick(self) -> None:
        if self._ready and not self._kicked and self._deliverable():
            self.kick()

    def _deliverable(self) -> bool:
        if self._buffers:
            return True
        for queue in self._ready:
            channel = self._consumers.get(queue)
            if channel is None or channel.fetch_limit() > 0:
                return True
        return False

    def _safety_poll(self) -> None:
        self.flush_acks()
        idle = [queue for queue in self._consumers if queue not in self._ready]
        if idle:
            rows = self.execute(queries["transport_probe"], {"queues": idle}).fetchall()
            self._ready.update(row[0] for row in rows)


def _revoked_by_worker(headers: dict) -> bool:
    """Whether the broker must deliver this message even past its TTL.

    Celery turns ``apply_async(expires=...)`` into both the ``expires`` header
    and the ``expiration`` property. A worker that receives an expired task
    revokes it (``Request.revoked()``), which stores REVOKED in the result
    backend, whichever it is: a caller waiting on the result hears that the
    task expired, as with Redis as broker. Dropped by the broker instead, the
    task's result would stay PENDING forever. So a Celery task message with
    that header is stored without a TTL (a queue's ``x-message-ttl`` still
    applies). A job's task keeps its TTL: the job model marks it dead when it
    expires (reclaim_stale_tasks()), and that is its job's outcome.
    """
    return (headers.get("expires") is not None and headers.get("task") is not None
            and headers.get("id") is not None and not headers.get("job_id"))


def _reason(exc: BaseException) -> str:
    """An exception a consumer raised, for the row's error and the log: each
    exception of the chain as "Type: primary message", at most REASON_LENGTH
    characters."""
    parts = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = first_line(exc)
        name = type(exc).__name__
        parts.append(name if text == name else f"{name}: {text}")
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    reason = ", raised while handling ".join(parts)
    return reason if len(reason) <= REASON_LENGTH else reason[:REASON_LENGTH - 1] + "…"


def _label(tag: str) -> str:
    """A delivery tag as a log line names it: the row and its table."""
    if tag.startswith(TRANSIENT_TAG_PREFIX):
        return f"broker_transient_messages row {tag.removeprefix(TRANSIENT_TAG_PREFIX)}"
    return f"job_tasks row {tag.partition(':')[0]}"


def _uuid_header(headers: dict, key: str) -> str | None:
    """A header stored in a uuid column, checked as the database would."""
    value = headers.get(key)
    if value is None:
        return None
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ChannelError(
            f"message refused: header {key} is not a UUID: {str(value)[:40]!r}"
        ) from None


def _max_attempts(headers: dict) -> int | None:
    """The ``max_attempts`` header: a whole number of deliveries, at least 1."""
    value = headers.get("max_attempts")
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INT:
        raise ChannelError(
            f"message refused: header max_attempts must be a whole number from 1 to "
            f"{MAX_INT}, not {str(value)[:40]!r}"
        )
    return value


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _flag(value: object) -> bool:
    """A boolean transport option, also when it came from a URL or env var."""
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


def _conninfo(client) -> str:
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


def _after_fork_in_child() -> None:
    for transport in list(_transports):
        transport.forget_after_fork()


@atexit.register
def _settle_at_exit() -> None:
    for transport in list(_transports):
        if transport.owns_connections():
            transport.settle_before_exit(SETTLE_AT_EXIT)


os.register_at_fork(after_in_child=_after_fork_in_child)
