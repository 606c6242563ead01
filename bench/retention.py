"""What finished messages cost ``job_tasks``, and what removing them costs.

``python -m bench.retention [--pg-server URL] [--tasks 5000] [--finished 100000]``
creates a scratch database on the server, migrates it, and measures:

- **ack**: ``--tasks`` plain messages (a typical Celery envelope) are claimed
  and acked a batch of 100 at a time through ``transport_claim``, as a
  worker's hub does, once with the row deleted by its ack
  (``completed_retention`` 0, the default) and once left ``completed`` and
  deleted afterwards by a retention pass (any ``completed_retention`` > 0).
  Per task: wall time, WAL bytes, and the table's size and dead tuples after.
- **retention pass**: ``--finished`` completed rows are deleted by
  :class:`pg_broker.maintenance.Retention` (batched DELETEs) while another
  connection claims and acks one message at a time: the pass's duration and
  WAL bytes, and the claim latency (p50/p99) during the pass against before.
- **partition path** (a prototype, not the schema): acked rows move to a
  day-partitioned history table (``DELETE … RETURNING`` into ``INSERT``:
  WAL per task), and retention detaches and drops the day's partition holding
  ``--finished`` rows while the claimer runs (duration, WAL, claim latency).

WAL bytes are the server's (``pg_current_wal_lsn()`` differences): run it on a
server nobody else writes to (a private one: ``initdb`` on a free port).
Prints JSON and writes it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pg_broker.database import with_database
from pg_broker.maintenance import Retention
from pg_broker.migrate import migrate
from pg_broker.queries import queries

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE = "pg_broker_bench_retention"
QUEUE = "bench.retention"
BATCH = 100


def envelope() -> dict:
    """A Celery protocol 2 message as kombu stores it (about 1 KB)."""
    task_id = str(uuid.uuid4())
    return {
        "body": "W1swLjBdLCB7fSwgeyJjYWxsYmFja3MiOiBudWxsLCAiZXJyYmFja3MiOiBudWxsLCAiY2hhaW4iOiBudWxsLCAiY2hvcmQiOiBudWxsfV0=",  # noqa: E501
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": "bench.noop", "id": task_id, "shadow": None,
                    "eta": None, "expires": None, "group": None, "group_index": None,
                    "retries": 0, "timelimit": [None, None], "root_id": task_id,
                    "parent_id": None, "argsrepr": "(0.0,)", "kwargsrepr": "{}",
                    "origin": "gen1234@bench-host", "ignore_result": False,
                    "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}},
        "properties": {"correlation_id": task_id, "reply_to": str(uuid.uuid4()),
                       "delivery_mode": 2, "delivery_info": {"exchange": "",
                                                             "routing_key": QUEUE},
                       "priority": 0, "body_encoding": "base64",
                       "delivery_tag": str(uuid.uuid4())},
    }


def fill(conn: psycopg.Connection, n: int, status: str = "pending") -> None:
    """n plain messages in ``status`` (finished ones completed a day ago),
    each its own task id."""
    conn.execute(
        "INSERT INTO job_tasks (queue, payload, task_type, task_id, status, completed_at)"
        " SELECT %(queue)s, jsonb_set(%(payload)s, '{headers,id}', to_jsonb(u)), 'bench.noop',"
        "        u, %(status)s, CASE WHEN %(finished)s THEN now() - interval '1 day' END"
        "   FROM (SELECT gen_random_uuid()::text AS u FROM generate_series(1, %(n)s)) g",
        {"queue": QUEUE, "payload": Jsonb(envelope()), "status": status,
         "finished": status != "pending", "n": n})
    conn.execute("VACUUM ANALYZE job_tasks")


def wal(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])


def table_state(conn: psycopg.Connection) -> dict:
    time.sleep(1.2)  # backends flush their table statistics at most once a second
    size, dead, live = conn.execute(
        "SELECT pg_total_relation_size('job_tasks'), n_dead_tup, n_live_tup"
        "  FROM pg_stat_user_tables WHERE relname = 'job_tasks'").fetchone()
    return {"total_bytes": size, "dead_tuples": dead, "live_tuples": live}


def claim(conn: psycopg.Connection, acks: list, limit: int, delete_acked: bool) -> list:
    """One transport_claim: acks ``acks``, claims up to ``limit``; the rows claimed."""
    token = uuid.uuid4()
    rows = conn.execute(queries["transport_claim"], {
        "ack_ids": [row_id for row_id, _ in acks], "ack_tokens": [t for _, t in acks],
        "delete_acked": delete_acked, "worker_id": "bench", "lease_token": token,
        "lease": "60 seconds", "queue": QUEUE, "limit": limit,
    }).fetchall()
    return [(row[1], token) for row in rows if row[0]]


def drain(conn: psycopg.Connection, delete_acked: bool) -> int:
    """Claim and ack every pending message, BATCH at a time; how many."""
    acks: list = []
    done = 0
    while True:
        claimed = claim(conn, acks, BATCH, delete_acked)
        done += len(acks)
        if not claimed and not acks:
            return done
        acks = claimed


def ack_figures(conn: psycopg.Connection, n: int, delete_acked: bool) -> dict:
    conn.execute("TRUNCATE job_tasks")
    conn.execute("VACUUM job_tasks")
    fill(conn, n)
    wal0, t0 = wal(conn), time.perf_counter()
    drained = drain(conn, delete_acked)
    seconds, acked_wal = time.perf_counter() - t0, wal(conn) - wal0
    after_acks = table_state(conn)
    figures = {"tasks": drained, "ack_seconds": seconds, "ack_wal_bytes": acked_wal}
    wal1, t1 = wal(conn), time.perf_counter()
    deleted = Retention.older_than("0 seconds").run(conn)
    figures.update(retention_seconds=time.perf_counter() - t1,
                   retention_wal_bytes=wal(conn) - wal1, retention_deleted=deleted)
    total_wal = figures["ack_wal_bytes"] + figures["retention_wal_bytes"]
    total_seconds = figures["ack_seconds"] + figures["retention_seconds"]
    figures.update(
        wal_bytes_per_task=total_wal / n, us_per_task=total_seconds / n * 1e6,
        after_acks=after_acks, after_retention=table_state(conn),
    )
    return figures


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


class Claimer(threading.Thread):
    """Claims and acks one message at a time on its own connection, timing each claim."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[tuple[float, float]] = []  # (when, seconds)
        self.stopping = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            acks: list = []
            while not self.stopping.is_set():
                t0 = time.perf_counter()
                acks = claim(conn, acks, 1, True)
                self.samples.append((t0, time.perf_counter() - t0))
                time.sleep(0.005)

    def latency_ms(self, begin: float, end: float) -> dict:
        during = [s * 1000 for t, s in self.samples if begin <= t < end]
        return {"claims": len(during), "p50_ms": percentile(during, 50),
                "p99_ms": percentile(during, 99)}


