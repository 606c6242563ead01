"""Wake-ups only for consumers that wait (migrations/core/131): a publish
notifies a queue only when a consumer recorded itself as waiting there, each
record is worth one notification, and no wake-up is lost between a
consumer's last empty look and its sleep, whichever of the two commits
first."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import psycopg
import pytest
from celery_workers import wait_for
from transport_support import listen_as_waiter, open_connection, publish, queue_named, wait_again

from pg_broker.queries import queries
from pg_broker.transport.listener import channel_name
from pg_broker.urls import broker_url as pgbroker_url

pytest_plugins = ["transport_support"]


def _publish_sql(conn: psycopg.Connection, queue: str, body: str = "x") -> None:
    """The transport's publish statement, on ``conn`` (in its transaction, if open)."""
    conn.execute(queries["transport_publish"], {
        "exchange": "", "routing_key": queue, "ttl": None, "synchronous_commit": None,
        "priority": 0, "payload": f'{{"body": "{body}", "properties": {{}}}}',
        "task_type": None, "task_id": None, "job_id": None, "user_id": None,
        "max_attempts": None, "store": True, "notify": True, "hand_off": True,
    })


def _heard(listener: psycopg.Connection, timeout: float) -> int:
    return len(list(listener.notifies(timeout=timeout)))


def _waiting(db: psycopg.Connection, queue: str) -> int:
    return db.execute("SELECT count(*) FROM broker_waiters WHERE queue = %s",
                      (queue,)).fetchone()[0]


def _blocked(db: psycopg.Connection, pid: int) -> bool:
    """Whether the session ``pid`` waits for an advisory lock."""
    return db.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted"
                      " AND locktype = 'advisory')", (pid,)).fetchone()[0]


def test_nobody_waiting_means_no_notification(database_url: str, db: psycopg.Connection) -> None:
    queue = f"quiet-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{channel_name(queue)}"')
        _publish_sql(db, queue)
        assert _heard(listener, 0.3) == 0


def test_a_waiter_is_worth_one_notification(database_url: str, db: psycopg.Connection) -> None:
    queue = f"once-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as listener:
        listen_as_waiter(listener, queue)
        assert _waiting(db, queue) == 1
        for n in range(20):  # the woken consumer is busy: nobody waits
            _publish_sql(db, queue, str(n))
        assert _heard(listener, 0.5) == 1
        assert _waiting(db, queue) == 0

        assert wait_again(listener, queue) is True  # it finds the queue full: no sleep


def test_a_publish_in_flight_holds_the_waiter_back_until_its_message_is_visible(
        database_url: str, db: psycopg.Connection) -> None:
    # The publish takes the queue's lock first and sees no waiter; the
    # consumer's second look waits for the publish's commit, and finds it.
    queue = f"race-a-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url) as producer, \
            psycopg.connect(database_url, autocommit=True) as consumer:
        _publish_sql(producer, queue)  # its transaction stays open
        answer: list[bool] = []
        looking = threading.Thread(target=lambda: answer.append(wait_again(consumer, queue)))
        looking.start()
        wait_for(lambda: _blocked(db, consumer.info.backend_pid), 10,
                 "the consumer's look to wait for the publish")
        producer.commit()
        looking.join(10)
    assert answer == [True]


def test_a_waiter_recorded_first_is_seen_by_the_publish_that_waited_for_it(
        database_url: str, db: psycopg.Connection) -> None:
    # The consumer records itself first (its transaction still open); the
    # publish waits for the queue's lock, then sees the waiter and notifies.
    queue = f"race-b-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url) as consumer, \
            psycopg.connect(database_url, autocommit=True) as listener, \
            psycopg.connect(database_url, autocommit=True) as producer:
        listener.execute(f'LISTEN "{channel_name(queue)}"')
        assert consumer.execute("SELECT pg_broker_wait(%s, gen_random_uuid())",
                                (queue,)).fetchone() == (False,)
        publishing = threading.Thread(target=_publish_sql, args=(producer, queue))
        publishing.start()
        wait_for(lambda: _blocked(db, producer.info.backend_pid), 10,
                 "the publish to wait for the consumer's record")
        consumer.commit()
        publishing.join(10)
        assert _heard(listener, 5) == 1


@pytest.mark.parametrize("confirm_publish", [True, False], ids=["confirmed", "pipelined"])
def test_no_wake_up_is_lost_to_a_client_that_never_polls(
        database_url: str, db: psycopg.Connection, confirm_publish: bool) -> None:
    # Messages at random spacings around a consumer's claim-and-sleep cycle.
    # drain_events polls once its timeout has passed, and nothing else does
    # (polling_interval): a lost wake-up shows as a drain that took its whole
    # minute.
    queue = queue_named("lost")
    total = 300
    received: list[int] = []
    longest = 0.0
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: (received.append(body),
                                                                    m.ack())]):
            def produce() -> None:
                rng = random.Random(12)
                for producer in open_connection(database_url, confirm_publish=confirm_publish):
                    for n in range(total):
                        publish(producer, queue, n)
                        if rng.random() < 0.5:
                            time.sleep(rng.uniform(0, 0.004))

            producing = threading.Thread(target=produce)
            producing.start()
            while len(received) < total:
                started = time.monotonic()
                consumer.drain_events(timeout=60)
                longest = max(longest, time.monotonic() - started)
            producing.join(30)
    assert sorted(received) == list(range(total))
    assert longest < 30, "a message waited for the drain's poll: its wake-up was lost"


