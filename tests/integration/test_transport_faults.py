"""Database faults the transport must notice and ride out: a path that stops
answering (the chaos suite's proxy), the TCP options that bound a real cut,
and a database that turns read-only."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import psycopg
import pytest
from chaos.proxy import Proxy
from chaos.servers import set_read_only
from kombu.exceptions import OperationalError
from psycopg.conninfo import conninfo_to_dict
from transport_support import open_connection, publish, queue_named, rows

pytest_plugins = ["transport_support"]


@pytest.fixture
def proxy(database_url: str) -> Iterator[tuple[Proxy, str]]:
    """A proxy in front of the test database, and the database's URL through it."""
    proxy, url = Proxy.in_front_of(database_url)
    try:
        yield proxy, url
    finally:
        proxy.close()


def test_a_path_that_stops_answering_fails_the_statement_after_response_timeout(
    proxy, database_url, db,
):
    proxy, url = proxy
    before, after = queue_named("cut"), queue_named("healed")
    for conn in open_connection(url, response_timeout=1):
        channel = conn.default_channel
        publish(conn, before, "before the cut")
        assert before(channel).get().payload == "before the cut"
        proxy.stall()
        began = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="sent no reply for"):
            before(channel).get()
        # Cut after about a second, not when the path heals (it never does here).
        assert time.monotonic() - began < 30
        proxy.resume()
        for direct in open_connection(database_url):
            publish(direct, after, "after the cut")
        # The next statement runs on a new session.
        message = after(channel).get()
        assert message is not None and message.payload == "after the cut"
        message.ack()
    assert rows(db, after.name) == []  # acked: the plain message's row is gone


def test_broker_sockets_carry_keepalives_and_a_user_timeout(proxy, db):
    """What bounds a cut that drops packets, on the work and the LISTEN
    connection: the options reach the kernel."""
    _, url = proxy
    for conn in open_connection(url):
        transport = conn.transport
        transport._listener.connect()
        for pgconn in (transport.conn.pgconn, transport._listener.conn.pgconn):
            sock = socket.socket(fileno=pgconn.socket)
            try:
                options = {
                    "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP,
                                                       socket.TCP_USER_TIMEOUT),
                }
            finally:
                sock.detach()  # the descriptor stays libpq's
            assert options == {"keepalive": 1, "idle": 10, "interval": 5, "count": 3,
                               "user_timeout_ms": 20000}


def test_a_read_only_database_refuses_publishes_and_a_new_session_recovers(
    server_url, own_database,
):
    queue = queue_named("ro")
    retry = {"max_retries": 2, "interval_start": 0, "interval_step": 0.1}
    for conn in open_connection(own_database):
        publish(conn, queue, "before")
        set_read_only(server_url, conninfo_to_dict(own_database)["dbname"], on=True)
        with pytest.raises(OperationalError, match="read-only transaction"):
            publish(conn, queue, "refused", retry=True, retry_policy=retry)
        set_read_only(server_url, conninfo_to_dict(own_database)["dbname"], on=False)
        # The session opened while it was read-only stays so: the refusal is a
        # connection error, kombu reconnects and the new session writes.
        publish(conn, queue, "after", retry=True, retry_policy=retry)
    with psycopg.connect(own_database, autocommit=True) as db:
        assert [status for status, _, _ in rows(db, queue.name)] == ["pending", "pending"]


def test_the_lease_thread_reconnects_a_session_that_went_read_only(database_url):
    for conn in open_connection(database_url, maintenance_interval=0.2):
        transport = conn.transport
        transport.conn.execute("SET default_transaction_read_only = on")
        read_only = transport.conn.info.backend_pid
        transport.leases.start(maintain=True)
        deadline = time.monotonic() + 30
        while transport.conn.info.backend_pid == read_only:
            assert time.monotonic() < deadline, "the lease thread kept the read-only session"
            time.sleep(0.1)
        assert transport.conn.execute("SHOW transaction_read_only").fetchone() == ("off",)
