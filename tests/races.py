"""Races of cleanup against the transport: actors on connections of their own
turning for a few seconds while a ledger records what each last made of each
row, so a test can compare the table with what should be there
(tests/integration/test_retention_races.py, test_partitioned_history.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import psycopg
from taskrows import ack_and_claim

from pg_broker.queries import queries

RACE_SECONDS = 4.0

# An actor: given a connection, one turn of its loop.
Turn = Callable[[psycopg.Connection], None]


class Ledger:
    """What each actor last made of each row (after its statement returned)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state: dict[int, str] = {}

    def record(self, row_ids: Iterable[int], state: str) -> None:
        with self._lock:
            for row_id in row_ids:
                self.state[row_id] = state


def race(url: str, turns: Iterable[Turn], seconds: float = RACE_SECONDS) -> None:
    """Run each turn in a loop on an autocommit connection of its own, all at
    once, for ``seconds``; fails with every exception an actor raised."""
    stop, errors = threading.Event(), []

    def actor(turn: Turn) -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                while not stop.is_set():
                    turn(conn)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=actor, args=(turn,)) for turn in turns]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not errors, errors


def claim_ack_bury(ledger: Ledger, queue: str, limit: int, delete_acked: bool = True) -> Turn:
    """A worker's turn: claims up to ``limit`` rows of ``queue``, acks the even
    ones (completed, or deleted when ``delete_acked``) and buries the odd ones
    (dead, for dead retry), each in a transaction of its own."""
    def turn(conn: psycopg.Connection) -> None:
        with conn.transaction():
            claimed, _, token = ack_and_claim(conn, [], queue, limit=limit, worker="racer",
                                              delete_acked=delete_acked)
            ledger.record(claimed, "claimed")
        with conn.transaction():
            acks = [(i, token) for i in claimed if i % 2 == 0]
            _, acked, _ = ack_and_claim(conn, acks, delete_acked=delete_acked)
            ledger.record(acked, "completed")
        with conn.transaction():
            burials = [i for i in claimed if i % 2]
            buried = conn.execute(queries["transport_bury"], {
                "ids": burials, "tokens": [token] * len(burials), "error": "raced"}).fetchall()
            ledger.record([r[0] for r in buried], "dead")
    return turn


def retry_dead(ledger: Ledger) -> Turn:
    """``pg-broker dead retry`` of every dead row, every 10 ms."""
    def turn(conn: psycopg.Connection) -> None:
        with conn.transaction():
            retried = conn.execute(queries["retry_dead_tasks"], {"ids": None}).fetchall()
            ledger.record([r[0] for r in retried], "pending")
        time.sleep(0.01)
    return turn