def test_a_deleted_queue_leaves_no_waiter_behind(database_url: str, db: psycopg.Connection) -> None:
    # A reply queue of each `celery inspect` call is waited on once and never
    # published to again: its waiter goes with it.
    queue = queue_named("replies", auto_delete=True)
    for consumer in open_connection(database_url):
        with consumer.Consumer([queue], callbacks=[]):
            with pytest.raises(TimeoutError):
                consumer.drain_events(timeout=0.2)  # finds it empty: waits
            assert _waiting(db, queue.name) == 1
    assert _waiting(db, queue.name) == 0


def _wait_on_own_channel(conn: psycopg.Connection, queue: str) -> str:
    """Record ``conn``'s session as waiting on ``queue`` to be notified on a
    channel of its own (as a consumer does since migrations/core/140)."""
    channel = f"pgbroker_w_{uuid.uuid4().hex}"
    conn.execute(f'LISTEN "{channel}"')
    conn.execute("SELECT pg_broker_wait(%s, gen_random_uuid(), %s)", (queue, channel))
    return channel


def _payloads(listener: psycopg.Connection, timeout: float) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=timeout)]


def test_a_publish_wakes_one_waiter_of_its_queue(database_url: str, db: psycopg.Connection) -> None:
    # Three idle consumers of one queue: each message wakes one of them, the
    # longest waiting first, and none through the queue's channel.
    queue = f"one-{uuid.uuid4().hex[:8]}"
    sessions = [psycopg.connect(database_url, autocommit=True) for _ in range(3)]
    try:
        with psycopg.connect(database_url, autocommit=True) as everyone:
            everyone.execute(f'LISTEN "{channel_name(queue)}"')
            for session in sessions:
                _wait_on_own_channel(session, queue)
            for n, session in enumerate(sessions):
                _publish_sql(db, queue, str(n))
                assert _payloads(session, 1) == [queue], f"waiter {n}"
                assert all(_payloads(other, 0.1) == [] for other in sessions if other is not session)
            _publish_sql(db, queue, "nobody waits")
            assert _payloads(everyone, 0.3) == []
            assert all(_payloads(session, 0.1) == [] for session in sessions)
    finally:
        for session in sessions:
            session.close()


def test_when_every_waiter_is_being_taken_the_queue_s_channel_wakes_them_all(
        database_url: str, db: psycopg.Connection) -> None:
    # The only waiter is being taken by a publish still open (it may roll
    # back, and then that waiter was never woken): the next publish cannot
    # take it, and notifies the queue's channel, which every consumer of the
    # queue LISTENs on.
    queue = f"taken-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as waiter, \
            psycopg.connect(database_url, autocommit=True) as everyone, \
            psycopg.connect(database_url) as first:
        everyone.execute(f'LISTEN "{channel_name(queue)}"')
        _wait_on_own_channel(waiter, queue)
        _publish_sql(first, queue, "first")  # takes the waiter; its transaction stays open
        _publish_sql(db, queue, "second")
        assert len(_payloads(everyone, 5)) == 1
        first.rollback()
        assert _waiting(db, queue) == 1  # back: the next publish takes it
        assert _payloads(waiter, 0.1) == []


def test_a_consumer_woken_with_a_full_prefetch_window_passes_the_wake_on(
        database_url: str, db: psycopg.Connection) -> None:
    queue = queue_named("full")
    held = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: held.append(m)],
                               prefetch_count=1):
            for producer in open_connection(database_url):
                publish(producer, queue, "held")
                consumer.drain_events(timeout=10)  # its one message, unacked: the window is full
                assert len(held) == 1
                # Recorded as waiting (as after a safety poll that claimed
                # while its record stayed), and older than the other waiter.
                poller = consumer.transport.poller
                db.execute("SELECT pg_broker_wait(%s, %s, %s)",
                           (queue.name, poller._waiter, consumer.transport._listener.waiter_channel))
                with psycopg.connect(database_url, autocommit=True) as other:
                    _wait_on_own_channel(other, queue.name)
                    publish(producer, queue, "for the other")
                    with pytest.raises(TimeoutError):
                        consumer.drain_events(timeout=1)  # woken, cannot claim: passes it on
                    assert _payloads(other, 5) == [queue.name]
            held[0].ack()


