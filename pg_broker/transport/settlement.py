"""Held rows: claimed, kept under lease, settled.

A consumer claims rows under a lease token and settles each one (ack,
requeue, fail, bury), fenced by that token, so sending a settlement twice is
harmless: the second is refused. :class:`Settlements` is where that happens:

- **Ack batching.** Under a worker's hub, acks wait and go out in the
  statement of the next claim (``transport_claim`` acks and claims in one),
  or on their own once the hub is idle for ``ACK_WAIT`` (:mod:`.poller` runs
  that timer). Without a hub (``drain_events``) an ack goes at once. A crash
  in between redelivers those messages (at-least-once, as with every broker).
- **Nothing lost to a lost connection.** A session lost while sending costs
  a retry on a fresh connection (:class:`.connections.WorkConnection`); when
  the database cannot be reached at all, the settlement waits in memory and
  the lease thread (:class:`.leases.LeaseKeeper`, owned here) sends it as
  soon as it can, renewing the lease meanwhile. A closed transport leaves
  every settlement to that thread: it must never block the hub that calls it.
- **Deliveries that outlive their channel.** A task still running in
  Celery's pool when its channel closed keeps its row held (``keep``) until
  Celery settles it; a process that exits first requeues it, counted
  (``settle_before_exit``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable
from time import monotonic, sleep

import psycopg

from pg_broker import forking
from pg_broker.maintenance import Retention
from pg_broker.masking import first_line

from .connections import CONNECTION_ERRORS
from .leases import SETTLE_BACKOFF_MAX, SETTLE_BACKOFF_MIN, LeaseKeeper
from .options import Options
from .store import Claimed, Held, Store

log = logging.getLogger(__name__)

# Under a hub, how long (seconds) acks may wait for the next claim to carry
# them before they go out on their own.
ACK_WAIT = 0.02
# The workers' cleanup of finished rows: rows of each kind per statement (a
# batch shares the work connection with claims: keep it short), and the
# advisory lock that lets one worker at a time run it.
CLEANUP_BATCH = 500
CLEANUP_LOCK_KEY = 7_283_640_112


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Settlements:
    """The rows a transport holds, and how each is settled."""

    def __init__(self, store: Store, options: Options, finished: Callable[[], bool],
                 reconnect: Callable[[], None]) -> None:
        """``finished`` says the lease thread may end (the transport closed,
        nothing held) and closes the work connection; ``reconnect`` drops the
        work connection (a read-only session)."""
        self.store = store
        self.lease = options.lease
        self.retry_backoff = options.retry_backoff
        # A plain message's row leaves at its ack (completed_retention 0).
        self.delete_acked = not options.completed_retention
        self.leases = LeaseKeeper(
            store, options.lease.total_seconds(), options.maintenance_interval,
            Retention(completed=options.completed_retention, failed=options.failed_retention,
                      job=options.job_retention, batch_size=CLEANUP_BATCH,
                      lock=CLEANUP_LOCK_KEY, partitioned=options.partitioned_history),
            vacuum_threshold=options.vacuum_threshold,
            settle=self.send_waiting, finished=finished, reconnect=reconnect,
            worker_id=lambda: self.worker_id,
        )
        # The transport closed: every settlement goes through the lease thread.
        self.closed = False
        # Acked by Celery, not yet by the database (see ack()).
        self._acks: deque[Held] = deque()
        # Requeues, fails and burials a lost connection kept from being sent:
        # (action, rows, refund, error).
        self._deferred: deque[tuple[str, list[Held], int, str | None]] = deque()
        # Running in Celery's pool when their channel closed: delivery tag -> row
        # (see QoS.restore_unacked).
        self._kept: dict[str, Held] = {}
        self._settling = threading.Lock()
        # Under a hub: wakes it, to send the acks with its next claim.
        self._wake: Callable[[], None] | None = None
        self.worker_id = _worker_id()
        forking.forget_in_child(self)

    def attach(self, wake: Callable[[], None]) -> None:
        """A hub runs the transport: acks wait for its next claim (``wake`` it)."""
        self._wake = wake

    def detach(self) -> None:
        self._wake = None

    @property
    def acks_waiting(self) -> bool:
        return bool(self._acks)

    def idle(self) -> bool:
        """Nothing held, nothing waiting to be sent."""
        return not (self._acks or self._deferred or self.leases.held())

    # Acks and claims ------------------------------------------------------------

    def ack(self, held: Held) -> None:
        """Ack a held row: at once, or with the next claim when a hub runs us."""
        if self.closed:
            self._acks.append(held)
            self.leave_to_lease_thread()
        elif self._wake is not None:
            self._acks.append(held)
            self._wake()
        else:
            self._ack_now([held])

    def _take_acks(self) -> list[Held]:
        batch = []
        while self._acks:
            batch.append(self._acks.popleft())
        return batch

    def flush_acks(self) -> None:
        """Send the acks waiting; the lease thread does if the database cannot be reached."""
        batch = self._take_acks()
        if batch:
            self._ack_now(batch)

    def _ack_now(self, acks: list[Held]) -> None:
        try:
            self.ack_and_claim(acks)
        except CONNECTION_ERRORS as exc:
            self._acks.extend(acks)
            self.leave_to_lease_thread(exc)

    def claim(self, queue: str, limit: int) -> tuple[list[Claimed], uuid.UUID]:
        """Claim up to ``limit`` rows of ``queue``; the acks waiting ride along
        in the same statement (and wait on if it fails)."""
        acks = self._take_acks()
        try:
            return self.ack_and_claim(acks, queue, limit)
        except BaseException:
            self._acks.extendleft(reversed(acks))
            raise

    def ack_and_claim(self, acks: list[Held], queue: str = "",
                      limit: int = 0) -> tuple[list[Claimed], uuid.UUID]:
        """Ack held rows and claim up to ``limit`` rows of ``queue``: one statement.

        Returns the rows claimed and the lease token they were claimed under.
        """
        token = uuid.uuid4()
        rows = self.store.ack_and_claim(acks, self.worker_id, token, self.lease, queue, limit,
                                        self.delete_acked)
        self.leases.release(row_id for row_id, _ in acks)
        self._refused(acks, {row.id for row in rows if not row.claimed}, "ack")
        return [row for row in rows if row.claimed], token

    # Requeue, fail, bury ------------------------------------------------------------

    def settle(self, action: str, held: list[Held], refund: int = 0,
               error: str | None = None) -> None:
        """Requeue, fail or bury held rows (``action``), fenced by their lease tokens.

        ``refund`` 1 un-counts the delivery of a requeued row that never
        started; ``error`` is the reason kept on the row. Sent now, or by the
        lease thread once the database can be reached.
        """
        if not self.closed:
            try:
                self._settle_now(action, held, refund, error)
                return
            except CONNECTION_ERRORS as exc:
                self._deferred.append((action, held, refund, error))
                self.leave_to_lease_thread(exc)
                return
        self._deferred.append((action, held, refund, error))
        self.leave_to_lease_thread()

    def _settle_now(self, action: str, held: list[Held], refund: int,
                    error: str | None) -> None:
        if action == "requeue":
            settled = set(self.store.requeue(held, refund, error))
        elif action == "fail":
            settled = {row.id for row in self.store.fail(held, self.retry_backoff)
                       if row.status is not None}
        else:
            settled = set(self.store.bury(held, error))
        self.leases.release(row_id for row_id, _ in held)
        self._refused(held, settled, action)

    def give_back(self, tokens: list[uuid.UUID]) -> None:
        """Rows handed to this consumer under ``tokens`` and not taken: back
        to pending at once, un-counted (migrations/core/220). When the
        database cannot be told, their leases expire and reclaim_stale_tasks
        returns them, un-counted too."""
        try:
            given = self.store.give_back(self.worker_id, tokens)
        except CONNECTION_ERRORS as exc:
            log.warning("could not give back %d handed message(s) (%s); they return when "
                        "their leases expire", len(tokens), first_line(exc))
            return
        if given:
            log.debug("gave back handed job_tasks row(s) %s", given)

    def bury(self, row_id: int, token: uuid.UUID, problem: str) -> None:
        log.error("job_tasks row %s is not a Kombu message (%s): marked dead", row_id, problem)
        self.settle("bury", [(row_id, token)], error=f"malformed message: {problem}")

    def _refused(self, held: list[Held], settled: set[int], action: str) -> None:
        for row_id, token in held:
            if row_id not in settled:
                log.warning(
                    "lease lost: job_tasks row %s is no longer held by lease %s "
                    "(it expired and the message moved on); %s refused",
                    row_id, token, action,
                )

    # Later, from the lease thread -------------------------------------------------------

    def _waiting(self) -> int:
        return len(self._acks) + sum(len(held) for _, held, _, _ in self._deferred)

    def leave_to_lease_thread(self, exc: BaseException | None = None) -> None:
        """Leave what waits (acks, deferred settlements) to the lease thread."""
        if exc is not None:
            log.warning(
                "could not settle %d message(s) now (%s); the lease thread retries on a "
                "fresh connection, renewing their leases meanwhile",
                self._waiting(), first_line(exc),
            )
        self.leases.start()
        self.leases.settle_soon()

    def send_waiting(self) -> None:
        """Send every settlement waiting (the lease thread, and at exit);
        raises psycopg.Error when the database cannot be reached."""
        with self._settling:
            acks = self._take_acks()
            if acks:
                try:
                    self.ack_and_claim(acks)
                except BaseException:
                    self._acks.extendleft(reversed(acks))
                    raise
            while self._deferred:
                self._settle_now(*self._deferred[0])
                self._deferred.popleft()

    # Deliveries that outlive their channel ----------------------------------------------

    def keep(self, tag: str, held: Held) -> None:
        """A delivery still running after its channel closed: its row stays
        held (the lease thread renews it) until Celery settles it."""
        self._kept[tag] = held

    def unkeep(self, tag: str) -> bool:
        """Whether ``tag`` was kept (it is not any more)."""
        return self._kept.pop(tag, None) is not None

    def settle_before_exit(self, timeout: float) -> None:
        """Before the process exits: send what waits, and requeue the rows of
        deliveries still running (counted: they started)."""
        kept = list(self._kept.values())
        self._kept.clear()
        if kept:
            self._deferred.append(("requeue", kept, 0, "the worker process exited while it ran"))
        deadline = monotonic() + timeout
        backoff = SETTLE_BACKOFF_MIN
        while self._acks or self._deferred:
            try:
                self.send_waiting()
            except psycopg.Error as exc:
                if monotonic() + backoff > deadline:
                    log.error(
                        "could not settle %d message(s) before exiting (%s); they come back "
                        "when their leases expire",
                        self._waiting(), first_line(exc),
                    )
                    return
                sleep(backoff)
                backoff = min(backoff * 2, SETTLE_BACKOFF_MAX)

    def forget_after_fork(self) -> None:
        """In a forked child: the rows are the parent's to settle (see :mod:`pg_broker.forking`)."""
        self._acks.clear()
        self._deferred.clear()
        self._kept.clear()
        self._wake = None
        # A lock another thread held at the fork stays taken in the child.
        self._settling = threading.Lock()
        self.worker_id = _worker_id()