def pass_figures(conn: psycopg.Connection, url: str, finished: int) -> dict:
    conn.execute("TRUNCATE job_tasks")
    fill(conn, finished, "completed")
    fill(conn, 20_000)  # the claimer's stream, pending beside the finished rows
    state = table_state(conn)
    claimer = Claimer(url)
    claimer.start()
    time.sleep(3)
    wal0, t0 = wal(conn), time.perf_counter()
    deleted = Retention.older_than("1 hour").run(conn)
    t1 = time.perf_counter()
    wal1 = wal(conn)
    time.sleep(3)
    claimer.stopping.set()
    claimer.join()
    return {
        "finished_rows": finished, "deleted": deleted, "before": state,
        "seconds": t1 - t0, "wal_bytes": wal1 - wal0,
        "claim_before": claimer.latency_ms(t0 - 3, t0),
        "claim_during": claimer.latency_ms(t0, t1),
        "after": table_state(conn),
    }


HISTORY = """
CREATE TABLE job_tasks_history (LIKE job_tasks) PARTITION BY RANGE (completed_at);
CREATE TABLE job_tasks_history_yesterday PARTITION OF job_tasks_history
    FOR VALUES FROM (current_date - 1) TO (current_date);
CREATE TABLE job_tasks_history_today PARTITION OF job_tasks_history
    FOR VALUES FROM (current_date) TO (current_date + 1);
CREATE INDEX ON job_tasks_history (task_id);
"""

