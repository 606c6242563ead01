"""What finished messages cost ``job_tasks``, and what removing them costs.

``python -m bench.retention [--pg-server URL|private] [--tasks 5000] [--finished 100000]``
creates a scratch database on the server (``private``: a PostgreSQL 15 it
starts and removes), migrates it, and measures:

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
- **partition path** (``partitioned_history``, migrations/core/180): the
  workers' cleanup moves ``--finished`` completed rows of finished jobs from
  job_tasks into the day-partitioned job_tasks_history while the claimer
  runs (duration, WAL, claim latency), and the retention pass drops the
  partition holding them once its day is over (the same figures).

WAL bytes are the server's (``pg_current_wal_lsn()`` differences): run it on a
server nobody else writes to (``--pg-server private``).
Prints JSON and writes it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import json
import os
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
    figures = timed_pass(conn, url, lambda: Retention.older_than("1 hour").run(conn))
    figures.update(finished_rows=finished, deleted=figures.pop("result"), before=state,
                   after=table_state(conn))
    return figures


def fill_jobs(conn: psycopg.Connection, n: int, jobs: int = 1000) -> None:
    """n completed rows of ``jobs`` jobs that finished an hour ago (the job
    triggers count them in one statement)."""
    conn.execute("INSERT INTO jobs (status) SELECT 'pending' FROM generate_series(1, %s)",
                 (jobs,))
    conn.execute(
        "INSERT INTO job_tasks (queue, payload, task_type, task_id, status, completed_at, job_id)"
        " SELECT %(queue)s, jsonb_set(%(payload)s, '{headers,id}', to_jsonb(u)), 'bench.noop',"
        "        u, 'completed', now() - interval '1 hour', j.ids[1 + g %% %(jobs)s]"
        "   FROM (SELECT g, gen_random_uuid()::text AS u FROM generate_series(1, %(n)s) g) r,"
        "        (SELECT array_agg(id) AS ids FROM jobs) j",
        {"queue": QUEUE, "payload": Jsonb(envelope()), "n": n, "jobs": jobs})
    conn.execute("UPDATE jobs SET completed_at = now() - interval '1 hour'")
    conn.execute("VACUUM ANALYZE job_tasks")


def timed_pass(conn: psycopg.Connection, url: str, work) -> dict:
    """Run ``work()`` while a claimer claims and acks one message at a time:
    its duration, WAL bytes and the claim latency before and during."""
    claimer = Claimer(url)
    claimer.start()
    time.sleep(3)
    wal0, t0 = wal(conn), time.perf_counter()
    result = work()
    t1 = time.perf_counter()
    wal1 = wal(conn)
    time.sleep(3)
    claimer.stopping.set()
    claimer.join()
    return {"result": result, "seconds": t1 - t0, "wal_bytes": wal1 - wal0,
            "claim_before": claimer.latency_ms(t0 - 3, t0),
            "claim_during": claimer.latency_ms(t0, t1)}


def partition_figures(conn: psycopg.Connection, url: str, finished: int) -> dict:
    """The partition path as built (``partitioned_history``, migrations/core/180):

    - **move**: ``finished`` completed rows of finished jobs leave job_tasks
      for job_tasks_history (``Retention(partitioned=True)``, batches of 1,000,
      the workers' statement), while the claimer runs;
    - **drop**: the same rows in a history partition whose day is over, and
      the retention pass that drops it (``pg_broker_move_to_history``).
    """
    conn.execute("TRUNCATE job_tasks, jobs, job_tasks_history CASCADE")
    for (name,) in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'job_tasks_history'::regclass").fetchall():
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
    fill_jobs(conn, finished)
    fill(conn, 20_000)  # the claimer's stream
    before = table_state(conn)
    retention = Retention.older_than("7 days", partitioned=True)
    move = timed_pass(conn, url, lambda: retention.run(conn))
    move.update(finished_rows=finished, moved=move.pop("result"), before=before,
                after=table_state(conn),
                history_bytes=conn.execute(
                    "SELECT sum(pg_total_relation_size(inhrelid))::bigint FROM pg_inherits"
                    " WHERE inhparent = 'job_tasks_history'::regclass").fetchone()[0])
    # The same rows in a partition whose day is over: what retention drops.
    conn.execute("CREATE TABLE job_tasks_history_p20000101 PARTITION OF job_tasks_history"
                 " FOR VALUES FROM ('2000-01-01 00:00+00') TO ('2000-01-02 00:00+00')")
    columns = sql.SQL(", ").join(sql.Identifier(c) for (c,) in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'job_tasks_history'::regclass"
        " AND attnum > 0 AND NOT attisdropped AND attname <> 'purge_after' ORDER BY attnum"))
    conn.execute(sql.SQL(
        "WITH moved AS (DELETE FROM job_tasks_history RETURNING {columns})"
        " INSERT INTO job_tasks_history ({columns}, purge_after)"
        " SELECT {columns}, '2000-01-01 12:00+00' FROM moved").format(columns=columns))
    conn.execute("CHECKPOINT")
    partition_bytes = conn.execute(
        "SELECT pg_total_relation_size('job_tasks_history_p20000101')").fetchone()[0]
    drop = timed_pass(conn, url, lambda: conn.execute(
        "SELECT * FROM pg_broker_move_to_history('7 days', 1000)").fetchone())
    drop.update(finished_rows=finished, partition_bytes=partition_bytes,
                moved_and_dropped=drop.pop("result"))
    return {"move": move, "retention_pass_drop": drop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pg-server", default=DEFAULT_SERVER,
                        help="maintenance URL of the server, or 'private': a PostgreSQL 15 "
                             "started for the run (initdb in a temporary directory, "
                             "shared_buffers 128MB, autovacuum on), so WAL is the run's alone")
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--finished", type=int, default=100_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    server = None
    if args.pg_server == "private":
        from tests.chaos.servers import PostgresServer

        server = PostgresServer("retention")
        server.settings["shared_buffers"] = "128MB"
        server.start()
        args.pg_server = server.url()
    try:
        results = measure(args.pg_server, args.tasks, args.finished)
    finally:
        if server is not None:
            server.destroy()
    results["load_average"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def measure(server_url: str, tasks: int, finished: int) -> dict:
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(DATABASE)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    url = with_database(server_url, DATABASE)
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        results = {
            "server": version, "tasks": tasks,
            "ack_deletes": ack_figures(conn, tasks, True),
            "ack_completes_then_retention": ack_figures(conn, tasks, False),
        }
        if finished:
            results["retention_pass_delete"] = pass_figures(conn, url, finished)
            results["partition_path"] = partition_figures(conn, url, finished)
    return results


if __name__ == "__main__":
    main()
