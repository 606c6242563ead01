"""Lease renewal and the consumer's share of broker maintenance.

A claimed row stays invisible to other workers until its lease ends. The
:class:`LeaseKeeper` thread renews the lease of every row its transport holds
(prefetched messages, running tasks, ETA/countdown tasks Celery keeps unacked
in memory) every ``lease / 3`` seconds, so a hub blocked by a long task in the
solo pool does not stop renewal. It runs its statements through the transport's
store (:mod:`.store`), on the transport's work connection (psycopg
connections are thread-safe; the statements are short): a worker needs one
connection less.

The same thread registers the queues its transport consumes, and renews
those registrations every ``lease / 3`` seconds, idle or busy, so that
``pg-broker status`` and Flower show live consumers (``broker_consumers``,
migrations/core/150; a consumer that died expires after ``lease`` seconds),
keeps the consumed queues that have an expiry (``x-expires``:
Celery's remote-control and event queues) alive, and runs the maintenance
every live consumer shares: it returns expired leases of dead workers to
``pending`` (``reclaim_stale_tasks()``) and drops expired queues and transient
messages. All of it is safe to run from any number of processes at once. It
also deletes finished rows past their retention windows
(:class:`pg_broker.maintenance.Retention`, the transport options
``*_retention``; with ``partitioned_history`` it moves finished jobs' rows
to the day-partitioned history instead), so ``job_tasks`` stays bounded
without beat or any setting;
that one runs in one worker at a time (an advisory lock, tried, never waited
for), a batch per turn of the loop.

It also sends the settlements (acks, requeues, fails) its transport could not
send on the spot because the connection was lost: woken at once, it retries
them on a fresh connection, backing off (``SETTLE_BACKOFF_MIN`` doubling up
to ``SETTLE_BACKOFF_MAX``) while the database stays unreachable. Their lease
tokens stay valid meanwhile (the thread goes on renewing those leases), so a
database blip delays a settlement by the outage, not by a lease. A transport
closed while it still holds rows (Celery's running tasks outlive a consumer
restart) keeps the thread until every one of them is settled.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import psycopg

from pg_broker import forking
from pg_broker.masking import first_line

if TYPE_CHECKING:
    from pg_broker.maintenance import Retention

    from .store import Store

log = logging.getLogger(__name__)

# The thread looks at least this often (seconds) whether a newly consumed
# expiring queue needs its first touch.
KEEP_ALIVE_CHECK = 1.0
# Seconds between attempts to send settlements while the database is
# unreachable: the first retry, and the most it backs off to.
SETTLE_BACKOFF_MIN = 0.1
SETTLE_BACKOFF_MAX = 5.0
# A snapshot open this long (seconds) when a worker's vacuum of job_tasks
# ends keeps what died since it began; then the next vacuum waits
# VACUUM_RETRY_MIN, doubling up to VACUUM_RETRY_MAX while it stays open.
VACUUM_OLD_SNAPSHOT = 60.0
VACUUM_RETRY_MIN = 60.0
VACUUM_RETRY_MAX = 600.0


class LeaseKeeper:
    """Renews the leases of held rows from a background thread."""

    def __init__(
        self,
        store: Store,
        lease: float,
        maintenance_interval: float,
        retention: Retention,
        vacuum_threshold: int = 0,
        settle: Callable[[], None] = lambda: None,
        finished: Callable[[], bool] = lambda: False,
        reconnect: Callable[[], None] = lambda: None,
        worker_id: Callable[[], str] = lambda: "",
    ) -> None:
        """``store`` runs the statements (on the transport's work connection);
        ``retention`` is the cleanup of finished rows the maintenance runs;
        ``vacuum_threshold`` the dead row versions of job_tasks past which it
        vacuums the table (0: never);
        ``settle`` sends the deferred settlements (raising psycopg.Error when
        it cannot); ``finished`` says the thread may end (closed, nothing
        held); ``reconnect`` drops the work connection (the next statement
        opens a new session); ``worker_id`` names this process as its claims
        do (the consumer registrations' owner)."""
        self._store = store
        self._worker_id = worker_id
        self._settle = settle
        self._finished = finished
        self._reconnect = reconnect
        self.lease = lease
        self.interval = max(lease / 3.0, 0.05)
        self.maintenance_interval = maintenance_interval
        self.retention = retention
        self.vacuum_threshold = vacuum_threshold
        self._next_vacuum = 0.0  # monotonic time before which no vacuum is tried
        self._vacuum_retry = 0.0  # the wait after a vacuum an old snapshot defeated
        self._held: dict[int, uuid.UUID] = {}
        self._expiring: dict[str, float] = {}  # consumed queue -> x-expires seconds
        self._consumed: set[str] = set()
        self._register_soon = False
        # Only workers (consumers of durable queues with acks) run maintenance:
        # monitors and clients (Flower, celery inspect) leave it to them.
        self.maintaining = False
        self._touch_soon = False
        self._lock = threading.RLock()  # finished() may ask held() while it is taken
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        forking.forget_in_child(self)

    # Called by the consuming threads -------------------------------------

    def hold(self, row_id: int, token: uuid.UUID) -> None:
        with self._lock:
            self._held[row_id] = token

    def release(self, row_ids) -> None:
        with self._lock:
            for row_id in row_ids:
                self._held.pop(row_id, None)

    def keep_alive(self, queue: str, expires: float) -> None:
        """Touch ``queue`` every third of its expiry while it is consumed."""
        with self._lock:
            self._expiring[queue] = expires
            self._touch_soon = True

    def consume(self, queue: str) -> None:
        """Register this process as a consumer of ``queue`` (within KEEP_ALIVE_CHECK)."""
        with self._lock:
            self._consumed.add(queue)
            self._register_soon = True

    def stop_consuming(self, queue: str) -> None:
        """No more renewals of ``queue``'s registration (its channel deletes it)."""
        with self._lock:
            self._consumed.discard(queue)

    def let_expire(self, queue: str) -> None:
        with self._lock:
            self._expiring.pop(queue, None)

    def held(self) -> dict[int, uuid.UUID]:
        with self._lock:
            return dict(self._held)

    def settle_soon(self) -> None:
        """Wake the thread: settlements wait to be sent."""
        self._wake.set()

    def stop_maintaining(self) -> None:
        """The transport closed: only its held rows still need the thread."""
        with self._lock:
            self.maintaining = False
            self._expiring.clear()
            self._consumed.clear()

    def start(self, maintain: bool = False) -> None:
        """Run the thread; ``maintain`` (a worker consuming with acks) adds the maintenance."""
        with self._lock:
            self.maintaining = self.maintaining or maintain
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping.clear()
            self._thread = threading.Thread(
                target=self._run, name="pg_broker-leases", daemon=True
            )
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def forget_after_fork(self) -> None:
        """In a forked child: the thread did not survive, the rows are the
        parent's (see :mod:`pg_broker.forking`)."""
        self._thread = None
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._held.clear()
        self._expiring.clear()
        self._consumed.clear()
        self.maintaining = False

    # The thread ----------------------------------------------------------

    def _run(self) -> None:
        now = time.monotonic()
        next_renewal = now + self.interval
        next_touch = now
        next_registration = now
        next_maintenance = now
        next_cleanup = now
        next_settle = now
        settling = False  # settlements wait to be sent
        backoff = 0.0
        while True:
            due = min(next_renewal, next_touch, next_registration, next_maintenance, next_cleanup)
            if settling:
                due = min(due, next_settle)
            if self._wake.wait(min(max(due - time.monotonic(), 0), KEEP_ALIVE_CHECK)):
                self._wake.clear()
                settling = True
            if self._stopping.is_set():
                return
            now = time.monotonic()
            if settling and now >= next_settle:
                try:
                    self._settle()
                    settling, backoff = False, 0.0
                except psycopg.Error as exc:
                    backoff = min(max(backoff * 2, SETTLE_BACKOFF_MIN), SETTLE_BACKOFF_MAX)
                    next_settle = now + backoff
                    log.warning("could not settle messages (%s); retrying in %.1f s",
                                first_line(exc), backoff)
                    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
                        self._reconnect()  # a read-only session stays so: retry on a new one
            if self._touch_soon:
                self._touch_soon = False
                next_touch = now
            if self._register_soon:
                self._register_soon = False
                next_registration = now
            try:
                if now >= next_renewal:
                    next_renewal = now + self.interval
                    self.renew()
                if now >= next_touch:
                    next_touch = now + self.touch()
                if now >= next_registration:
                    next_registration = now + self.interval
                    self.register()
                if now >= next_maintenance:
                    next_maintenance = now + self.maintenance_interval
                    if self.maintaining:
                        self.maintain()
                if now >= next_cleanup:
                    # A full batch: the next one right after this turn of the
                    # loop (renewals stay on time between batches).
                    more = self.maintaining and self.clean_up()
                    next_cleanup = now + (0 if more else self.maintenance_interval)
            except psycopg.errors.ReadOnlySqlTransaction as exc:
                # The session stays read-only even once the database is writable
                # again: the next statement runs on a new one.
                log.warning("lease renewal or maintenance refused (%s); reconnecting",
                            first_line(exc))
                self._reconnect()
            except psycopg.Error as exc:
                # The work connection reconnects on the next use.
                log.warning("lease renewal or maintenance failed, retrying: %s", first_line(exc))
            if not settling:
                with self._lock:  # start() cannot slip in between
                    if self._finished():
                        if self._thread is threading.current_thread():
                            self._thread = None
                        return

    def renew(self) -> int:
        """Extend every held lease now; forget (and report) leases lost."""
        held = self.held()
        if not held:
            return 0
        ids = list(held)
        renewed = set(self._store.renew_leases(held, timedelta(seconds=self.lease)))
        with self._lock:
            lost = [i for i in ids if i not in renewed and self._held.get(i) == held[i]]
            for row_id in lost:
                del self._held[row_id]
        for row_id in lost:
            log.warning(
                "lease lost on job_tasks row %s: another worker may run it; "
                "its ack from this worker will be refused", row_id,
            )
        return len(renewed)

    def touch(self) -> float:
        """Mark the expiring consumed queues used; seconds until the next touch."""
        with self._lock:
            expiring = dict(self._expiring)
        if not expiring:
            return KEEP_ALIVE_CHECK
        self._store.touch_queues(list(expiring))
        return max(min(expiring.values()) / 3.0, 0.05)

    def register(self) -> None:
        """Register (or renew) this process as the consumer of its queues."""
        with self._lock:
            queues = sorted(self._consumed)
        if queues:
            self._store.register_consumers(queues, self._worker_id(),
                                           timedelta(seconds=self.lease))

    def maintain(self) -> None:
        reclaimed, dropped = self._store.maintain()
        if reclaimed:
            log.info("reclaimed %d task(s) whose lease expired", reclaimed)
        if dropped:
            log.info("dropped %d queue(s) unused past their expiry", dropped)
        if self.vacuum_threshold and time.monotonic() >= self._next_vacuum:
            self.vacuum()

    def vacuum(self) -> None:
        """VACUUM job_tasks past ``vacuum_threshold`` dead row versions. While
        a snapshot older than VACUUM_OLD_SNAPSHOT is open in the database,
        the rows that died since it began stay whatever vacuums, so the next
        attempt waits, doubling from VACUUM_RETRY_MIN to VACUUM_RETRY_MAX.
        (The dead-row count after a vacuum cannot tell: under a steady
        stream of tasks it is past the threshold again within a second.)"""
        oldest = self._store.vacuum(self.vacuum_threshold)
        if oldest is None:
            return
        if oldest < VACUUM_OLD_SNAPSHOT:
            self._vacuum_retry = 0.0
            log.info("vacuumed job_tasks (over %d dead row versions)", self.vacuum_threshold)
            return
        self._vacuum_retry = min(max(self._vacuum_retry * 2, VACUUM_RETRY_MIN), VACUUM_RETRY_MAX)
        self._next_vacuum = time.monotonic() + self._vacuum_retry
        log.warning("vacuumed job_tasks, but a transaction or snapshot open for %.0f s keeps "
                    "the rows that died since it began; next vacuum in %.0f s",
                    oldest, self._vacuum_retry)

    def clean_up(self) -> bool:
        """One batch of the cleanup of finished rows, unless another worker is
        at it; whether more rows are waiting."""
        deleted = self._store.delete_finished(self.retention)
        if deleted[0] is None:
            return False
        if any(deleted):
            log.debug("deleted finished rows: %d completed, %d failed or dead, %d of jobs",
                      *deleted)
        if not self.retention.partitioned:
            return self.retention.full(deleted)
        moved, dropped = self._store.move_to_history(self.retention)
        if moved or dropped:
            log.debug("partitioned history: %s row(s) moved, %s partition(s) dropped",
                      moved, dropped)
        return self.retention.full([*deleted, moved])

