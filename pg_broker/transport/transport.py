"""The Kombu transport ``pgbroker://``: a Celery broker over PostgreSQL.

:class:`Transport` keeps the connection life cycle: it reads its options
(:mod:`.options`), opens nothing until asked, and owns the connections a
process's transport has — the work connection every statement runs on (one per
process and database, shared by its transports)
(:mod:`.connections`, through the store :mod:`.store`), its channels on the
LISTEN session (one per process and database too, :mod:`.listener`) and the
shared publish pipeline
(:mod:`.pipeline`) — from ``establish_connection`` to ``close_connection``,
and what a forked child must forget of them (:mod:`pg_broker.forking`).
The rest it wires together and leaves to its parts:

- ``Channel``/``QoS`` (:mod:`.channel`): kombu's interface, publishing;
- :mod:`.delivery`: consumed queues, claimed messages, the consumer callback;
- :mod:`.settlement`: held rows, ack batching, settlements deferred by an
  outage, and the lease thread (:mod:`.leases`);
- :mod:`.poller`: the worker's hub (readers, kick, safety poll) and
  ``drain_events``.

No message may stop a consumer: a row that is no Kombu message is dead at
claim (``messages.malformed``), a delivery whose consumer raised is requeued
and counted (``Delivery.deliver``), and a delivery counts as soon as it
started, whatever killed the worker (``QoS.restore_unacked``). No lost
connection may cost a lease: a lost session is replaced on the spot
(``WorkConnection.execute``, ``Poller.relisten``), and what could not be
settled meanwhile is settled on a fresh connection by the lease thread.
"""

from __future__ import annotations

import atexit
import logging
import weakref

import psycopg
from kombu.transport import virtual

from pg_broker import forking
from pg_broker.database import session_defaults
from pg_broker.migrate import ensure_migrated
from pg_broker.urls import SCHEME, libpq_url, masked_url

from .channel import Channel
from .connections import CONNECT_DEFAULTS, CONNECTION_ERRORS, conninfo, shared_work
from .delivery import Delivery
from .listener import Listener
from .options import DEFAULT_POLLING_INTERVAL, from_transport_options
from .pipeline import Pipeline, shared
from .poller import Poller
from .settlement import Settlements
from .store import PUBLISH, Store

log = logging.getLogger(__name__)

# How long closing a transport waits for the confirms of pipelined publishes.
CONFIRM_AT_CLOSE = 10.0
# How long a process about to exit tries to send the settlements still waiting.
SETTLE_AT_EXIT = 10.0

# Every live transport, for the settlements at exit. Weak: this is no cache.
_transports: weakref.WeakSet[Transport] = weakref.WeakSet()


class Transport(virtual.Transport):
    """``pgbroker://``: a Celery broker over PostgreSQL.

    Transport options (``broker_transport_options``): see
    :class:`.options.Options` (lease_seconds, polling_interval, linger_max, hand_off,
    maintenance_interval, claim_batch_max, confirm_publish,
    synchronous_commit, max_message_size, retry_backoff, response_timeout,
    migrate, prepared_statements, listen_url, completed_retention, failed_retention,
    job_retention, partitioned_history, vacuum_threshold).
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

    # A read-only database is a connection error too (see .connections).
    connection_errors = CONNECTION_ERRORS
    channel_errors = virtual.Transport.channel_errors + (
        psycopg.DataError,
        psycopg.IntegrityError,
        psycopg.ProgrammingError,
    )
    recoverable_connection_errors = connection_errors
    recoverable_channel_errors = ()

    def __init__(self, client, **kwargs) -> None:
        super().__init__(client, **kwargs)
        self.conninfo = conninfo(client)
        self.options = options = from_transport_options(client.transport_options)
        self.polling_interval = options.polling_interval
        self.connect_kwargs = self._connect_kwargs(self.conninfo)
        self.work = shared_work(self.conninfo, self.connect_kwargs, options.response_timeout)
        self.store = Store(self.work)
        self.settlements = Settlements(self.store, options, finished=self._finished_settling,
                                       reconnect=self.work.drop)
        self.leases = self.settlements.leases
        self.listen_conninfo = libpq_url(options.listen_url) if options.listen_url else self.conninfo
        self._listener = Listener(self.listen_conninfo, self._connect_kwargs(self.listen_conninfo),
                                  options.response_timeout, notify=self.store.notify)
        # kombu's Transport._deliver hands a message to its queue's consumer.
        self.delivery = Delivery(self._deliver, self._listener, self.settlements)
        self.poller = Poller(self._listener, self.delivery, self.settlements, self.store,
                             options.polling_interval, options.linger_max)
        self._pipeline: Pipeline | None = None
        _transports.add(self)
        forking.forget_in_child(self)

    # Connections ------------------------------------------------------------

    def _connect_kwargs(self, conninfo: str) -> dict:
        """psycopg.connect's keyword arguments for a connection to ``conninfo``."""
        kwargs = session_defaults(conninfo, CONNECT_DEFAULTS)
        if not self.options.prepared_statements:
            kwargs["prepare_threshold"] = None  # psycopg's, and the publish's (.store.Prepared)
        return kwargs

    @property
    def conn(self) -> psycopg.Connection:
        """The work connection (autocommit), reopened when it was lost."""
        return self.work.conn

    @property
    def pipeline(self) -> Pipeline:
        """Pipelined publishes and rationed notifications (one per process and
        database, shared with the other connections); connects when first needed."""
        if self._pipeline is None or self._pipeline.closed:
            self._pipeline = shared(self.conninfo, self.connect_kwargs, PUBLISH)
        return self._pipeline

    def establish_connection(self):
        self.settlements.closed = False
        if self.options.migrate:
            ensure_migrated(self.conninfo)
        self.work.use(self)
        self.work.conn  # noqa: B018 - connect now, so an unreachable database fails here
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
        settlements = self.settlements
        try:
            settlements.flush_acks()
            super().close_connection(connection)
        finally:
            settlements.closed = True
            self.poller.unregister()
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
                settlements.leave_to_lease_thread()

    def _finished_settling(self) -> bool:
        """Closed and nothing held: the work connection goes (the lease thread asks)."""
        if not self.settlements.closed or not self.settlements.idle():
            return False
        self.work.leave(self)
        return True

    def _collect(self, connection) -> None:
        """kombu's pool cleanup (after a fork too: what the child inherited
        was forgotten at the fork, see :meth:`forget_after_fork`)."""
        self.close_connection(connection)

    def forget_after_fork(self) -> None:
        """In a forked child: the pipeline is the parent's (its connection,
        and those of this transport's parts, are disowned by their owners'
        own forget-callbacks, see :mod:`pg_broker.forking`)."""
        self._pipeline = None

    def verify_connection(self, connection) -> bool:
        return self.work.open

    def driver_version(self) -> str:
        return psycopg.__version__

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        uri = uri if "://" in (uri or "") else f"{SCHEME}://{uri or ''}"
        return uri if include_password else masked_url(uri, mask)

    # Waiting for messages (see .poller) ------------------------------------------------

    def drain_events(self, connection, timeout=None):
        """The client path (``celery inspect``, Flower, plain kombu consumers)."""
        self.poller.drain(timeout)

    def register_with_event_loop(self, connection, loop) -> None:
        self.poller.register(loop)

    def unregister_from_event_loop(self, connection, loop) -> None:
        self.poller.unregister()


@atexit.register
def _settle_at_exit() -> None:
    for transport in list(_transports):
        transport.settlements.settle_before_exit(SETTLE_AT_EXIT)
