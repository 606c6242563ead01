"""The ``pgbroker://`` Celery result backend: results in PostgreSQL, waiting pushed.

``result_backend = "pgbroker://"`` (the broker's database: ``PG_BROKER_URL``,
``DATABASE_URL`` or the embedded server) or
``"pgbroker://user:pass@host/db?sslmode=require"`` (libpq parameters pass
through). The ``celery.result_backends`` entry point registers the scheme
with Celery, and so does ``import pg_broker`` (see :mod:`pg_broker.scheme`). :mod:`.backend` holds the Celery
classes, :mod:`.store` the SQL, :mod:`.waiting` the wake-ups.

Why it is built this way (measured on this project's 2-core machine,
PostgreSQL 15 on 127.0.0.1, other work running beside):

- **A table of its own** (``task_results``, migrations/core/110), not the task's
  ``job_tasks`` row. Storing one result there costs 128 µs of the worker's
  time, 40 µs of server CPU and 739 bytes of WAL (``synchronous_commit``
  off); updating the task's held ``job_tasks`` row with it cost 308 µs, 117
  µs and 827 bytes (that table's indexes and triggers;
  ``python -m bench.result_writes``). And results outlive messages
  (``result_expires``, a day by default, where finished messages are meant to
  leave ``job_tasks`` within minutes), and exist for what never was a
  ``job_tasks`` row: saved groups, revoked ids, tasks sent through another
  broker.
- **A channel per result, LISTENed by the process that waits.** A write
  notifies ``pgbroker_r_`` + md5(key). LISTEN plus UNLISTEN cost a waiter
  40–57 µs (two round trips of ~18 µs, or one piggybacked on its read); one
  channel for all results would save that but deliver every result of the
  database to every waiting process: +1.6 µs of server CPU and ~7 µs of the
  client's per result and per process (PostgreSQL already spends ~7 µs per
  listening session per notification, whatever its channels). The cost
  stays with the waiter that way, not with every process.
- **Only awaited results notify** (migrations/core/200): a waiting process
  records its keys in ``task_result_waiters`` (in the round trip of its
  LISTENs and read), and a write notifies only when it finds a record. A
  result nobody awaits (a stream of tasks, a chord's header parts) sends no
  notification, which would signal every listening session of the database
  and take PostgreSQL's cluster-wide notification lock through the commit.
- **The notification carries the result** (base64, up to 5,400 bytes, under
  NOTIFY's 8,000-byte payload): the waiter hands it out without reading the
  row, one round trip less between the worker's write and the caller, which
  on a busy machine is two process wake-ups. Larger ones notify empty and are
  read. ``notified_values=False`` reads them all (any session can NOTIFY).
- **One LISTEN session per process**, whatever the threads (Celery keeps a
  backend object per thread) and waiters: a thousand results awaited at
  once are a thousand channels on one session — the session the process's
  transport consumers LISTEN on, when broker and backend share a database
  (issue 12: a worker that consumes and awaits holds its work and LISTEN
  connections, no third). It is drained by the caller's own wait (Celery's
  drainer) or by whoever else reads it (the worker's event loop), never by
  a sleep loop; the table is read (in the round trip of the waiter's
  LISTEN) before waiting and again after a reconnect, so no wake-up is
  lost. Writes run on a connection of their own, closed when idle.
- **Result writes commit asynchronously** (``synchronous_commit = off``, the
  ``result_backend_transport_options`` key ``synchronous_commit`` changes it):
  128 µs instead of 398 µs per result for the worker, 40 instead of 137 µs of
  server CPU. A crash of the database server can lose the last fraction of a
  second of them; the WAL is written in order, so with acks late (this
  project's default) a lost result is always followed by a lost ack, and the
  task runs again. With early acks (Celery's default) such a task stays
  PENDING, as with a Redis that loses its last writes.
- **Native chords**: the parts of a chord are counted in SQL, once per header
  task (at-least-once delivery can run one twice), and the worker counting
  the last part sends the callback: no ``celery.chord_unlock`` task polling.
- **Expiry**: an expired result reads as PENDING at once; its row is deleted
  by :class:`pg_broker.maintenance.ResultExpiry`, which Celery's
  ``celery.backend_cleanup`` (beat), the tasks app's retention and
  ``pg-broker retention`` run.
"""

from .backend import PgBrokerBackend

__all__ = ["PgBrokerBackend"]
