"""A publish hands its message to a waiting consumer already claimed
(migrations/core/220): delivered with no claim statement, fenced, given back
when the consumer cannot take it, reclaimed un-counted when it never did."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import psycopg
import pytest
from celery_workers import wait_for
from transport_support import event_loop, open_connection, publish, queue_named

from pg_broker.transport.channel import enqueue_in
from pg_broker.transport.messages import HandOff
from pg_broker.urls import broker_url as pgbroker_url

pytest_plugins = ["transport_support"]


def _row(db: psycopg.Connection, queue: str) -> tuple | None:
    """(status, attempts, worker_id, lease held?, last_heartbeat set?) of a queue's one row."""
    return db.execute(
        "SELECT status, attempts, worker_id, lease_token IS NOT NULL, last_heartbeat IS NOT NULL"
        "  FROM job_tasks WHERE queue = %s", (queue,)).fetchone()


def _waiting(db: psycopg.Connection, queue: str) -> int:
    return db.execute("SELECT count(*) FROM broker_waiters WHERE queue = %s",
                      (queue,)).fetchone()[0]


def _counting(monkeypatch: pytest.MonkeyPatch, store, name: str) -> list:
    """Calls of ``store.<name>`` from now on (one statement each): (arguments, result)."""
    calls = []
    original = getattr(store, name)

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, result))
        return result
    monkeypatch.setattr(store, name, counted)
    return calls


def _wait_empty(consumer) -> None:
    """Let ``consumer`` find its queues empty and record itself as waiting
    on each (drains of 0.2 s until it did: a loaded machine may need more)."""
    poller = consumer.transport.poller
    consumed = set(consumer.transport.delivery.consumers)
    deadline = time.monotonic() + 10
    while poller._waiting != consumed:
        assert time.monotonic() < deadline, "the consumer never waited on its queues"
        with pytest.raises(TimeoutError):
            consumer.drain_events(timeout=0.2)


def test_a_waiting_consumer_is_handed_the_message_with_no_claim(
        database_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = queue_named("handed")
    received = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: received.append(m)]):
            _wait_empty(consumer)
            assert _waiting(db, queue.name) == 1
            claims = _counting(monkeypatch, consumer.transport.store, "ack_and_claim")
            for producer in open_connection(database_url):
                publish(producer, queue, {"n": 1})
            # Stored claimed for this consumer, by the publish itself.
            status, attempts, worker, leased, renewed = _row(db, queue.name)
            assert (status, attempts, leased, renewed) == ("claimed", 1, True, False)
            assert worker == consumer.transport.settlements.worker_id
            consumer.drain_events(timeout=10)
            assert [m.payload for m in received] == [{"n": 1}]
            assert claims == []  # delivered with no claim statement
            assert received[0].delivery_info["redelivered"] is False
            received[0].ack()
            wait_for(lambda: _row(db, queue.name) is None, 10, "the ack to delete the row")


def test_a_handed_message_goes_through_the_hub_with_no_claim(
        database_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = queue_named("handed-hub")
    received = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: (received.append(body),
                                                                    m.ack())]):
            with event_loop(consumer) as run_until:
                run_until(lambda: _waiting(db, queue.name) == 1, "the consumer to wait")
                claims = _counting(monkeypatch, consumer.transport.store, "ack_and_claim")
                for producer in open_connection(database_url):
                    for n in range(3):
                        publish(producer, queue, n)
                        run_until(lambda n=n: len(received) == n + 1, f"message {n}")
                        run_until(lambda: _waiting(db, queue.name) == 1,
                                  "the consumer to wait again")
                assert received == [0, 1, 2]
                # No claim at all: the acks went on their own (ack_and_claim
                # with nothing to claim), and after each hand-off the
                # consumer waited again at once (no linger claim by default).
                assert all(args[5] == 0 for args, _ in claims), claims


def test_an_ack_from_a_stale_owner_is_refused_and_the_reclaim_does_not_count(
        database_url: str, db: psycopg.Connection) -> None:
    queue = queue_named("stale-hand-off")
    received = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: received.append(m)]):
            _wait_empty(consumer)
            for producer in open_connection(database_url):
                publish(producer, queue, "late")
            consumer.drain_events(timeout=10)
            # Its lease expires (a hung worker) and the watchdog reclaims it:
            # never renewed, so the hand-off is not counted.
            db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 s'"
                       " WHERE queue = %s", (queue.name,))
            assert db.execute("SELECT reclaim_stale_tasks()").fetchone()[0] == 1
            assert _row(db, queue.name) == ("pending", 0, None, False, False)
            received[0].ack()  # fenced: refused
            consumer.transport.settlements.flush_acks()
            assert _row(db, queue.name) == ("pending", 0, None, False, False)


