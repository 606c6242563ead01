"""Helpers and fixtures shared by the kombu-level transport tests
(tests/test_transport_*.py load it with ``pytest_plugins = ["transport_support"]``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import kombu
import psycopg
import pytest
from kombu.asynchronous import Hub
from psycopg import sql

import pg_broker  # noqa: F401  (registers pgbroker://)
from pg_broker.transport.listener import channel_name
from pg_broker.urls import broker_url as pgbroker_url


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def queue_named(prefix: str, **options) -> kombu.Queue:
    """A queue of a unique name on the default exchange (routing key = name)."""
    name = unique(prefix)
    return kombu.Queue(name, routing_key=name, **options)


def rows(db: psycopg.Connection, queue: str) -> list[tuple]:
    """(status, attempts, lease held?) of a queue's job_tasks rows, in FIFO order."""
    return db.execute(
        "SELECT status, attempts, lease_token IS NOT NULL FROM job_tasks "
        "WHERE queue = %s ORDER BY sequence", (queue,),
    ).fetchall()


def listen_as_waiter(conn: psycopg.Connection, queue: str) -> None:
    """LISTEN on ``queue``'s channel on ``conn`` (autocommit) and record it
    as a consumer that found the queue empty: the next publish there notifies."""
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel_name(queue))))
    wait_again(conn, queue)


def wait_again(conn: psycopg.Connection, queue: str) -> bool:
    """Record ``conn``'s session as waiting on ``queue`` once more (a
    publish that notified took the record away); whether a message is ready."""
    return conn.execute("SELECT pg_broker_wait(%s, gen_random_uuid())", (queue,)).fetchone()[0]


def publish(connection: kombu.Connection, queue: kombu.Queue, body, **kwargs) -> None:
    with connection.Producer() as producer:
        producer.publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key,
            declare=[queue], **kwargs,
        )


def open_connection(database_url: str, **transport_options) -> Iterator[kombu.Connection]:
    """A connected kombu Connection to the test database, closed afterwards."""
    with kombu.Connection(
        pgbroker_url(database_url), transport_options=transport_options
    ) as conn:
        conn.connect()
        yield conn


@pytest.fixture
def open_consumer(broker_url):
    """A worker's transport (consuming a durable queue with acks, so its lease
    thread runs the maintenance every 0.2 s) with the given options."""
    @contextmanager
    def consumer(**options) -> Iterator[kombu.Connection]:
        with kombu.Connection(broker_url, transport_options={
                "maintenance_interval": 0.2, **options}) as conn:
            with conn.Consumer([queue_named("worker")], callbacks=[lambda body, m: m.ack()]):
                yield conn
    return consumer


@pytest.fixture
def broker_url(database_url):
    return pgbroker_url(database_url)


@pytest.fixture
def connection(database_url, db):
    yield from open_connection(database_url)


@contextmanager
def event_loop(connection: kombu.Connection) -> Iterator[Callable[..., None]]:
    """Run ``connection``'s transport under a kombu Hub, as a Celery worker
    does (it then never calls drain_events). Yields ``run_until(predicate,
    describe, timeout=30)``, which turns the loop until ``predicate()`` holds."""
    hub = Hub()
    transport = connection.transport
    transport.register_with_event_loop(connection.connection, hub)
    loop = hub.create_loop()

    def run_until(predicate: Callable[[], object], describe: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {describe}"
            next(loop)

    try:
        yield run_until
    finally:
        transport.unregister_from_event_loop(connection.connection, hub)
        hub.close()
