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

import uuid

import psycopg
from races import Ledger, claim_ack_bury, race, retry_dead
from taskrows import add_tasks

from pg_broker.maintenance import Retention

QUEUE = "race"


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

    deleted = []
    retention = Retention.older_than("0 seconds", batch_size=20)
    race(database_url, [claim_ack_bury(ledger, QUEUE, limit=5, delete_acked=False),
                        retry_dead(ledger), lambda conn: deleted.append(retention.run(conn))])

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
