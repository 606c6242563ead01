"""The transport's options (``broker_transport_options``), read once.

Every option the transport understands is a field of :class:`Options`, with
its default and its meaning; :func:`from_transport_options` reads them from
a kombu client's ``transport_options`` (values may come as text, from a URL
or an environment variable). The README's table of transport options says
the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from pg_broker.database import configured_listen_url
from pg_broker.maintenance import default_partitioned

DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_POLLING_INTERVAL = 1.0
# Seconds: one more claim LINGER (5 ms) after running dry, then wait (see
# linger_max below for why longer is not the default).
DEFAULT_LINGER_MAX = 0.005
DEFAULT_MAINTENANCE_INTERVAL = 10.0
DEFAULT_CLAIM_BATCH_MAX = 100
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
DEFAULT_RETRY_BACKOFF_SECONDS = 10.0
DEFAULT_RESPONSE_TIMEOUT = 20.0
# Retention windows (seconds): a plain message's row leaves at its ack; one
# that failed, died or was cancelled stays a week for `pg-broker dead list`
# and `dead retry`; a job's rows stay a week after their job finished.
DEFAULT_COMPLETED_RETENTION = 0.0
DEFAULT_FAILED_RETENTION = 7 * 24 * 3600.0
DEFAULT_JOB_RETENTION = 7 * 24 * 3600.0
DEFAULT_VACUUM_THRESHOLD = 10_000


@dataclass(frozen=True, slots=True)
class Options:
    """Transport options (``broker_transport_options``):

    ``lease_seconds`` (60)
        How long a claimed message stays invisible to other workers without
        renewal; renewed every third of it while the worker holds it.
    ``polling_interval`` (1.0)
        Seconds between safety polls (notifications do the real work).
    ``linger_max`` (0.005)
        The longest a worker keeps claiming, every 5 ms, from a queue that
        ran dry before it waits to be notified (:mod:`.poller`): the linger
        grows towards it while the worker's waits end within it (a steady
        producer), and shrinks after longer waits. A notification wakes
        every listening session of the database (PostgreSQL up to 18); an
        empty claim is one index probe. The default, one more claim after
        5 ms, keeps an idle worker's publish -> start latency; 0.04 stops a
        worker that keeps pace with a steady producer from costing
        notifications (paced, 200 idle listeners: 0.004 instead of 0.023
        per task), but a message published while a worker lingers waits up
        to 5 ms for the next claim instead of 1-2 ms for its notification
        (idle-worker p50 5.4 instead of 3.6 ms in the benchmark, whose
        tasks come 10-30 ms apart: README *Many listeners*). For many
        listening sessions on PostgreSQL up to 18, where one notification
        costs the server milliseconds.
    ``hand_off`` (True)
        A worker that waits on an empty queue offers to be handed its next
        message: the publish stores the row already claimed for it and the
        notification carries it (the message itself when it fits in
        NOTIFY's 8,000 bytes), so the worker starts it with no claim round
        trip (migrations/core/220; README *Hand-off*). False: it is only
        woken, and claims. Plain messages only (a job's tasks are woken).
    ``maintenance_interval`` (10)
        Seconds between a consumer's runs of ``reclaim_stale_tasks()``, of
        the sweep of expired queues and transient messages, and of the
        cleanup of finished rows (one worker at a time: an advisory lock).
    ``completed_retention`` (0)
        Seconds a plain message's row (no job) stays in ``job_tasks`` after
        its ack; 0 deletes it in the ack's own statement, as Redis and
        RabbitMQ forget an acked message.
    ``failed_retention`` (604800: 7 days)
        Seconds a plain message that failed, died or was cancelled stays,
        for ``pg-broker dead list``, ``dead retry`` and whoever looks.
    ``job_retention`` (604800: 7 days)
        Seconds a job's finished rows stay after the job itself finished
        (its page lists them); rows of an unfinished job stay.
    ``partitioned_history`` (False; PG_BROKER_PARTITIONED_HISTORY)
        True: the cleanup moves a finished job's completed and cancelled
        rows from ``job_tasks`` into ``job_tasks_history``, partitioned by
        the day they may go (the job's end + ``job_retention``), and drops
        each day's partition once the day is over: no DELETE, no vacuum of
        them (migrations/core/180). Failed and dead rows stay for ``dead
        retry``. For apps that keep many jobs' rows (high volume).
    ``vacuum_threshold`` (10000)
        Dead row versions of ``job_tasks`` past which a worker's
        maintenance runs ``VACUUM job_tasks`` itself (on a connection of its
        own, skipped while another vacuum has the table), whatever the
        server's autovacuum does: it visits a database once per naptime (a
        minute), too seldom at hundreds of tasks/s. Every claim and ack
        leaves one; without any vacuum the table grows with every task.
        While another session holds a snapshot older than 60 s (what died
        since it began stays whatever vacuums), the next vacuum waits 60 s,
        doubling to 10 minutes. 0: never.
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
    ``visible_before_flush`` (False)
        A confirmed publish commits asynchronously, so a waiting worker
        claims and starts it at once, and then waits for its WAL flush in a
        second statement (``transport_flush``) before it returns: as durable
        for the producer, one WAL flush sooner for the task (a
        ``delay().get()`` round trip). Costs a second transaction per publish
        (an xid and ~110 bytes of WAL; measured +0.1-0.2 ms of producer and
        server CPU per publish on a loaded machine). A crash of the server
        within the flush can lose a message a worker already started; its
        producer gets an error and sends it again (at least once).
    ``max_message_size`` (64 MiB)
        Larger messages are refused at publish with a ChannelError.
    ``retry_backoff`` (10)
        Seconds before a rejected (failed) message is delivered again; doubles
        with each attempt (SQL ``fail_task``), at most one hour.
    ``prepared_statements`` (True)
        Whether the transport's connections use named prepared statements
        (the publish's, and psycopg's for statements run five times). False
        for a transaction-mode pooler that does not keep them per client
        (PgBouncer before 1.21 or without ``max_prepared_statements``,
        Supavisor on port 6543): every statement is then an unnamed one,
        parsed and planned each time. Without it, the first statement such
        a pooler loses turns them off for that connection, with a warning.
    ``listen_url`` (unset: ``PG_BROKER_LISTEN_URL``, else the broker URL)
        The database URL of the LISTEN connection (``postgresql://`` or
        ``pgbroker://``): the same database reached directly or through a
        session-mode pooler, when the broker URL goes through a
        transaction-mode pooler, which drops notifications. A listener that
        does not hear its own probe says so in the log (see
        :mod:`.listener`).
    ``migrate`` (True)
        Whether the transport applies pending migrations when it connects
        (checking costs one read and takes no lock when nothing is pending).
        False: it never does, for producers whose role may not change the
        schema or that should start with no DDL at all; run ``pg-broker
        migrate`` at deployment instead.
    ``response_timeout`` (20)
        Seconds a statement may wait for the database's reply before its
        connection is dropped and opened again (:mod:`.deadline`): a path that
        stops answering without closing is noticed. 0: wait for ever.
    """

    lease: timedelta = timedelta(seconds=DEFAULT_LEASE_SECONDS)
    polling_interval: float = DEFAULT_POLLING_INTERVAL
    linger_max: float = DEFAULT_LINGER_MAX
    hand_off: bool = True
    maintenance_interval: float = DEFAULT_MAINTENANCE_INTERVAL
    claim_batch_max: int = DEFAULT_CLAIM_BATCH_MAX
    confirm_publish: bool = True
    synchronous_commit: str | None = None
    visible_before_flush: bool = False
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    retry_backoff: timedelta = timedelta(seconds=DEFAULT_RETRY_BACKOFF_SECONDS)
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT
    migrate: bool = True
    prepared_statements: bool = True
    listen_url: str | None = None
    completed_retention: timedelta = timedelta(seconds=DEFAULT_COMPLETED_RETENTION)
    failed_retention: timedelta = timedelta(seconds=DEFAULT_FAILED_RETENTION)
    job_retention: timedelta = timedelta(seconds=DEFAULT_JOB_RETENTION)
    partitioned_history: bool = False
    vacuum_threshold: int = DEFAULT_VACUUM_THRESHOLD


def from_transport_options(options: Mapping[str, object]) -> Options:
    """The :class:`Options` a kombu client's ``transport_options`` ask for."""
    synchronous_commit = options.get("synchronous_commit")
    return Options(
        lease=timedelta(seconds=float(options.get("lease_seconds", DEFAULT_LEASE_SECONDS))),
        polling_interval=float(options.get("polling_interval", DEFAULT_POLLING_INTERVAL)),
        linger_max=float(options.get("linger_max", DEFAULT_LINGER_MAX)),
        hand_off=flag(options.get("hand_off", True)),
        maintenance_interval=float(
            options.get("maintenance_interval", DEFAULT_MAINTENANCE_INTERVAL)),
        claim_batch_max=int(options.get("claim_batch_max", DEFAULT_CLAIM_BATCH_MAX)),
        confirm_publish=flag(options.get("confirm_publish", True)),
        synchronous_commit=None if synchronous_commit is None else str(synchronous_commit),
        visible_before_flush=flag(options.get("visible_before_flush", False)),
        max_message_size=int(options.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE)),
        retry_backoff=timedelta(
            seconds=float(options.get("retry_backoff", DEFAULT_RETRY_BACKOFF_SECONDS))),
        response_timeout=float(options.get("response_timeout", DEFAULT_RESPONSE_TIMEOUT)),
        migrate=flag(options.get("migrate", True)),
        prepared_statements=flag(options.get("prepared_statements", True)),
        listen_url=str(options.get("listen_url") or "").strip() or configured_listen_url(),
        completed_retention=_window(options, "completed_retention", DEFAULT_COMPLETED_RETENTION),
        failed_retention=_window(options, "failed_retention", DEFAULT_FAILED_RETENTION),
        job_retention=_window(options, "job_retention", DEFAULT_JOB_RETENTION),
        partitioned_history=flag(options.get("partitioned_history", default_partitioned())),
        vacuum_threshold=int(options.get("vacuum_threshold", DEFAULT_VACUUM_THRESHOLD)),
    )


def _window(options: Mapping[str, object], name: str, default: float) -> timedelta:
    """A retention window in seconds; a negative one is refused here, not
    later in the lease thread's cleanup."""
    seconds = float(options.get(name, default))
    if not seconds >= 0:
        raise ValueError(f"transport option {name} must be a number of seconds >= 0, "
                         f"not {options[name]!r}")
    return timedelta(seconds=seconds)


def flag(value: object) -> bool:
    """A boolean transport option, also when it came from a URL or env var."""
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)
