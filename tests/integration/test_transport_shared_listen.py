"""One LISTEN session per process (issue 12): every kombu connection of a
process that consumes (Flower's event receiver and its concurrent inspect
calls, each draining in a thread of its own) LISTENs on one session, and each
is woken for its own queues only; a session that is lost is replaced once
for all of them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import kombu
import psycopg
import pytest
from celery_workers import wait_for
from transport_support import event_loop, queue_named

from pg_broker.queries import queries
from pg_broker.transport import listener
from pg_broker.urls import broker_url as pgbroker_url

pytest_plugins = ["transport_support"]


def _listen_sessions(db: psycopg.Connection, name: str) -> list[int]:
    """The sessions of application ``name`` that hold a LISTEN session's
    advisory lock (migrations/core/210)."""
    return [pid for (pid,) in db.execute(
        "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid"
        " WHERE a.application_name = %s AND l.locktype = 'advisory' AND l.granted"
        " AND l.classid = 1885823596", (name,))]


def _named(database_url: str) -> tuple[str, str]:
    """A broker URL whose sessions all carry an application name of their own, and the name."""
    name = f"shared-{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in database_url else "?"
    return pgbroker_url(f"{database_url}{separator}application_name={name}"), name


def _sessions(db: psycopg.Connection, name: str) -> int:
    return db.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                      (name,)).fetchone()[0]


def _publish_sql(db: psycopg.Connection, queue: str, body: str) -> None:
    """The transport's publish statement, from a session of the test's own."""
    db.execute(queries["transport_publish"], {
        "exchange": "", "routing_key": queue, "ttl": None, "synchronous_commit": None,
        "priority": 0, "payload": f'{{"body": "{body}", "content-type": "text/plain", '
                                  f'"content-encoding": "utf-8", "headers": {{}}, '
                                  f'"properties": {{}}}}',
        "task_type": None, "task_id": None, "job_id": None, "user_id": None,
        "max_attempts": None, "store": True, "notify": True, "hand_off": True,
    })


STOP = "stop"


class Drainer:
    """A kombu connection consuming one queue in a thread of its own, as
    each of Flower's inspect calls does. It never polls within a test: its
    drains last an hour (a drain polls once its timeout has passed), until a
    message says stop."""

    def __init__(self, url: str) -> None:
        self.queue = queue_named("shared")
        self.received: list[str] = []
        self.connection = kombu.Connection(url, transport_options={"polling_interval": 3600})
        self._consumer = self.connection.Consumer(
            [self.queue], callbacks=[lambda body, m: (self.received.append(body), m.ack())])
        self._consumer.consume()
        self._thread = threading.Thread(target=self._drain, daemon=True)

    def _drain(self) -> None:
        while STOP not in self.received:
            self.connection.drain_events(timeout=3600)

    def start(self) -> Drainer:
        self._thread.start()
        return self

    def close(self, db: psycopg.Connection) -> None:
        if self._thread.is_alive():
            _publish_sql(db, self.queue.name, STOP)
            self._thread.join(10)
        self._consumer.cancel()
        self.connection.close()


@contextmanager
def drainers(url: str, db: psycopg.Connection, count: int) -> Iterator[list[Drainer]]:
    with ExitStack() as stack:
        started = []
        for _ in range(count):
            drainer = Drainer(url).start()
            stack.callback(drainer.close, db)
            started.append(drainer)
        yield started


def _each_gets_its_own(db: psycopg.Connection, consumers: list[Drainer], tag: str) -> None:
    """A message to each consumer's queue reaches that consumer, by its
    wake-up."""
    for n, drainer in enumerate(consumers):
        _publish_sql(db, drainer.queue.name, f"{tag}-{n}")
    for n, drainer in enumerate(consumers):
        wait_for(lambda d=drainer, n=n: f"{tag}-{n}" in d.received, 10,
                 lambda n=n: f"consumer {n} to be woken for its message ({tag})")
    assert all(drainer.received[-1] == f"{tag}-{n}" for n, drainer in enumerate(consumers))


def test_consuming_connections_of_a_process_share_one_listen_session(
        database_url: str, db: psycopg.Connection) -> None:
    url, name = _named(database_url)
    with drainers(url, db, 4) as consumers:
        _each_gets_its_own(db, consumers, "first")
        assert len(_listen_sessions(db, name)) == 1
        assert _sessions(db, name) == 2  # the work connection and the LISTEN session

        consumers[0].close(db)  # its channels go; the others' stay
        _each_gets_its_own(db, consumers[1:], "after one left")
        assert len(_listen_sessions(db, name)) == 1
    wait_for(lambda: _sessions(db, name) == 0, 10, "the last one's close to end both sessions")


def test_a_lost_listen_session_is_replaced_once_for_every_consumer(
        database_url: str, db: psycopg.Connection) -> None:
    url, name = _named(database_url)
    with drainers(url, db, 3) as consumers:
        _each_gets_its_own(db, consumers, "before")
        (pid,) = _listen_sessions(db, name)
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(lambda: (pids := _listen_sessions(db, name)) and pids != [pid], 10,
                 "a new LISTEN session")
        time.sleep(0.5)  # every drain has found out
        assert len(_listen_sessions(db, name)) == 1
        _each_gets_its_own(db, consumers, "after")


def test_the_listen_session_has_the_server_probe_its_client_too(database_url: str) -> None:
    # The session's advisory lock says its consumer lives (core 210), so the
    # server must notice a client machine that vanished without closing its
    # socket: the LISTEN session sets the server's TCP keepalives and
    # tcp_user_timeout to the client's own (CONNECT_DEFAULTS), not the
    # operating system's two hours.
    url, name = _named(database_url)
    with kombu.Connection(url) as conn:
        queue = queue_named("probes")
        with conn.Consumer([queue], callbacks=[lambda body, message: message.ack()]):
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
            (session,) = [s for s in listener._sessions._objects.values()
                          if name in s._conninfo and s.connected]
            with session.lock:
                if session.conn.info.host.startswith("/"):
                    pytest.skip("a Unix-domain socket has no TCP keepalives "
                                "(set PG_BROKER_TEST_URL to a server over TCP)")
                settings = dict(session.conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name IN ("
                    "'tcp_keepalives_idle', 'tcp_keepalives_interval',"
                    " 'tcp_keepalives_count', 'tcp_user_timeout')").fetchall())
    assert settings == {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5",
                        "tcp_keepalives_count": "3", "tcp_user_timeout": "20000"}


def test_a_hub_and_a_draining_thread_of_one_process_are_each_woken_whoever_reads(
        database_url: str, db: psycopg.Connection) -> None:
    # A worker's event loop and a client thread (say, a remote-control call)
    # share the LISTEN session: whichever reads a notification first hands
    # it to the other (the hub through its kick). Here the hub's own
    # notifications arrive while the loop is not turning, so the thread
    # reads them. Neither polls in the test.
    url, name = _named(database_url)
    hub_queue = queue_named("hub")
    hub_received: list[str] = []
    with drainers(url, db, 1) as (drainer,), \
            kombu.Connection(url, transport_options={"polling_interval": 3600}) as consumer:
        with consumer.Consumer([hub_queue], callbacks=[lambda body, m: (hub_received.append(body),
                                                                        m.ack())]):
            with event_loop(consumer) as run_until:
                run_until(lambda: consumer.transport.poller._waiting, "the hub to wait")
                for n in range(10):
                    _publish_sql(db, hub_queue.name, f"hub-{n}")
                    _publish_sql(db, drainer.queue.name, f"thread-{n}")
                    time.sleep(0.3)  # the thread, waiting on the session, reads both
                    run_until(lambda n=n: f"hub-{n}" in hub_received, f"hub message {n}", 10)
                    wait_for(lambda n=n: f"thread-{n}" in drainer.received, 10,
                             f"thread message {n}")
                assert len(_listen_sessions(db, name)) == 1


def test_a_consumer_joining_a_session_lost_meanwhile_gets_a_new_one(
    database_url: str, db: psycopg.Connection,
) -> None:
    # The process's LISTEN session was terminated while a consumer used it,
    # before that consumer looked again; a second consumer joining then found
    # the session "connected" and its LISTEN failed: AdminShutdown out of
    # drain_events (seen in CI, after a test that terminated sessions).
    url, name = _named(database_url)
    with kombu.Connection(url, transport_options={"polling_interval": 3600}) as first, \
            kombu.Connection(url, transport_options={"polling_interval": 3600}) as second:
        got: list[str] = []
        with first.Consumer([queue_named("first")], callbacks=[lambda b, m: m.ack()]):
            try:
                first.drain_events(timeout=0.2)
            except TimeoutError:
                pass
            (pid,) = _listen_sessions(db, name)
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_for(lambda: not _listen_sessions(db, name), 10, "the session gone")
            queue = queue_named("second")
            with second.Consumer([queue], callbacks=[lambda b, m: (got.append(b), m.ack())]):
                _publish_sql(db, queue.name, "hello")
                second.drain_events(timeout=10)
    assert got == ["hello"]