def test_a_renewed_hand_off_counts_as_a_delivery(database_url: str, db: psycopg.Connection) -> None:
    queue = queue_named("renewed-hand-off")
    received = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: received.append(m)]):
            _wait_empty(consumer)
            for producer in open_connection(database_url):
                publish(producer, queue, "runs")
            consumer.drain_events(timeout=10)
            leases = consumer.transport.leases
            assert leases.renew() == 1  # its lease thread's next renewal
            db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 s'"
                       " WHERE queue = %s", (queue.name,))
            assert db.execute("SELECT reclaim_stale_tasks()").fetchone()[0] == 1
            assert _row(db, queue.name)[:2] == ("pending", 1)  # it reached the worker: counted
            received[0].ack()


def test_a_consumer_closed_before_it_heard_its_hand_off_gives_it_back(
        database_url: str, db: psycopg.Connection) -> None:
    queue = queue_named("closed-hand-off")
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: m.ack()]):
            _wait_empty(consumer)
            for producer in open_connection(database_url):
                publish(producer, queue, "never heard")
            assert _row(db, queue.name)[0] == "claimed"
        # Cancelled (and then closed) without reading the notification.
        assert _row(db, queue.name) == ("pending", 0, None, False, False)
    assert _waiting(db, queue.name) == 0


def test_a_consumer_whose_window_is_full_gives_the_hand_off_back_and_wakes_the_next(
        database_url: str, db: psycopg.Connection) -> None:
    queue = queue_named("full-hand-off")
    held = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: held.append(m)],
                               prefetch_count=1):
            for producer in open_connection(database_url):
                publish(producer, queue, "held")
                consumer.drain_events(timeout=10)  # unacked: the window is full
                assert len(held) == 1
                transport = consumer.transport
                # A full consumer records no wait; one recorded while it had
                # room (for another queue's message, say) is handed a row.
                with pytest.raises(TimeoutError):
                    consumer.drain_events(timeout=0.2)
                assert _waiting(db, queue.name) == 0
                token = db.execute("SELECT gen_random_uuid()").fetchone()[0]
                transport.poller._tokens[queue.name] = token
                db.execute("SELECT pg_broker_wait(%s, %s, %s, %s, %s, %s, %s)",
                           (queue.name, transport.poller._waiter,
                            transport._listener.waiter_channel, transport._listener.session_lock,
                            transport.settlements.worker_id, timedelta(minutes=5), token))
                with psycopg.connect(database_url, autocommit=True) as other:
                    other.execute('LISTEN "pgbroker_other"')  # a waiter behind it
                    other.execute("SELECT pg_broker_wait(%s, gen_random_uuid(),"
                                  " 'pgbroker_other', NULL)", (queue.name,))
                    publish(producer, queue, "no room")
                    assert _second(db, queue.name)[0] == "claimed"
                    with pytest.raises(TimeoutError):
                        consumer.drain_events(timeout=1)  # hears it, gives it back
                    assert _second(db, queue.name) == ("pending", 0)
                    assert [n.payload for n in other.notifies(timeout=5, stop_after=1)] == [
                        queue.name]
            held[0].ack()
    assert len(held) == 1


def test_a_message_too_large_for_a_notification_is_read_by_its_id(
        database_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = queue_named("large-hand-off")
    body = "x" * 20_000
    received = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: (received.append(body),
                                                                    m.ack())]):
            _wait_empty(consumer)
            reads = _counting(monkeypatch, consumer.transport.store, "handed")
            claims = _counting(monkeypatch, consumer.transport.store, "ack_and_claim")
            for producer in open_connection(database_url):
                publish(producer, queue, body)
            consumer.drain_events(timeout=10)
    assert received == [body]
    assert len(reads) == 1
    assert not [row for _, rows in claims for row in rows if row.claimed]


