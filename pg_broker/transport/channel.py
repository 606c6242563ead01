"""Kombu's interface: ``Channel`` over PostgreSQL (its ``QoS``: :mod:`.qos`).

A message on a durable queue is a ``job_tasks`` row; on a non-durable queue
(Celery events, pidbox, replies) a ``broker_transient_messages`` row. Routing
(direct, topic, fanout) reads the bindings every process shares in
``broker_bindings``, inside the one statement that stores the message and
notifies its queue. Consumers claim rows in batches sized to their prefetch
window with ``FOR UPDATE SKIP LOCKED`` under a lease; ack, reject, requeue and
restore act on the claimed row, fenced by its lease token
(:mod:`.settlement`).

A publish takes one of three roads: into the caller's transaction
(:func:`enqueue_in`), confirmed (a statement of its own, returning after the
commit) or pipelined (sent without waiting, :mod:`.pipeline`).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import psycopg
from amqp.protocol import queue_declare_ok_t
from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.uuid import uuid as kombu_uuid

from pg_broker import forking
from pg_broker.masking import first_line

from .messages import (
    TRANSIENT_TAG_PREFIX,
    HandOff,
    delivery_tag,
    malformed,
    milliseconds,
    publish_params,
    refuse_unstorable,
)
from .qos import QoS

if TYPE_CHECKING:
    from .transport import Transport

log = logging.getLogger(__name__)

_enqueue = threading.local()


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


class Channel(virtual.Channel):
    """A virtual channel whose queues, bindings and messages live in PostgreSQL."""

    QoS = QoS
    supports_fanout = True
    do_restore = True

    def __init__(self, connection: Transport, **kwargs) -> None:
        super().__init__(connection, **kwargs)
        self.transport: Transport = connection
        self.store = connection.store
        self.delivery = connection.delivery
        self.settlements = connection.settlements
        self._durable: dict[str, bool] = {}
        self._noack_queues: set[str] = set()
        self._auto_delete: set[str] = set()
        forking.forget_in_child(self)

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
            expires = milliseconds(arguments.get("x-expires"))
            self._durable[queue] = self.store.declare_queue(
                queue, bool(durable), bool(exclusive), bool(auto_delete),
                milliseconds(arguments.get("x-message-ttl")), expires,
                arguments.get("x-max-priority"), arguments,
            )
            if auto_delete or exclusive:
                self._auto_delete.add(queue)
            if expires is not None:
                self.delivery.expiring[queue] = expires.total_seconds()
        return queue_declare_ok_t(queue, self._size(queue), 0)

    def queue_bind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        exchange = exchange or "amq.direct"
        self.state.binding_declare(queue, exchange, routing_key, arguments)
        self._queue_bind(
            exchange, *self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        )

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        self.store.bind(exchange, self.typeof(exchange).type, routing_key or "", pattern or "",
                        queue)

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        exchange = exchange or "amq.direct"
        self.state.binding_delete(queue, exchange, routing_key)
        self.store.unbind(exchange, routing_key or "", queue)

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        if if_empty and self._size(queue):
            return 0
        purged = self._delete_queue(queue)
        self.state.queue_bindings_delete(queue)
        self._durable.pop(queue, None)
        self._auto_delete.discard(queue)
        return purged

    def _delete_queue(self, queue: str) -> int:
        """Drop a queue, its bindings and its ready messages; how many messages went."""
        purged = self.store.delete_queue(queue)
        self.delivery.expiring.pop(queue, None)
        return purged

    def exchange_delete(self, exchange, if_unused=False, nowait=False):
        self.store.delete_exchange(exchange)
        self.state.exchanges.pop(exchange, None)

    def get_table(self, exchange):
        return self.store.bindings(exchange)

    def typeof(self, exchange, default="direct"):
        try:
            kind = self.state.exchanges[exchange]["type"]
        except KeyError:
            kind = self.store.exchange_type(exchange) or default
        return self.exchange_types[kind]

    def _has_queue(self, queue, **kwargs):
        return self.store.queue_durable(queue) is not None

    def _size(self, queue):
        return self.store.queue_size(queue)

    def _purge(self, queue):
        return self.store.purge(queue)

    def is_durable(self, queue: str) -> bool:
        """Where the queue's messages live; a queue never declared is durable."""
        durable = self._durable.get(queue)
        if durable is None:
            durable = self.store.queue_durable(queue)
            durable = True if durable is None else durable
            self._durable[queue] = durable
        return durable

    # Publishing -----------------------------------------------------------

    def basic_publish(self, message, exchange, routing_key, **kwargs):
        self._inplace_augment_message(message, exchange, routing_key)
        self.publish(message, exchange or "", routing_key or "")

    def _put(self, queue, message, **kwargs):
        self.publish(message, "", queue)

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        self.publish(message, exchange, routing_key or "")

    def republish(self, message) -> None:
        """Requeue a transient delivery: publish a copy where it was sent."""
        info = message.delivery_info
        raw = message.serializable()
        raw["properties"]["delivery_info"]["redelivered"] = True
        self.publish(raw, info.get("exchange") or "", info.get("routing_key") or "")

    def publish(self, message: dict, exchange: str, routing_key: str) -> None:
        """Store ``message`` in every queue the route reaches; return after commit
        (or once sent, pipelined: transient messages, and all of them
        without ``confirm_publish``; a lone transient one runs as a
        confirmed one does: see :meth:`.pipeline.Pipeline.takes`)."""
        transport = self.transport
        options = transport.options
        params = publish_params(message, exchange, routing_key,
                                self._get_message_priority(message), options.max_message_size)
        conn = getattr(_enqueue, "conn", None)
        lone = False
        if conn is None:  # our own transaction: the options decide how durable
            params["synchronous_commit"] = options.synchronous_commit
            transient = message["properties"].get("delivery_mode") in (1, "transient")
            if transient or not options.confirm_publish:
                # The database's refusals come too late for the caller (at its
                # next publish), so what it would refuse is refused here first.
                refuse_unstorable(params)
                if not transient or transport.pipeline.takes():
                    label = (f"{params['task_id'] or 'message'} for "
                             f"{params['exchange'] or params['routing_key']}")
                    transport.pipeline.send(params, not transient, label)
                    return
                # A lone transient one (a heartbeat, a remote-control reply):
                # below, on the work connection, so that no pipeline connection
                # opens; its table is UNLOGGED, so its commit waits for no flush.
                lone = True
        try:
            if conn is None:
                pipeline = transport.pipeline
                params = pipeline.ration(params)
                self.store.publish(params, lone, options.visible_before_flush and not lone)
                if not params["notify"]:
                    pipeline.owe(params)
            else:
                self.store.publish_in(conn, params)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            raise ChannelError(f"message refused by the database (SQLSTATE {exc.sqlstate}: "
                               f"{first_line(exc)})") from exc

    # Consuming ------------------------------------------------------------

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        if no_ack:
            self._noack_queues.add(queue)
        else:
            self._noack_queues.discard(queue)
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        self.delivery.consume(queue, self, durable_acks=not no_ack and self.is_durable(queue))
        return result

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._noack_queues.discard(queue)
            self.delivery.cancel(queue, self)
            self._unregister(queue)
            if queue in self._auto_delete and not self.closed:
                self.queue_delete(queue)
        return result

    def _unregister(self, queue: str) -> None:
        """Gone from the live consumers at once; if the database cannot be
        told, the registration expires (see :mod:`.leases`)."""
        if self.transport is None:
            return
        try:
            self.store.unregister_consumers([queue], self.settlements.worker_id)
            self.transport.poller.stop_waiting([queue])
        except (psycopg.Error, *self.transport.connection_errors):
            log.debug("could not unregister the consumer of %r", queue, exc_info=True)

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
        batch_max = self.transport.options.claim_batch_max
        if estimate is None:
            return batch_max
        room = estimate - self.delivery.buffered(self)
        in_flight = self.qos.prefetch_count - estimate
        if in_flight > 0 and room * 2 < self.qos.prefetch_count:
            return 0
        return max(min(room, batch_max), 0)

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
        settlements = self.settlements
        rows, token = settlements.claim(queue, limit)
        rows.sort(key=lambda row: (-row.priority, row.sequence))
        payloads = []
        held = []
        for row in rows:
            payload = self._held_message(row.id, token, row.payload, row.attempts)
            if payload is not None:
                payloads.append(payload)
                held.append((row.id, token))
        if no_ack and held:
            settlements.ack_and_claim(held)
        elif held:
            leases = settlements.leases
            for row in held:
                leases.hold(*row)
            leases.start()
        return payloads, len(rows)

    def _held_message(self, row_id: int, token: uuid.UUID, payload: object,
                      attempts: int) -> dict | None:
        """A held row's Kombu message, its delivery tag set; None (the row
        buried) when it is no Kombu message."""
        problem = malformed(payload)
        if problem:
            self.settlements.bury(row_id, token, problem)
            return None
        properties = payload["properties"]
        properties["delivery_tag"] = delivery_tag(row_id, token)
        properties.setdefault("delivery_info", {})["redelivered"] = attempts > 1
        return payload

    def takes_hand_offs(self, queue: str) -> bool:
        """Whether a publish may hand this channel a message of ``queue``
        already claimed (migrations/core/220): the hand_off option is on,
        and it consumes a durable queue with acks and has room."""
        return (self.transport.options.hand_off and not self.closed
                and not self.is_no_ack(queue) and self.is_durable(queue)
                and self.fetch_limit() > 0)

    def has_room(self) -> bool:
        """Whether one more message fits in the prefetch window."""
        estimate = self.qos.can_consume_max_estimate()
        return estimate is None or estimate - self.delivery.buffered(self) > 0

    def take_handed(self, handed: HandOff) -> dict | None:
        """The message of a row a publish handed to this channel, held under
        its lease from now on; None when it is gone (read by id when the
        notification could not carry it, and no longer held) or no Kombu
        message (buried)."""
        message = handed.message
        if message is None:
            message = self.store.handed(handed.id, handed.token)
            if message is None:
                log.warning("job_tasks row %s handed to this consumer is no longer held by "
                            "lease %s; skipped", handed.id, handed.token)
                return None
        payload = self._held_message(handed.id, handed.token, message, 1)
        if payload is not None:
            leases = self.settlements.leases
            leases.hold(handed.id, handed.token)
            leases.start()
        return payload

    def _take(self, queue: str, limit: int) -> tuple[list[dict], int]:
        rows = self.store.take_transient(queue, limit)
        rows.sort(key=lambda row: (-row.priority, row.id))
        payloads = []
        for row in rows:
            payload = row.payload
            problem = malformed(payload)
            if problem:
                log.error("dropped transient message %s of queue %r: %s", row.id, queue, problem)
                continue
            properties = payload["properties"]
            properties["delivery_tag"] = f"{TRANSIENT_TAG_PREFIX}{row.id}"
            properties.setdefault("delivery_info", {})
            payloads.append(payload)
        return payloads, len(rows)

    def close(self):
        if not self.closed:
            owner = self.transport is not None
            if owner:
                self.settlements.flush_acks()
                self.delivery.return_buffered(self.delivery.queues_of(self))
            super().close()
            if owner:
                for queue in list(self._auto_delete):
                    try:
                        self._delete_queue(queue)
                    except self.transport.connection_errors:
                        log.debug("could not delete queue %r at close", queue, exc_info=True)
                self._auto_delete.clear()

    def forget_after_fork(self) -> None:
        """In a forked child: the auto-delete queues are the parent's to delete
        (see :mod:`pg_broker.forking`)."""
        self._auto_delete.clear()
