"""Nothing is lost to cleanup: retention racing claims, acks, burials and
``dead retry`` deletes only rows that finished, never a pending, delayed
(ETA), held or re-queued one.

Four actors on connections of their own, for a few seconds: the retention
with every window 0 (the most eager it can be), a worker claiming messages
and acking or burying (dead) them, ``dead retry`` re-queueing every dead
row, and a slow worker that holds its rows and never settles them. Each
actor records what it made of a row after its statement returned. At the
end, every row that is gone must last have been finished (acked or buried)
by an actor; every other row is still there, as its last actor left it.
Each actor records inside its transaction, before the commit: the rows it
changed stay locked until then, so the records of a row are in the order of
its changes.
"""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
from taskrows import ack_and_claim, add_tasks

from pg_broker.maintenance import Retention
from pg_broker.queries import queries

RACE_SECONDS = 4.0
QUEUE = "race"


class Ledger:
    """What each actor last made of each row (after its statement returned)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state: dict[int, str] = {}

    def record(self, row_ids, state: str) -> None:
        with self._lock:
            for row_id in row_ids:
                self.state[row_id] = state


def _worker(url: str, ledger: Ledger, stop: threading.Event, errors: list) -> None:
    """Claims up to 5, then acks the even rows (their rows stay completed
    for retention to take) and buries the odd ones (dead, for dead retry)."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.is_set():
                with conn.transaction():
                    claimed, _, token = ack_and_claim(conn, [], QUEUE, limit=5,
                                                      worker="racer", delete_acked=False)
                    ledger.record(claimed, "claimed")
                with conn.transaction():
                    acks = [(i, token) for i in claimed if i % 2 == 0]
                    _, acked, _ = ack_and_claim(conn, acks, delete_acked=False)
                    ledger.record(acked, "completed")
                with conn.transaction():
                    burials = [(i, token) for i in claimed if i % 2]
                    buried = conn.execute(queries["transport_bury"], {
                        "ids": [i for i, _ in burials], "tokens": [t for _, t in burials],
                        "error": "raced"}).fetchall()
                    ledger.record([r[0] for r in buried], "dead")
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def _retrier(url: str, ledger: Ledger, stop: threading.Event, errors: list) -> None:
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.is_set():
                with conn.transaction():
                    retried = conn.execute(queries["retry_dead_tasks"], {"ids": None}).fetchall()
                    ledger.record([r[0] for r in retried], "pending")
                time.sleep(0.01)
    except Exception as exc:  # noqa: BLE001
        errors.append(exc)


def _retention(url: str, stop: threading.Event, errors: list, deleted: list) -> None:
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            retention = Retention.older_than("0 seconds", batch_size=20)
            while not stop.is_set():
                deleted.append(retention.run(conn))
    except Exception as exc:  # noqa: BLE001
        errors.append(exc)


def test_retention_racing_claims_acks_and_dead_retry_deletes_only_finished_rows(
    db: psycopg.Connection, database_url: str,
) -> None:
    ledger = Ledger()
    ledger.record(add_tasks(db, 400, queue=QUEUE), "pending")
    dead = add_tasks(db, 200, queue=QUEUE, status="dead", attempts=3, error="old",
                     completed_at="2000-01-01T00:00:00Z")
    ledger.record(dead, "dead")
    delayed = add_tasks(db, 50, queue=QUEUE, visible_at="2100-01-01T00:00:00Z")
    ledger.record(delayed, "pending")
    held = add_tasks(db, 50, queue="slow")
    slow_token = uuid.uuid4()
    db.execute("UPDATE job_tasks SET status = 'claimed', worker_id = 'slow', lease_token = %s,"
               " lease_expires_at = now() + interval '1 hour', attempts = 1"
               " WHERE id = ANY (%s)", (slow_token, held))
    ledger.record(held, "claimed")

    stop, errors, deleted = threading.Event(), [], []
    actors = [threading.Thread(target=_worker, args=(database_url, ledger, stop, errors)),
              threading.Thread(target=_retrier, args=(database_url, ledger, stop, errors)),
              threading.Thread(target=_retention, args=(database_url, stop, errors, deleted))]
    for actor in actors:
        actor.start()
    time.sleep(RACE_SECONDS)
    stop.set()
    for actor in actors:
        actor.join(30)
    assert not errors, errors

    left = dict(db.execute("SELECT id, status FROM job_tasks").fetchall())
    gone = set(ledger.state) - set(left)
    assert sum(deleted) == len(gone) > 0, "the retention deleted something while racing"
    unfinished_gone = {i: ledger.state[i] for i in gone
                       if ledger.state[i] not in ("completed", "dead")}
    assert not unfinished_gone, f"deleted before they finished: {unfinished_gone}"
    assert all(left.get(i) == "pending" for i in delayed), "a delayed (ETA) message went"
    assert all(left.get(i) == "claimed" for i in held), "a held message went"
    changed = {i: (ledger.state[i], s) for i, s in left.items() if ledger.state[i] != s}
    assert not changed, changed