def test_no_wake_up_is_lost_among_several_consumers_that_never_poll(
        database_url: str, db: psycopg.Connection) -> None:
    # Three consumers of one queue, one message each at a time, woken one per
    # message; messages at random spacings. No consumer polls within the
    # test (polling_interval, and drains of 60 s): a lost wake-up leaves a
    # message behind.
    queue = queue_named("several")
    total = 300
    received: list[int] = []
    stopped: list[bool] = []

    def consume() -> None:
        done = []
        for consumer in open_connection(database_url, polling_interval=3600):

            def on_message(body, message) -> None:
                message.ack()
                (done if body == "stop" else received).append(body)

            with consumer.Consumer([queue], callbacks=[on_message], prefetch_count=1):
                while not done:
                    consumer.drain_events(timeout=60)
        stopped.append(True)

    consumers = [threading.Thread(target=consume, daemon=True) for _ in range(3)]
    for thread in consumers:
        thread.start()
    rng = random.Random(3)
    for producer in open_connection(database_url):
        publish(producer, queue, "declare")  # no consumer takes it apart: received
        for n in range(total):
            publish(producer, queue, n)
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.004))
        wait_for(lambda: len(received) >= total + 1, 40,
                 lambda: f"every message to be received ({len(received)} of {total + 1})")
        for _ in consumers:
            publish(producer, queue, "stop")
        wait_for(lambda: len(stopped) == len(consumers), 40, "every consumer to stop")
    assert sorted(b for b in received if b != "declare") == list(range(total))


def test_a_consumer_killed_while_waiting_takes_no_wake_up(
        database_url: str, db: psycopg.Connection) -> None:
    # A consumer process waits on a queue (its record the oldest), then is
    # SIGKILLed: it never deletes its record. A live consumer waits after it
    # and never polls within the test. The next publish must wake the live
    # one, not the dead one's channel (migrations/core/210).
    queue = queue_named("killed-waiter")
    dead = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import kombu, pg_broker
        conn = kombu.Connection({pgbroker_url(database_url)!r},
                                transport_options={{"polling_interval": 3600}})
        queue = kombu.Queue({queue.name!r}, routing_key={queue.name!r})
        with conn.Consumer([queue], callbacks=[lambda body, m: m.ack()]):
            try:
                conn.drain_events(timeout=0.2)  # finds it empty: waits
            except TimeoutError:
                pass
            print(conn.transport._listener.conn.info.backend_pid, flush=True)
            conn.drain_events(timeout=3600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        listen_pid = int(dead.stdout.readline())
        assert _waiting(db, queue.name) == 1
        dead.kill()
        dead.wait(10)
    finally:
        dead.kill()
    wait_for(lambda: not db.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                    (listen_pid,)).fetchone(),
             10, "the killed consumer's LISTEN session to end")
    assert _waiting(db, queue.name) == 1  # its record stays

    received = []
    for consumer in open_connection(database_url, polling_interval=3600):
        with consumer.Consumer([queue], callbacks=[lambda body, m: (received.append(body),
                                                                    m.ack())]):
            with pytest.raises(TimeoutError):
                consumer.drain_events(timeout=0.2)  # waits, after the dead one
            assert _waiting(db, queue.name) == 2
            for producer in open_connection(database_url):
                publish(producer, queue, "for the live one")
            started = time.monotonic()
            consumer.drain_events(timeout=30)  # a lost wake-up: 30 s, then a poll
            woken_after = time.monotonic() - started
    assert received == ["for the live one"]
    assert woken_after < 5, f"the live consumer was woken only by its poll ({woken_after:.1f} s)"
    assert _waiting(db, queue.name) == 0  # the dead record went with the wake-up



def test_a_wake_takes_one_waiter_whatever_plan_the_planner_picks(database_url: str) -> None:
    # pg_broker_wake chose its waiter in a LIMIT 1 ... FOR UPDATE SKIP LOCKED
    # subquery joined to its DELETE. With statistics that said broker_waiters
    # held one row, the plan scanned the table outside and ran the subquery
    # again for each row; each run skipped the record the DELETE had just
    # removed and took the next: one publish deleted every waiter of the
    # queue and failed ("query returned more than one row", seen in
    # tests/integration/test_transport_recovery.py).
    queue = f"plan-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM broker_waiters")
        conn.execute("INSERT INTO broker_waiters (queue, waiter, channel)"
                     " VALUES ('elsewhere', %s, 'nobody')", (uuid.uuid4(),))
        conn.execute("ANALYZE broker_waiters")
        for n in range(5):
            conn.execute("INSERT INTO broker_waiters (queue, waiter, since, channel)"
                         " VALUES (%s, %s, now() - make_interval(secs => %s), %s)",
                         (queue, uuid.uuid4(), 10 - n, f"nobody_{n}"))
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute("SELECT pg_broker_wake(%s)", (queue,))
        left = conn.execute("SELECT channel FROM broker_waiters WHERE queue = %s ORDER BY since",
                            (queue,)).fetchall()
    assert [c for (c,) in left] == [f"nobody_{n}" for n in range(1, 5)]
