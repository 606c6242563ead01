"""Waiting for messages: the worker's hub, and ``drain_events`` for clients.

With ``asynchronous=True`` a Celery worker runs kombu's hub and never calls
``drain_events``; clients (``celery inspect``, Flower's event thread, plain
kombu consumers) always call ``drain_events``. :class:`Poller` serves both,
as kombu's Redis transport has its ``MultiChannelPoller``:

- under the hub, three things make it deliver: the LISTEN connection turning
  readable (a NOTIFY), a kick (a byte on a pipe of its own, written from any
  thread: room in the prefetch window, an ack waiting for a claim, a buffer
  not yet empty) and the safety poll every ``polling_interval``, which also
  sends acks left waiting and lets the listener check that notifications
  arrive (:meth:`.listener.Listener.check_notifications`). Acks wait ``ACK_WAIT`` for a claim to carry them
  when the hub is idle, then go on their own (at once when the consumer
  waits to be handed messages: no claim will come);
- ``drain_events`` waits on the LISTEN connection (or the polling interval)
  and delivers what is ready.

A publish notifies a queue only when a consumer waits there (PostgreSQL
signals every listening session of the database on each NOTIFY): a consumer
whose claim found a queue empty records itself as waiting on it
(``pg_broker_wait``) and claims again if a message came meanwhile; the next
publish there takes the longest-waiting record away and notifies that
consumer alone, on the listener's own channel (``pg_broker_wake``,
migrations/core/131 and 140): one wake-up per message, however many
consumers wait. A consumer woken with its prefetch window full passes the
wake-up on; one that stops consuming a queue deletes its record. Under the
hub, a queue that ran dry after giving messages is claimed from again every
``LINGER`` for a while (its linger) before its consumer waits: a consumer
keeping pace with its producers claims the next messages then, and is never
notified (one notification costs the server a wake-up of every listening
session: 0.08 ms of server CPU alone, 3-10 ms with 200 idle listeners; an
empty claim, one index probe). The linger adapts per queue: it starts at
``LINGER`` (one more claim), doubles up to ``linger_max`` (a transport
option) each time a wait ended with a notification within ``linger_max``
(the message came soon after the consumer gave up: lingering longer would
have taken it), and halves after a longer wait. A worker that runs dry
between the tasks of a steady producer so stops costing notifications; an
idle worker (seconds between tasks) lingers ``LINGER`` and is woken as
before. The cost: a message published while a consumer lingers waits up to
``LINGER`` for the next claim instead of 1-2 ms for its notification, which
is why ``linger_max`` is ``LINGER`` by default (measured: README *Many
listeners*).

A lost LISTEN session is replaced on the spot and every queue polled
(notifications sent meanwhile are lost).
"""

from __future__ import annotations

import logging
import os
import uuid
from time import monotonic

from pg_broker import forking

from .connections import CONNECTION_ERRORS
from .delivery import Delivery
from .listener import Listener
from .messages import HandOff
from .settlement import ACK_WAIT, Settlements
from .store import Store

log = logging.getLogger(__name__)

# Seconds a queue that ran dry after giving messages waits for its next
# claim before its consumer records itself as waiting (see above): above the
# spacing of a steady stream (1 ms at 1,000 messages/s), below the pause
# between an idle worker's tasks that matters for latency (a notification
# takes 1-2 ms).
LINGER = 0.005


