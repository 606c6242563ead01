"""The transport under a worker's event loop (kombu's Hub, as Celery runs it):
acks batched into the next claim or sent once the loop is idle, claimed
messages never delivered given back uncounted."""

from __future__ import annotations

import threading
import time

import kombu
import psycopg
from transport_support import event_loop, open_connection, publish, queue_named, rows

from pg_broker.transport import poller

pytest_plugins = ["transport_support"]


def statuses(db, queue: kombu.Queue) -> list[str]:
    return [status for status, _, _ in rows(db, queue.name)]


def test_an_ack_rides_in_the_statement_of_the_next_claim(database_url, db, monkeypatch):
    # An ack waits ACK_WAIT for a claim, then goes on its own: on a loaded
    # machine a turn of the loop can take longer. Here it waits for ever.
    monkeypatch.setattr(poller, "ACK_WAIT", 3600.0)
    queue = queue_named("ride")
    received = []
    # Completed rows kept (completed_retention): their times show when each ack went.
    for conn in open_connection(database_url, completed_retention=3600):
        for n in range(3):
            publish(conn, queue, n)
        # A window of one: each message is a claim of its own, and the ack
        # of each waits for the claim of the next.
        with conn.Consumer([queue], prefetch_count=1,
                           callbacks=[lambda body, m: (received.append(body), m.ack())]):
            with event_loop(conn) as run_until:
                run_until(lambda: statuses(db, queue) == ["completed"] * 3,
                          "every message to be delivered and acked")
    assert received == [0, 1, 2]
    # now() is the statement's transaction time: an ack sent with a claim
    # completes its row at the very instant the next row was claimed.
    times = db.execute("SELECT claimed_at, completed_at FROM job_tasks WHERE queue = %s"
                       " ORDER BY sequence", (queue.name,)).fetchall()
    assert [times[n][1] for n in range(2)] == [times[n + 1][0] for n in range(2)]


def test_an_ack_on_an_idle_loop_goes_out_on_its_own_without_waiting_for_the_poll(
    database_url, db, monkeypatch,
):
    # No safety poll in the test's lifetime, and a queue that ran dry is not
    # claimed from again (LINGER, which would carry the ack): only the ack
    # timer can send it.
    monkeypatch.setattr(poller, "LINGER", 3600.0)
    queue = queue_named("idle-ack")
    received = []
    for conn in open_connection(database_url, polling_interval=3600, completed_retention=3600):
        publish(conn, queue, "only")
        # A window of two and one message: the first claim drains the queue,
        # so no claim follows to carry the ack.
        with conn.Consumer([queue], prefetch_count=2,
                           callbacks=[lambda body, m: received.append(m)]):
            with event_loop(conn) as run_until:
                run_until(lambda: received, "the message to be delivered")
                received[0].ack()
                assert statuses(db, queue) == ["claimed"]  # it waits for a claim to ride
                run_until(lambda: statuses(db, queue) == ["completed"],
                          "the waiting ack to go out once the loop is idle")
    times = db.execute("SELECT claimed_at, completed_at FROM job_tasks WHERE queue = %s",
                       (queue.name,)).fetchone()
    assert times[1] > times[0]  # a statement of its own


def test_claimed_messages_never_delivered_go_back_uncounted_when_the_consumer_cancels(
    database_url, db,
):
    queue = queue_named("buffered")
    total = 10
    received = []
    for conn in open_connection(database_url, polling_interval=3600):
        for n in range(total):
            publish(conn, queue, n)
        # One claim takes all ten; the loop hands out one message per turn.
        with conn.Consumer([queue], prefetch_count=total,
                           callbacks=[lambda body, m: received.append(body)]) as consumer:
            with event_loop(conn) as run_until:
                run_until(lambda: received, "the first delivery")
            delivered = len(received)
            assert 0 < delivered < total, "the rest wait, claimed, in the transport"
            consumer.cancel()
            # Delivered (never settled): held until the channel closes.
            # Never delivered: back at once, their claim not counted.
            assert rows(db, queue.name) == (
                [("claimed", 1, True)] * delivered + [("pending", 0, False)] * (total - delivered))
    # The delivered ones went back at the close, uncounted too.
    assert rows(db, queue.name) == [("pending", 0, False)] * total


def test_a_consumer_keeping_pace_with_a_steady_producer_stops_costing_notifications(
        database_url, db):
    # A message every 15 ms: more than LINGER apart, so a consumer that
    # claimed once more LINGER after running dry and then waited was notified
    # for nearly every message (77 of 80 with linger_max=LINGER); its linger
    # grows (up to linger_max) while its waits end that soon, and then it
    # takes them by claiming.
    linger_max = 0.04
    assert poller.LINGER < 0.015 < linger_max
    queue = queue_named("paced")
    total = 80
    received = []
    for consumer in open_connection(database_url, polling_interval=3600, linger_max=linger_max):
        with consumer.Consumer([queue], callbacks=[lambda body, m: (received.append(body),
                                                                    m.ack())]):
            with psycopg.connect(database_url, autocommit=True) as listener, \
                    event_loop(consumer) as run_until:
                listener.execute(f'LISTEN "{consumer.transport._listener.waiter_channel}"')

                def produce() -> None:
                    for producer in open_connection(database_url):
                        for n in range(total):
                            publish(producer, queue, n)
                            time.sleep(0.015)

                producing = threading.Thread(target=produce)
                producing.start()
                run_until(lambda: len(received) == total, "every message to be delivered", 60)
                producing.join(10)
                notifications = len(list(listener.notifies(timeout=0.2)))
    assert sorted(received) == list(range(total))
    assert notifications < total // 4, f"{notifications} notifications for {total} messages"
