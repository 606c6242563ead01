"""Kombu's ``QoS`` for the transport: prefetch accounting as in kombu's
virtual transport, settlement on the claimed rows.

kombu's virtual QoS acks in memory and requeues by publishing a copy
(VB ``_restore``). Here ack, reject, requeue and the restore when a channel
closes act on the row each delivery holds, fenced by its lease token
(:mod:`.settlement`), and what a delivery was doing when its channel closed
decides what happens to its row (:meth:`QoS.restore_unacked`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from kombu.transport import virtual

from pg_broker import forking

from .messages import held_row

if TYPE_CHECKING:
    from .channel import Channel
    from .transport import Transport


class QoS(virtual.QoS):
    """Prefetch accounting as in kombu; settlement acts on the claimed rows."""

    def __init__(self, channel: Channel, prefetch_count: int = 0) -> None:
        super().__init__(channel, prefetch_count)
        transport: Transport = channel.connection
        self.settlements = transport.settlements
        self.delivery = transport.delivery
        forking.forget_in_child(self)

    def ack(self, delivery_tag) -> None:
        held = held_row(delivery_tag)
        if held is not None and (delivery_tag in self._delivered
                                 or self.settlements.unkeep(delivery_tag)):
            self.settlements.ack(held)
        self.delivery.settled(delivery_tag)
        super().ack(delivery_tag)
        self.delivery.capacity_freed()

    def reject(self, delivery_tag, requeue: bool = False) -> None:
        held = held_row(delivery_tag)
        message = self._delivered.get(delivery_tag)
        if held is not None and (message is not None or self.settlements.unkeep(delivery_tag)):
            self.settlements.settle("requeue" if requeue else "fail", [held])
        elif requeue and message is not None:
            self.channel.republish(message)
        self.delivery.settled(delivery_tag)
        super().ack(delivery_tag)
        self.delivery.capacity_freed()

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
          exits first returns the row counted (``Settlements.settle_before_exit``);
        - its consumer callback raised (``Delivery.deliver``; in the solo
          pool the task runs inside that callback, so this is how a task
          that kills its worker is counted) and the requeue it scheduled did
          not run before the worker stopped: requeued, counted, with the
          reason.

        In a forked child the messages are the parent's: forgotten at the
        fork (:meth:`forget_after_fork`), so there is nothing to give back.
        """
        self._flush()
        delivered = list(self._delivered.items())
        self._delivered.clear()
        running = running_deliveries() if delivered else set()
        returned = []
        errors = []
        for tag, message in delivered:
            row = held_row(tag)
            failed = self.delivery.failed(tag)
            if row is None:
                try:
                    self.channel.republish(message)
                except Exception as exc:
                    errors.append((exc, message))
            elif failed is not None:
                self.delivery.settled(tag)
                self.settlements.settle("requeue", [row], error=f"the consumer raised {failed}")
            elif tag in running:
                self.settlements.keep(tag, row)
            else:
                returned.append(row)
        if returned:
            self.settlements.settle("requeue", returned, refund=1)
        return errors

    def forget_after_fork(self) -> None:
        """In a forked child: the deliveries are the parent's (see :mod:`pg_broker.forking`)."""
        self._delivered.clear()
        self._dirty.clear()


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
