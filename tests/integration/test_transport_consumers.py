"""Consumers register, renew and expire (broker_consumers, migrations/core/150),
so that `pg-broker status` and Flower's Broker tab show live consumers per
queue, idle or busy: a real kombu consumer on the transport."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import psycopg
from transport_support import open_connection, publish, queue_named

from pg_broker.flower import PgBroker
from pg_broker.queries import queries
from pg_broker.urls import broker_url

pytest_plugins = ["transport_support"]

LEASE = 3.0  # renewals every second
ME = f"{socket.gethostname()}:{os.getpid()}"


def registrations(db: psycopg.Connection, queue: str) -> list[tuple]:
    return db.execute("SELECT worker_id, seen_at, expires_at > now() FROM broker_consumers"
                      " WHERE queue = %s", (queue,)).fetchall()


def wait_until(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def consumers(database_url: str, queue: str) -> int:
    (lengths,) = asyncio.run(PgBroker(broker_url(database_url)).queues([queue]))
    return lengths["consumers"]


def test_an_idle_consumer_registers_renews_and_unregisters_when_it_cancels(
    database_url: str, db: psycopg.Connection
) -> None:
    queue = queue_named("consumers")
    held = []
    for conn in open_connection(database_url, lease_seconds=LEASE):
        with conn.Consumer([queue], callbacks=[lambda body, message: held.append(message)]) as consumer:
            ((worker, first_seen, live),) = wait_until(lambda: registrations(db, queue.name))
            assert (worker, live) == (ME, True)
            assert consumers(database_url, queue.name) == 1
            # Idle (no message at all), it is renewed while it lives.
            wait_until(lambda seen=first_seen: registrations(db, queue.name)[0][1] > seen)
            listed = db.execute(queries["consumers_by_queue"]).fetchall()
            assert (queue.name, ME, 0) in [row[:3] for row in listed]  # no task held

            # Busy: the messages it holds of that queue are counted.
            publish(conn, queue, "held")
            conn.drain_events(timeout=10)
            by_queue = {row[0]: row for row in db.execute(queries["consumers_by_queue"])}
            assert len(held) == 1 and by_queue[queue.name][2] == 1
            held[0].ack()
            consumer.cancel()
            assert registrations(db, queue.name) == []
            assert consumers(database_url, queue.name) == 0


def test_a_consumer_that_stopped_renewing_expires_and_is_swept(
    database_url: str, db: psycopg.Connection
) -> None:
    gone, alive = queue_named("consumers-gone"), queue_named("consumers-alive")
    db.execute("INSERT INTO broker_consumers (queue, worker_id, expires_at)"
               " VALUES (%s, 'a-dead-host:1', now() - interval '1 second')", (gone.name,))
    assert consumers(database_url, gone.name) == 0
    assert "a-dead-host:1" not in [row[1] for row in db.execute(queries["consumers_by_queue"])]
    for conn in open_connection(database_url, lease_seconds=LEASE):
        with conn.Consumer([alive], callbacks=[lambda body, message: message.ack()]):
            wait_until(lambda: registrations(db, alive.name))
            # Any consumer's registration sweeps the expired ones.
            assert registrations(db, gone.name) == []


def test_closing_the_connection_unregisters_every_queue_it_consumed(
    database_url: str, db: psycopg.Connection
) -> None:
    first, second = queue_named("consumers-a"), queue_named("consumers-b")
    for conn in open_connection(database_url, lease_seconds=LEASE):
        consumer = conn.Consumer([first, second], callbacks=[lambda body, message: message.ack()])
        consumer.consume()
        wait_until(lambda: registrations(db, first.name) and registrations(db, second.name))
    assert registrations(db, first.name) == registrations(db, second.name) == []
