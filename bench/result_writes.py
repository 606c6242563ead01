"""What one stored result costs the database: a ``task_results`` row (the
``pgbroker://`` backend's design) against the task's own ``job_tasks`` row.

``python -m bench.result_writes [--pg-server URL] [-n 3000]`` creates a
scratch database on the server, migrates it, and writes ``n`` results of a
typical size (an ``add`` task's meta with ``result_extended``) each way, one
autocommit statement per result as a worker does:

- ``task_results``: the backend's ``result_set`` statement (upsert, no
  overwrite of a SUCCESS, NOTIFY), with ``synchronous_commit`` on and off;
- ``job_tasks``: ``UPDATE job_tasks SET result = … WHERE task_id = …`` on a
  held row (found through the task_id index), plus the same NOTIFY.

Per write: the client's wall time, the server backend's CPU (from /proc: the
server must run on this machine) and the WAL it wrote. Prints a table and
writes ``bench/results/result-writes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg
from psycopg import sql

from pg_broker.database import with_database
from pg_broker.migrate import migrate
from pg_broker.queries import queries

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULTS_DIR = Path(__file__).with_name("results")
JOB_TASKS_UPDATE = """
WITH written AS (
    UPDATE job_tasks SET result = %(value)s::jsonb
     WHERE task_id = %(task_id)s AND status IN ('claimed', 'processing')
    RETURNING task_id
)
SELECT pg_notify('pgbroker_r_' || md5(task_id), '') FROM written
"""


def meta(task_id: str) -> bytes:
    return json.dumps({
        "status": "SUCCESS", "result": 4, "traceback": None, "children": [],
        "date_done": "2026-11-29T05:00:00.000000+00:00", "task_id": task_id,
        "name": "bench.add", "args": [2, 2], "kwargs": {}, "worker": "celery@bench",
        "retries": 0, "queue": "bench",
    }).encode()


def backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(conn: psycopg.Connection, n: int, write) -> dict:
    pid = conn.info.backend_pid
    lsn_before = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    cpu_before = backend_cpu(pid)
    started = time.perf_counter()
    for i in range(n):
        write(i)
    elapsed = time.perf_counter() - started
    cpu = backend_cpu(pid) - cpu_before
    wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)",
                       (lsn_before,)).fetchone()[0]
    return {"client_us": elapsed / n * 1e6, "server_cpu_us": cpu / n * 1e6,
            "wal_bytes": float(wal) / n}


def run(server: str, n: int) -> dict:
    name = f"pg_broker_bench_results_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(server, name)
    figures = {}
    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            for mode in ("on", "off"):
                conn.execute(queries["result_session_commit"], {"mode": mode})
                ids = [str(uuid.uuid4()) for _ in range(n)]
                figures[f"task_results, synchronous_commit {mode}"] = measure(
                    conn, n, lambda i, ids=ids: conn.execute(queries["result_set"], {
                        "key": f"celery-task-meta-{ids[i]}", "value": meta(ids[i]),
                        "state": "SUCCESS", "expires": timedelta(days=1), "keep_success": True,
                    }))
                held = [str(uuid.uuid4()) for _ in range(n)]
                with conn.transaction():
                    conn.cursor().executemany(
                        "INSERT INTO job_tasks (queue, payload, task_type, task_id, status,"
                        " lease_token, attempts) VALUES ('bench', '{}', 'bench.add', %s,"
                        " 'claimed', gen_random_uuid(), 1)", [(t,) for t in held])
                conn.execute("VACUUM ANALYZE job_tasks")
                figures[f"job_tasks row, synchronous_commit {mode}"] = measure(
                    conn, n, lambda i, held=held: conn.execute(JOB_TASKS_UPDATE, {
                        "task_id": held[i], "value": meta(held[i]).decode(),
                    }))
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                          .format(sql.Identifier(name)))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.result_writes",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-server", default=DEFAULT_SERVER)
    parser.add_argument("-n", type=int, default=3000)
    args = parser.parse_args()
    figures = run(args.pg_server, args.n)
    print(f"{'write':42} {'client µs':>10} {'server CPU µs':>14} {'WAL bytes':>10}")
    for label, f in figures.items():
        print(f"{label:42} {f['client_us']:10.0f} {f['server_cpu_us']:14.0f} {f['wal_bytes']:10.0f}")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / "result-writes.json"
    out.write_text(json.dumps({"n": args.n, "figures": figures}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