def test_a_publish_in_the_caller_s_transaction_is_never_handed_off(
        database_url: str, db: psycopg.Connection) -> None:
    queue = queue_named("in-transaction")
    received = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: (received.append(body),
                                                                    m.ack())]):
            _wait_empty(consumer)
            for producer in open_connection(database_url):
                with psycopg.connect(database_url) as caller:
                    with enqueue_in(caller):
                        publish(producer, queue, "in a transaction")
                    caller.commit()
            assert _row(db, queue.name)[0] == "pending"  # woken, not handed
            consumer.drain_events(timeout=10)
    assert received == ["in a transaction"]


def test_a_killed_worker_s_hand_off_is_reclaimed_without_counting(
        database_url: str, db: psycopg.Connection) -> None:
    queue = queue_named("killed-hand-off")
    dead = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import kombu, pg_broker
        conn = kombu.Connection({pgbroker_url(database_url)!r},
                                transport_options={{"polling_interval": 3600}})
        queue = kombu.Queue({queue.name!r}, routing_key={queue.name!r})
        def hold(body, message):
            print("received", flush=True)
        with conn.Consumer([queue], callbacks=[hold]):
            while not conn.transport.poller._waiting:
                try:
                    conn.drain_events(timeout=0.2)  # finds it empty: waits
                except TimeoutError:
                    pass
            print("waiting", flush=True)
            conn.drain_events(timeout=3600)
            print("received", flush=True)
            conn.drain_events(timeout=3600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert dead.stdout.readline().strip() == "waiting"
        for producer in open_connection(database_url):
            publish(producer, queue, "to the doomed")
        assert dead.stdout.readline().strip() == "received"
        dead.kill()
        dead.wait(10)
    finally:
        dead.kill()
    assert _row(db, queue.name)[:2] == ("claimed", 1)
    db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 s'"
               " WHERE queue = %s", (queue.name,))
    assert db.execute("SELECT reclaim_stale_tasks()").fetchone()[0] == 1
    assert _row(db, queue.name) == ("pending", 0, None, False, False)
    received = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: (received.append(body),
                                                                    m.ack())]):
            consumer.drain_events(timeout=10)
    assert received == ["to the doomed"]


def test_hand_offs_never_dead_letter_a_message(database_url: str,
                                                db: psycopg.Connection) -> None:
    # max_attempts 1: one counted delivery. Handed to a consumer that never
    # took it (closed), then reclaimed from one that took it and vanished
    # before its first renewal: the message is still there for a worker.
    queue = queue_named("never-dead")
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: None]):
            _wait_empty(consumer)
            for producer in open_connection(database_url):
                publish(producer, queue, "once", headers={"max_attempts": 1})
    assert _row(db, queue.name)[:2] == ("pending", 0)
    received = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: (received.append(body),
                                                                    m.ack())]):
            consumer.drain_events(timeout=10)
    assert received == ["once"]


def _second(db: psycopg.Connection, queue: str) -> tuple | None:
    """(status, attempts) of a queue's second row."""
    return db.execute("SELECT status, attempts FROM job_tasks WHERE queue = %s"
                      " ORDER BY id OFFSET 1", (queue,)).fetchone()


def test_a_consumer_whose_window_fills_withdraws_its_other_offers(
        database_url: str, db: psycopg.Connection) -> None:
    first, second = queue_named("offer-a"), queue_named("offer-b")
    held = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([first, second], callbacks=[lambda body, m: held.append(m)],
                               prefetch_count=1):
            _wait_empty(consumer)
            offers = "SELECT lease_token IS NOT NULL FROM broker_waiters WHERE queue = %s"
            assert db.execute(offers, (second.name,)).fetchone() == (True,)
            for producer in open_connection(database_url):
                publish(producer, first, "fills the window")
                consumer.drain_events(timeout=10)
                assert [m.payload for m in held] == ["fills the window"]
                # Still waiting on the second queue, for a wake-up only.
                assert db.execute(offers, (second.name,)).fetchone() == (False,)
                publish(producer, second, "woken for")
                assert _row(db, second.name)[0] == "pending"
                held[0].ack()
                consumer.drain_events(timeout=10)
    assert [m.payload for m in held] == ["fills the window", "woken for"]


def test_a_consumer_without_the_hand_off_option_is_only_woken(
        database_url: str, db: psycopg.Connection) -> None:
    queue = queue_named("no-hand-off")
    received = []
    for consumer in open_connection(database_url, polling_interval=3600, hand_off=False):
        with consumer.Consumer([queue], callbacks=[lambda body, m: (received.append(body),
                                                                    m.ack())]):
            _wait_empty(consumer)
            for producer in open_connection(database_url):
                publish(producer, queue, "woken")
            assert _row(db, queue.name)[0] == "pending"
            consumer.drain_events(timeout=10)
    assert received == ["woken"]


