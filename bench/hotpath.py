"""``python -m bench.hotpath``: what the database spends per message on the hot path.

No Celery, no worker processes: one kombu producer and one kombu consumer
(prefetch 4, acks as Celery sends them) in this process, on a private
PostgreSQL 15 it starts (``tests.chaos.servers``; pg_stat_statements with
track_planning), so the figures are the transport's statements alone:

- ``publish``: N confirmed publishes to a direct exchange's queue (as
  ``delay()`` with task_create_missing_queues sends them), no consumer;
- ``drain``: the consumer takes that backlog;
- ``flow``: a producer thread publishes N while the consumer takes them (the
  shape of the end-to-end figure: the consumer often finds the queue empty,
  records itself as waiting, and is woken);
- ``cycle``: transport_claim alone on one connection, N times: ack the row
  claimed last, claim the next (one row each), on a queue of N + 50 rows with
  100 rows held by another consumer. ``--claim-sql FILE`` runs another text
  of the statement instead (same parameters): how an earlier version of the
  claim compares, measured the same way.

``--transport-options '{"confirm_publish": false}'`` runs the producer and
consumer with those options (pipelined publishes: each publishing phase then
ends once the database confirmed every message).

For each phase: the database backends' CPU per message (/proc, all they do:
parse, plan, execute, commit, network), the whole server's (the background
processes too: the WAL writer flushes what asynchronous commits leave) and pg_stat_statements' execution and
planning time per message by statement. Several rounds, interleaved, medians.
Used to choose between versions of the claim/ack/publish statements; the
end-to-end figures stay ``python -m bench``'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg
from kombu import Connection, Consumer, Exchange, Producer, Queue
from psycopg.types.json import Jsonb

from bench.brokers import Broker, processes_cpu, statement_costs
from pg_broker.migrate import migrate
from pg_broker.queries import queries
from pg_broker.transport.pipeline import confirm_publishes
from pg_broker.urls import broker_url
from tests.chaos.servers import PostgresServer

QUEUE = "bench.hotpath"
DATABASE = "pg_broker_hotpath"
PREFETCH = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url", default=None,
                        help="an existing database with pg_stat_statements loaded "
                             "(default: a private server)")
    parser.add_argument("--claim-sql", type=Path, default=None,
                        help="a file holding another text of transport_claim for the cycle phase")
    parser.add_argument("--transport-options", type=json.loads, default={},
                        help='transport options of the producer and consumer, as JSON '
                             '(\'{"confirm_publish": false}\': pipelined publishes)')
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    claim_sql = args.claim_sql.read_text() if args.claim_sql else queries["transport_claim"]

    server = None
    if args.url is None:
        server = PostgresServer("hotpath")
        server.settings.update({"shared_buffers": "128MB",
                                "shared_preload_libraries": "'pg_stat_statements'",
                                "pg_stat_statements.track_planning": "on"})
        server.start()
        database_url = server.create_database(DATABASE)
    else:
        database_url = args.url
    try:
        migrate(database_url)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        from pg_broker.database import with_database

        broker = Broker("pgbroker", broker_url(database_url), "", database_url=database_url,
                        admin_url=with_database(database_url, "postgres"), has_statements=True)
        rounds = [dict(run_round(broker, args.messages, args.transport_options),
                       cycle=claim_cycle(broker, args.messages, claim_sql))
                  for _ in range(args.rounds)]
    finally:
        if server is not None:
            server.destroy()
    summary = summarise(rounds)
    print(table(summary))
    if args.out:
        args.out.write_text(json.dumps({"messages": args.messages, "rounds": rounds,
                                        "summary": summary}, indent=2) + "\n")
    return 0


def run_round(broker: Broker, n: int, options: dict) -> dict:
    exchange = Exchange(QUEUE, type="direct")
    queue = Queue(QUEUE, exchange, routing_key=QUEUE)
    body = {"args": [0.0], "kwargs": {}}
    with Connection(broker.url, transport_options=options) as conn:
        producer = Producer(conn.channel())
        queue.bind(producer.channel).declare()

        def publish(count: int) -> None:
            for _ in range(count):
                producer.publish(body, exchange=exchange, routing_key=QUEUE,
                                 delivery_mode=2, headers={"task": "bench.noop"})
            confirm_publishes()  # pipelined ones: until the database confirmed them

        phases = {}
        phases["publish"] = measured(broker, n, lambda: publish(n))
        with Connection(broker.url, transport_options=options) as consuming:
            phases["drain"] = measured(broker, n, lambda: consume(consuming, queue, n))

            def flow() -> None:
                with Connection(broker.url, transport_options=options) as producing:
                    other = Producer(producing.channel())
                    thread = threading.Thread(target=lambda: [
                        other.publish(body, exchange=exchange, routing_key=QUEUE,
                                      delivery_mode=2, headers={"task": "bench.noop"})
                        for _ in range(n)])
                    thread.start()
                    consume(consuming, queue, n)
                    thread.join()
                    confirm_publishes()

            phases["flow"] = measured(broker, n, flow)
    return phases


def claim_cycle(broker: Broker, n: int, claim_sql: str) -> dict:
    """transport_claim alone, n times on one connection: ack the last row, claim the next."""
    with psycopg.connect(broker.database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE job_tasks")
        conn.execute("INSERT INTO job_tasks (queue, payload, task_type, task_id)"
                     " SELECT 'bench.cycle', %s, 'bench.noop', g::text"
                     " FROM generate_series(1, %s) g", (Jsonb(CYCLE_PAYLOAD), n + 150))
        conn.execute("ANALYZE job_tasks")
        conn.execute("UPDATE job_tasks SET status = 'claimed', worker_id = 'other',"
                     " lease_token = gen_random_uuid(), lease_expires_at = now() + interval '1 hour'"
                     " WHERE id IN (SELECT id FROM job_tasks ORDER BY id DESC LIMIT 100)")
        held: list[tuple[int, uuid.UUID]] = []

        def step() -> None:
            nonlocal held
            token = uuid.uuid4()
            rows = conn.execute(claim_sql, {
                "queue": "bench.cycle", "limit": 1, "worker_id": "bench", "lease_token": token,
                "lease": timedelta(minutes=1), "delete_acked": True,
                "ack_ids": [row_id for row_id, _ in held],
                "ack_tokens": [lease for _, lease in held]}).fetchall()
            held = [(row[1], token) for row in rows if row[0]]

        return measured(broker, n, lambda: [step() for _ in range(n)])


CYCLE_PAYLOAD = {"body": "W1swLjBdLCB7fSwge31d", "headers": {"task": "bench.noop"}}


def consume(conn: Connection, queue: Queue, n: int) -> None:
    received = 0

    def on_message(body, message) -> None:
        nonlocal received
        received += 1
        message.ack()

    with Consumer(conn, [queue], callbacks=[on_message], prefetch_count=PREFETCH):
        while received < n:
            conn.drain_events(timeout=30)


def measured(broker: Broker, n: int, action) -> dict:
    cpu_before = broker.server_cpu()
    all_before = server_processes_cpu(broker)
    statements_before = broker.statement_totals()
    started = time.perf_counter()
    action()
    elapsed = time.perf_counter() - started
    cpu_after = broker.server_cpu()
    all_after = server_processes_cpu(broker)
    cpu = sum(t - cpu_before.get(pid, 0.0) for pid, t in cpu_after.items())
    server = sum(t - all_before.get(pid, 0.0) for pid, t in all_after.items())
    statements = statement_costs(statements_before, broker.statement_totals(), n)
    return {
        "per_s": n / elapsed,
        "backend_cpu_ms": cpu / n * 1e3,
        "server_cpu_ms": server / n * 1e3,
        "exec_ms": sum(s["exec_ms_per_task"] for s in statements),
        "plan_ms": sum(s["plan_ms_per_task"] for s in statements),
        "statements": statements,
    }


def server_processes_cpu(broker: Broker) -> dict[int, float]:
    """CPU seconds so far of every process of the server (its own, in this
    tool: backends of any database and the background ones — the WAL
    writer flushes what asynchronous commits left), by pid."""
    with psycopg.connect(broker.admin_url, autocommit=True) as conn:
        pids = [row[0] for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()")]
    return processes_cpu(pids)


def summarise(rounds: list[dict]) -> dict:
    out = {}
    for phase in rounds[0]:
        runs = [r[phase] for r in rounds]
        by_name: dict[str, list] = {}
        for run in runs:
            for s in run["statements"]:
                by_name.setdefault(s["statement"], []).append(s)
        out[phase] = {
            key: statistics.median(r[key] for r in runs)
            for key in ("per_s", "backend_cpu_ms", "server_cpu_ms", "exec_ms", "plan_ms")
        }
        out[phase]["statements"] = {
            name: {key: statistics.median(s[key] for s in found)
                   for key in ("calls_per_task", "exec_ms_per_call", "plan_ms_per_call",
                               "exec_ms_per_task", "plan_ms_per_task")}
            for name, found in by_name.items()
        }
    return out


def table(summary: dict) -> str:
    lines = []
    for phase, data in summary.items():
        lines.append(f"{phase}: {data['per_s']:,.0f} msg/s, backend CPU {data['backend_cpu_ms']:.3f}"
                     f" ms/msg (whole server {data['server_cpu_ms']:.3f}), exec {data['exec_ms']:.3f} + plan {data['plan_ms']:.3f} ms/msg")
        rows = sorted(data["statements"].items(),
                      key=lambda kv: -(kv[1]["exec_ms_per_task"] + kv[1]["plan_ms_per_task"]))
        for name, s in rows[:8]:
            lines.append(f"  {name[:40]:<40} calls/msg {s['calls_per_task']:5.2f}  per call: "
                         f"exec {s['exec_ms_per_call']:.3f} plan {s['plan_ms_per_call']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