class Poller:
    """The hub's readers, kick, timers and safety poll; and the client's wait."""

    def __init__(self, listener: Listener, delivery: Delivery, settlements: Settlements,
                 store: Store, polling_interval: float, linger_max: float = LINGER) -> None:
        self._listener = listener
        self._delivery = delivery
        self._settlements = settlements
        self._store = store
        self.polling_interval = polling_interval
        # The longest a queue's linger grows to (see above).
        self.linger_max = max(linger_max, LINGER)
        self.loop = None
        self._poll_timer = None
        self._listen_fd: int | None = None
        self._wake_fds: tuple[int, int] | None = None
        self._kicked = False
        self._ack_timer = None
        # Who this consumer is in broker_waiters, and the queues it is
        # recorded as waiting on there (until a notification says a publish
        # took the record away).
        self._waiter = uuid.uuid4()
        self._waiting: set[str] = set()
        # The lease token each waiting record offers for a hand-off
        # (migrations/core/220), by queue.
        self._tokens: dict[str, uuid.UUID] = {}
        # Queues to claim from once more when the linger timer fires.
        self._lingering: set[str] = set()
        self._linger_timer = None
        self._linger: dict[str, float] = {}  # queue -> its linger (LINGER to linger_max)
        self._dry_since: dict[str, float] = {}  # queue -> when its claims last ran dry
        self._waited_since: dict[str, float] = {}  # queue -> when this consumer began to wait
        forking.forget_in_child(self)

    # The worker's event loop ----------------------------------------------------

    def register(self, loop) -> None:
        """Deliver from the hub: woken by NOTIFY, by a kick, or by the safety poll.

        Messages are only delivered from reader callbacks: Celery schedules
        work with ``call_soon`` while it receives a message, and the hub runs
        that work right after its reader callbacks, but only after its next
        poll when the message was delivered from a tick or a timer.
        """
        self.loop = loop
        self._delivery.attach(loop, self.kick)
        self._listener.connect()
        self._listener.wake_with(self.kick)  # another thread's read of the shared session
        if self._wake_fds is None:
            self._wake_fds = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._settlements.attach(self.kick)
        self._listen_fd = self._listener.fileno()
        loop.add_reader(self._listen_fd, self._on_readable)
        loop.add_reader(self._wake_fds[0], self._on_kick)
        loop.on_tick.add(self._on_tick)
        if self._poll_timer is not None:
            self._poll_timer.cancel()
        self._poll_timer = loop.call_repeatedly(self.polling_interval, self._safety_poll)
        self._delivery.ready |= set(self._delivery.consumers)
        self.kick()

    def unregister(self) -> None:
        loop = self.loop
        if loop is None:
            return
        loop.on_tick.discard(self._on_tick)
        for timer in (self._poll_timer, self._ack_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._poll_timer = self._ack_timer = self._linger_timer = None
        self._lingering.clear()
        self._dry_since.clear()
        if self._listen_fd is not None:
            loop.remove_reader(self._listen_fd)
            self._listen_fd = None
        if self._wake_fds is not None:
            self._settlements.detach()
            loop.remove_reader(self._wake_fds[0])
            for fd in self._wake_fds:
                os.close(fd)
            self._wake_fds = None
        self._delivery.detach()
        self._listener.wake_with(None)
        self.loop = None

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

    def _on_kick(self) -> None:
        try:
            os.read(self._wake_fds[0], 4096)
        except (BlockingIOError, OSError):
            pass
        self._kicked = False
        self._check_session()
        self._notified(self._listener.take())
        self._handed(self._listener.take_handed())
        self._deliver_one()

    def _on_readable(self) -> None:
        try:
            self._notified(self._listener.read())
        except CONNECTION_ERRORS:
            self.relisten()
        else:
            self._check_session()
        self._handed(self._listener.take_handed())
        self._deliver_one()

    def _notified(self, queues: set[str]) -> None:
        """A publish to ``queues`` notified: ready, and no longer recorded as
        waited on (the publish took the records away). A wake-up this
        consumer cannot act on now (its prefetch window is full) goes on to
        the next waiter: it was the only one the publish sent."""
        self._waiting -= queues
        self._delivery.ready |= queues
        for queue in queues:
            self._tokens.pop(queue, None)
            self._waited(queue)
            if not self._delivery.can_claim(queue):
                self._store.pass_wake(queue)

    def _handed(self, handed: list[HandOff]) -> None:
        """Publishes handed rows to this consumer, claimed for it: each
        took this consumer's record of its queue, and is delivered (or
        given back) with no claim."""
        for row in handed:
            if self._tokens.get(row.queue) == row.token:
                del self._tokens[row.queue]
                self._waiting.discard(row.queue)
                self._waited(row.queue)
            else:
                # Not the offer this consumer's record makes now: one
                # withdrawn (still held for it) or given back when it stopped
                # waiting (pending again, perhaps another's by now). Its row
                # is read, fenced by the token, rather than trusted.
                row = row._replace(message=None)
                if row.queue not in self._tokens:
                    # Withdrawn: the publish took the record before the
                    # withdrawal reached it, so none is left. Record again
                    # once the queue is empty (while it counted as waiting,
                    # a worker's publishes there waited for the safety poll).
                    self._waiting.discard(row.queue)
            self._delivery.accept(row)
            if self.linger_max > LINGER:
                # Lingering asked for (many listeners): the queue lingers as
                # after a claim that gave messages. By default the consumer
                # waits again at once, to be handed the next one: no claim
                # LINGER later, and a caller's next request, published right
                # after its result, is handed over instead of waiting for it.
                self._delivery.emptied.discard(row.queue)

    def _waited(self, queue: str) -> None:
        """A wait on ``queue`` ended with a message: its linger adapts (see
        the module's docstring)."""
        since = self._waited_since.pop(queue, None)
        if since is not None:
            linger = self._linger.get(queue, LINGER)
            if monotonic() - since < self.linger_max:
                self._linger[queue] = min(linger * 2, self.linger_max)
            else:
                self._linger[queue] = max(linger / 2, LINGER)

    def stop_waiting(self, queues: list[str]) -> None:
        """No longer consuming ``queues``: this consumer's records go (each
        would take a publish's wake-up)."""
        if self._waiting.intersection(queues):
            self._waiting.difference_update(queues)
            self._store.unwait(queues, self._waiter)
            # After the records went (a publish that took one committed
            # first: the unwait waited for its row lock), what was handed
            # and not yet heard goes back.
            self._give_back([self._tokens.pop(queue) for queue in queues if queue in self._tokens])

    def _withdraw_offers(self) -> None:
        """Records offering hand-offs on queues whose consumer has no room
        now (a delivery filled its prefetch window) only wake it from now on:
        a waiter record is handed a row only when its consumer can take it."""
        full = [queue for queue in self._tokens if not self._delivery.takes_hand_offs(queue)]
        if full:
            for queue in full:
                del self._tokens[queue]
            self._store.wake_only(full, self._waiter)

    def _give_back(self, tokens: list[uuid.UUID]) -> None:
        if tokens:
            self._delivery.give_back(tokens)

    def _wait_on_empty(self, linger: bool = False) -> bool:
        """Record this consumer as waiting on the queues it found empty (those
        no longer ready) and not yet recorded; whether one of them had a
        message after all (it is ready again). One statement per queue: each
        holds its queue's lock alone (migrations/core/131). With ``linger``
        (the hub), a queue that ran dry less than its linger ago is claimed
        from again ``LINGER`` later instead (see the module's docstring)."""
        delivery = self._delivery
        found = False
        now = monotonic()
        for queue in list(delivery.consumers):
            if queue in delivery.ready or queue in self._waiting or queue in self._lingering:
                continue
            if linger:
                if queue not in delivery.emptied:  # its last claim gave messages
                    self._dry_since[queue] = now
                dry_since = self._dry_since.get(queue)
                if dry_since is not None and now - dry_since < self._linger.get(queue, LINGER):
                    self._lingering.add(queue)
                    if self._linger_timer is None:
                        self._linger_timer = self.loop.call_later(LINGER, self._linger_over)
                    continue
                self._dry_since.pop(queue, None)
                self._waited_since[queue] = now
            listener = self._listener
            hand_off = None
            if delivery.takes_hand_offs(queue):
                token = self._tokens[queue] = uuid.uuid4()
                hand_off = (self._settlements.worker_id, self._settlements.lease, token)
            else:
                self._tokens.pop(queue, None)
            if self._store.wait(queue, self._waiter, listener.waiter_channel,
                                listener.session_lock, hand_off):
                delivery.ready.add(queue)
                found = True
            self._waiting.add(queue)
        return found

    def _linger_over(self) -> None:
        self._linger_timer = None
        self._delivery.ready |= self._lingering
        self._lingering.clear()
        self.kick()

    def relisten(self) -> None:
        """The LISTEN session was lost: a fresh one (or the one another
        transport of the process opened meanwhile), and every queue polled.
        Raises when the database cannot be reached: the consumer then
        restarts."""
        loop = self.loop
        if loop is not None and self._listen_fd is not None:
            loop.remove_reader(self._listen_fd)
            self._listen_fd = None
        self._listener.reconnect()
        self._relistened()

    def _check_session(self) -> None:
        if self._listener.reconnected():
            self._relistened()

    def _relistened(self) -> None:
        """The process's LISTEN session is a new one: notifications sent
        meanwhile are lost (and the publishes that sent them took this
        consumer's waiter records): poll every queue."""
        loop = self.loop
        if loop is not None:
            if self._listen_fd is not None:
                loop.remove_reader(self._listen_fd)  # closed already: the hub ignores it
            self._listen_fd = self._listener.fileno()
            loop.add_reader(self._listen_fd, self._on_readable)
        self._waiting.clear()
        # Rows handed on the lost session, their notifications lost: back now.
        tokens, self._tokens = list(self._tokens.values()), {}
        self._give_back(tokens)
        self._delivery.ready |= set(self._delivery.consumers)
        log.info("listening again after a lost connection")

    def _deliver_one(self) -> None:
        # One message per hub iteration: between two, Celery sees a shutdown
        # request and runs what the last message scheduled.
        if self._delivery.deliver_ready(most=1) and self._tokens:
            self._withdraw_offers()
        if self._wait_on_empty(linger=True) or self._delivery.buffers:
            self.kick()
        elif self._settlements.acks_waiting and self._tokens:
            # Waiting to be handed messages: no claim will carry the acks.
            self._settlements.flush_acks()
        elif self._settlements.acks_waiting and self._ack_timer is None:
            # Idle for now: the acks wait a moment for the next claim to take them.
            self._ack_timer = self.loop.call_later(ACK_WAIT, self._flush_acks_later)

    def _flush_acks_later(self) -> None:
        self._ack_timer = None
        self._settlements.flush_acks()

    def _on_tick(self) -> None:
        if self._delivery.ready and not self._kicked and self._delivery.deliverable():
            self.kick()

    def _safety_poll(self) -> None:
        self._settlements.flush_acks()
        self._check_session()
        self._listener.check_notifications()
        ready = self._delivery.ready
        idle = [queue for queue in self._delivery.consumers if queue not in ready]
        if idle:
            ready.update(self._store.probe(idle))

    # The client path --------------------------------------------------------------

    def drain(self, timeout: float | None = None) -> None:
        """Deliver what is ready, waiting up to ``timeout`` for something to
        be (``TimeoutError`` then)."""
        delivery = self._delivery
        deadline = None if timeout is None else monotonic() + timeout
        self._listener.connect()
        self._check_session()
        while True:
            if (delivery.ready or delivery.buffers) and delivery.deliver_ready():
                if self._tokens:
                    self._withdraw_offers()
                return
            self._listener.check_notifications()
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError()
            if self._wait_on_empty():
                continue
            wait = self.polling_interval if remaining is None else min(remaining, self.polling_interval)
            try:
                notified = self._listener.wait(wait)
            except CONNECTION_ERRORS:
                self.relisten()
                notified = set()
            self._check_session()
            handed = self._listener.take_handed()
            if handed:
                self._handed(handed)
            if notified:
                self._notified(notified)
            elif not handed:
                delivery.ready |= set(delivery.consumers)

    def forget_after_fork(self) -> None:
        """In a forked child: the hub, its pipe and its timers are the parent's
        (see :mod:`pg_broker.forking`)."""
        self.loop = None
        self._poll_timer = None
        self._listen_fd = None
        self._ack_timer = None
        self._wake_fds = None
        self._kicked = False
        self._waiter = uuid.uuid4()
        self._waiting.clear()
        self._tokens.clear()
        self._lingering.clear()
        self._linger_timer = None
        self._linger.clear()
        self._dry_since.clear()
        self._waited_since.clear()