def test_a_publish_behind_ready_messages_wakes_the_consumer_to_claim_them_in_order(
        database_url: str, db: psycopg.Connection) -> None:
    queue = queue_named("behind")
    received = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: (received.append(body),
                                                                    m.ack())]):
            _wait_empty(consumer)
            for producer in open_connection(database_url):
                # Stored without a wake-up (as a pipelined burst's messages
                # are until their trailing notification), a high priority.
                pipeline = producer.transport.pipeline
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(pipeline, "ration", lambda params: {**params, "notify": False})
                    patch.setattr(pipeline, "owe", lambda params: None)
                    publish(producer, queue, "first, urgent", priority=9)
                assert _waiting(db, queue.name) == 1
                publish(producer, queue, "second")
            assert [status for status, *_ in db.execute(
                "SELECT status FROM job_tasks WHERE queue = %s ORDER BY id",
                (queue.name,))] == ["pending", "pending"]
            while len(received) < 2:
                consumer.drain_events(timeout=10)
    assert received == ["first, urgent", "second"]


def test_a_hand_off_heard_after_it_was_given_back_is_not_delivered(
        database_url: str, db: psycopg.Connection) -> None:
    # The consumer stopped waiting (its hand-off given back), consumed the
    # queue again, then heard the old notification: the row, pending again,
    # is not delivered from it.
    queue = queue_named("late-hand-off")
    received = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: received.append(body)]):
            _wait_empty(consumer)
            poller = consumer.transport.poller
            token = poller._tokens[queue.name]
            for producer in open_connection(database_url):
                publish(producer, queue, "given back")
            row_id = db.execute("SELECT id FROM job_tasks WHERE queue = %s",
                                (queue.name,)).fetchone()[0]
            poller.stop_waiting([queue.name])  # as a cancel does, before it heard it
            assert _row(db, queue.name) == ("pending", 0, None, False, False)
            late = HandOff(queue.name, row_id, token, {"body": "stale copy", "properties": {}})
            poller._handed([late])
            assert consumer.transport.delivery.buffers == {}
            assert _row(db, queue.name) == ("pending", 0, None, False, False)
    assert received == []


def test_a_hand_off_taken_while_its_offer_was_withdrawn_leaves_the_consumer_waiting_again(
        database_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    # A publish took the consumer's record of the second queue (handing it a
    # row) just before the consumer, its window filled, withdrew that offer.
    # The consumer takes the row from the notification it hears later; its
    # record is gone, so it must record itself again once the queue is empty:
    # else every later publish there waited for the safety poll (seen in the
    # results bench after a chord: get() at 985 ms, repeat after repeat).
    first, second = queue_named("withdrawn-a"), queue_named("withdrawn-b")
    held = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([first, second], callbacks=[lambda body, m: held.append(m)],
                               prefetch_count=1):
            _wait_empty(consumer)
            for producer in open_connection(database_url):
                store = consumer.transport.poller._store
                withdraw = store.wake_only

                def publish_first(queues, waiter, producer=producer, withdraw=withdraw):
                    publish(producer, second, "taken meanwhile")
                    return withdraw(queues, waiter)
                monkeypatch.setattr(store, "wake_only", publish_first)
                publish(producer, first, "fills the window")
                consumer.drain_events(timeout=10)
                monkeypatch.setattr(store, "wake_only", withdraw)
                assert [m.payload for m in held] == ["fills the window"]
                assert _row(db, second.name)[0] == "claimed"  # handed, not woken
                held[0].ack()
                consumer.drain_events(timeout=10)
                assert [m.payload for m in held][1:] == ["taken meanwhile"]
                held[1].ack()
                with pytest.raises(TimeoutError):
                    consumer.drain_events(timeout=0.5)  # finds both queues empty, waits
                # It believes it waits on both queues: both records exist (a
                # worker's hub has no drain timeout to claim on, only the
                # safety poll).
                assert consumer.transport.poller._waiting == {first.name, second.name}
                assert (_waiting(db, first.name), _waiting(db, second.name)) == (1, 1)
                publish(producer, second, "after")
                consumer.drain_events(timeout=10)
    assert [m.payload for m in held] == ["fills the window", "taken meanwhile", "after"]