# The ack of the partition path: the acked rows move to the history table.
ACK_MOVE = """
WITH moved AS (
    DELETE FROM job_tasks t
     USING unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS held(id, lease_token)
     WHERE t.id = held.id AND t.lease_token = held.lease_token
    RETURNING t.*
)
INSERT INTO job_tasks_history
SELECT id, sequence, queue, priority, job_id, user_id, task_type, task_id, payload,
       'completed', attempts, max_attempts, worker_id, NULL, NULL, visible_at, expires_at,
       last_heartbeat, error, result, created_at, now(), claimed_at, started_at, now()
  FROM moved
"""


def partition_figures(conn: psycopg.Connection, url: str, n: int, finished: int) -> dict:
    """The partition path: acked rows move to a day-partitioned history table
    (n tasks: WAL per task), and retention drops a day's partition holding
    ``finished`` rows while a claimer runs."""
    conn.execute("TRUNCATE job_tasks")
    conn.execute("DROP TABLE IF EXISTS job_tasks_history")
    conn.execute(HISTORY)
    columns = [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'job_tasks'::regclass"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum")]
    assert columns[14] == "lease_expires_at" and columns[21] == "updated_at", columns  # ACK_MOVE
    fill(conn, n)
    wal0, t0 = wal(conn), time.perf_counter()
    acks: list = []
    while True:
        if acks:
            conn.execute(ACK_MOVE, {"ids": [i for i, _ in acks], "tokens": [t for _, t in acks]})
        claimed = claim(conn, [], BATCH, True)
        if not claimed and not acks:
            break
        acks = claimed
    figures = {"ack_seconds": time.perf_counter() - t0, "ack_wal_bytes": wal(conn) - wal0,
               "moved": conn.execute("SELECT count(*) FROM job_tasks_history").fetchone()[0]}
    figures["wal_bytes_per_task"] = figures["ack_wal_bytes"] / n
    conn.execute("TRUNCATE job_tasks, job_tasks_history")
    fill(conn, finished, "completed")
    conn.execute("INSERT INTO job_tasks_history SELECT * FROM job_tasks")
    conn.execute("TRUNCATE job_tasks")
    fill(conn, 20_000)
    before = conn.execute("SELECT pg_total_relation_size('job_tasks_history_yesterday')"
                          ).fetchone()[0]
    claimer = Claimer(url)
    claimer.start()
    time.sleep(3)
    wal0, t0 = wal(conn), time.perf_counter()
    conn.execute("ALTER TABLE job_tasks_history DETACH PARTITION job_tasks_history_yesterday")
    conn.execute("DROP TABLE job_tasks_history_yesterday")
    t1 = time.perf_counter()
    wal1 = wal(conn)
    time.sleep(3)
    claimer.stopping.set()
    claimer.join()
    figures["retention_pass_drop"] = {
        "finished_rows": finished, "partition_bytes": before,
        "seconds": t1 - t0, "wal_bytes": wal1 - wal0,
        "claim_before": claimer.latency_ms(t0 - 3, t0),
        "claim_during": claimer.latency_ms(t0, t1),
    }
    conn.execute("DROP TABLE job_tasks_history")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pg-server", default=DEFAULT_SERVER)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--finished", type=int, default=100_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with psycopg.connect(args.pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(DATABASE)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    url = with_database(args.pg_server, DATABASE)
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        results = {
            "server": version, "tasks": args.tasks,
            "ack_deletes": ack_figures(conn, args.tasks, True),
            "ack_completes_then_retention": ack_figures(conn, args.tasks, False),
        }
        if args.finished:
            results["retention_pass_delete"] = pass_figures(conn, url, args.finished)
            results["partition_path"] = partition_figures(conn, url, args.tasks, args.finished)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
