"""Delivery: from claimed rows to the consumer's callback.

Which queues are consumed (and by which channel), which are ready (a
notification, a poll, or a claim that came back full says they may hold
messages), and the messages claimed but not yet delivered. A queue's buffer
is refilled by one claim sized to its consumer's free prefetch window, and
only once it is empty, so one round trip feeds many deliveries; the hub
hands out one message per callback (:mod:`.poller`). A message a publish
handed to this consumer already claimed (:meth:`Delivery.accept`) joins its
queue's buffer with no statement at all.

No message may stop a consumer: a delivery whose consumer raised is
requeued and counted (:meth:`Delivery.deliver`), and messages claimed but
never delivered go back uncounted when their consumer goes.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pg_broker import forking

from .connections import CONNECTION_ERRORS
from .listener import Listener
from .messages import HandOff, failure_reason, held_row, label
from .settlement import Settlements

if TYPE_CHECKING:
    from .channel import Channel

log = logging.getLogger(__name__)


def _nothing() -> None:
    pass


class Delivery:
    """Consumed queues, their readiness and their claimed, undelivered messages."""

    def __init__(self, dispatch: Callable[[dict, str], None], listener: Listener,
                 settlements: Settlements) -> None:
        """``dispatch`` hands one message to the consumer of its queue
        (kombu's ``Transport._deliver``)."""
        self._dispatch = dispatch
        self._listener = listener
        self._settlements = settlements
        self._leases = settlements.leases
        self.consumers: dict[str, Channel] = {}
        self.ready: set[str] = set()
        # Queues whose last claim found nothing (the poller's cue to wait on them).
        self.emptied: set[str] = set()
        # Claimed, not yet delivered: the hub hands out one message per callback.
        self.buffers: dict[str, deque[dict]] = {}
        self.expiring: dict[str, float] = {}  # queue -> x-expires seconds
        # The delivery inside the consumer callback, until the consumer settles it.
        self._delivering: str | None = None
        # Deliveries whose consumer raised, not settled yet: tag -> reason.
        self._failed: dict[str, str] = {}
        # Under a hub (see attach()).
        self._loop = None
        self._kick: Callable[[], None] = _nothing
        forking.forget_in_child(self)

    def attach(self, loop, kick: Callable[[], None]) -> None:
        """A hub runs the transport: requeues of failed deliveries wait for
        its timers, freed capacity ``kick``s it."""
        self._loop = loop
        self._kick = kick

    def detach(self) -> None:
        self._loop = None
        self._kick = _nothing

    # Consumers ------------------------------------------------------------------

    def consume(self, queue: str, channel: Channel, durable_acks: bool) -> None:
        self.consumers[queue] = channel
        self._listener.listen(queue)
        self._leases.consume(queue)
        # Poll once after LISTEN: messages published before it sent no wake-up.
        self.ready.add(queue)
        if queue in self.expiring:
            # From the lease thread: a long task blocking the hub must not let
            # the queue (Celery's remote-control queue, say) expire.
            self._leases.keep_alive(queue, self.expiring[queue])
        # The lease thread also keeps the consumer's registration alive.
        self._leases.start(maintain=durable_acks)

    def cancel(self, queue: str, channel: Channel) -> None:
        if self.consumers.get(queue) is channel:
            del self.consumers[queue]
            self._leases.let_expire(queue)
            self._leases.stop_consuming(queue)
            self._listener.unlisten(queue)
        self.ready.discard(queue)
        self.return_buffered([queue])

    def queues_of(self, channel: Channel) -> list[str]:
        return [queue for queue, consumer in self.consumers.items() if consumer is channel]

    # Claimed messages -------------------------------------------------------------

    def deliver_ready(self, most: int | None = None) -> int:
        """Deliver up to ``most`` buffered messages, claiming for ready queues first.

        A queue's buffer is refilled (one claim, sized to the consumer's free
        prefetch window) only once it is empty, so each claim feeds many
        deliveries. Returns how many messages were delivered.
        """
        for queue in list(self.ready):
            if not self.buffers.get(queue):
                self._refill(queue)
        delivered = 0
        for queue, buffer in list(self.buffers.items()):
            while buffer and (most is None or delivered < most):
                self.deliver(buffer.popleft(), queue)
                delivered += 1
            if not buffer:
                del self.buffers[queue]
        return delivered

    def _refill(self, queue: str) -> None:
        channel = self.consumers.get(queue)
        if channel is None or channel.closed:
            self.ready.discard(queue)
            return
        limit = channel.fetch_limit()
        if limit <= 0:
            return  # prefetch window full: stays ready
        payloads, returned = channel.fetch(queue, limit, channel.is_no_ack(queue))
        if returned < limit:
            self.ready.discard(queue)
        if returned:
            self.emptied.discard(queue)
        else:
            self.emptied.add(queue)
        if payloads:
            self.buffers[queue] = deque(payloads)

    def takes_hand_offs(self, queue: str) -> bool:
        """Whether ``queue``'s consumer may be handed a message claimed for it."""
        channel = self.consumers.get(queue)
        return channel is not None and channel.takes_hand_offs(queue)

    def accept(self, handed: HandOff) -> None:
        """A row a publish handed to this consumer, claimed for it
        (migrations/core/220): buffered for delivery as a claimed one, or,
        when its consumer is gone, cancelled, closed or has no room now,
        given back at once (pending again, un-counted, the next waiter woken)."""
        channel = self.consumers.get(handed.queue)
        if (channel is None or channel.closed or channel.is_no_ack(handed.queue)
                or not channel.has_room()):
            self._settlements.give_back([handed.token])
            return
        payload = channel.take_handed(handed)
        if payload is not None:
            self.buffers.setdefault(handed.queue, deque()).append(payload)

    def give_back(self, tokens: list) -> None:
        """Rows handed under ``tokens`` and not taken go back (see :meth:`accept`)."""
        self._settlements.give_back(tokens)

    def can_claim(self, queue: str) -> bool:
        """Whether a claim for ``queue`` would take messages now (room in its
        consumer's prefetch window, nothing buffered for it)."""
        channel = self.consumers.get(queue)
        return (channel is not None and not self.buffers.get(queue)
                and channel.fetch_limit() > 0)

    def deliverable(self) -> bool:
        """Whether delivering now would deliver or claim something."""
        if self.buffers:
            return True
        for queue in self.ready:
            channel = self.consumers.get(queue)
            if channel is None or channel.fetch_limit() > 0:
                return True
        return False

    def buffered(self, channel: Channel) -> int:
        return sum(
            len(buffer) for queue, buffer in self.buffers.items()
            if self.consumers.get(queue) is channel
        )

    def return_buffered(self, queues: Iterable[str]) -> None:
        """Claimed messages never delivered go back to their queues at once, uncounted."""
        held = []
        for queue in queues:
            for payload in self.buffers.pop(queue, ()):
                row = held_row(payload["properties"]["delivery_tag"])
                if row is not None:
                    held.append(row)
        if held:
            self._settlements.settle("requeue", held, refund=1)

    def capacity_freed(self) -> None:
        """A message was settled: queues waiting for prefetch room may go on."""
        if self.ready:
            self._kick()

    # One delivery --------------------------------------------------------------------

    def deliver(self, message: dict, queue: str) -> None:
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
            self._dispatch(message, queue)
        except BaseException as exc:
            if self._delivering == tag:
                self._failed[tag] = failure_reason(exc)
                log.error("%s of queue %r: the consumer raised %s", label(tag), queue,
                          self._failed[tag], exc_info=exc)
                if self._loop is None:
                    self._settle_failed(tag, queue)
                else:
                    self._loop.call_later(0, self._settle_failed, tag, queue)
            if (self._loop is None or not isinstance(exc, Exception)
                    or isinstance(exc, CONNECTION_ERRORS)):
                raise
        finally:
            self._delivering = None

    def _settle_failed(self, tag: str, queue: str) -> None:
        """A delivery whose consumer raised, unless settled since: requeued,
        counted (see ``deliver``)."""
        reason = self._failed.pop(tag, None)
        channel = self.consumers.get(queue)
        if reason is None or channel is None:
            return
        row = held_row(tag)
        channel.qos._delivered.pop(tag, None)
        if row is None or channel.is_no_ack(queue):
            log.warning("%s dropped: it was taken without ack, or is transient", label(tag))
        else:
            log.warning("%s requeued; the delivery counts (dead after max_attempts)", label(tag))
            self._settlements.settle("requeue", [row], error=f"the consumer raised {reason}")
        self.capacity_freed()

    def settled(self, tag: str) -> None:
        """The consumer settled ``tag`` (see ``deliver``)."""
        if self._delivering == tag:
            self._delivering = None
        if self._failed:
            self._failed.pop(tag, None)

    def failed(self, tag: str) -> str | None:
        """Why the consumer of ``tag`` raised, if it did and it was not settled since."""
        return self._failed.get(tag)

    def forget_after_fork(self) -> None:
        """In a forked child: claimed messages and deliveries are the parent's
        (see :mod:`pg_broker.forking`)."""
        self.ready.clear()
        self.emptied.clear()
        self.buffers.clear()
        self._delivering = None
        self._failed.clear()
        self.detach()
