"""``python -m bench.listeners``: the "many listeners" figure (issue 12).

PostgreSQL (up to 18) signals every LISTENing session of a database on each
NOTIFY, so what a wake-up costs grows with the consumers that merely listen.
This figure runs two real Celery workers (solo pool each) on one queue and
adds 0, 50, 200 and 500 idle consumers on other queues, then measures:

- throughput under load: the workers have a backlog throughout. Both are
  held by a task waiting on a gate file while the tasks are published
  (``BATCH`` per transaction, ``enqueue_in``); from the gate's opening to
  the start of the last task. On this 2-core machine no producer process
  outpaces two workers for long (a head start of a tenth, the rest
  published in batches meanwhile, left 50 — the last batch — when the last
  publish returned: the workers ran dry between batches), so the backlog is
  published first. In that run: notifications per task, database CPU per
  task (every process of the server), WAL bytes per task;
- the same, paced: a ``delay()`` loop (``confirm_publish=False``, one
  message at a time) with no head start. On this 2-core machine it is no
  faster than the two workers, so they run dry and wait between its tasks,
  and each wait is worth one notification: the idle case at a high rate,
  not load;
- publish -> start latency on the idle workers (one task at a time, with a
  pause), and the notifications it took;
- what one NOTIFY costs the server with that many listeners (a session
  notifying a channel nobody listens to, autocommit), and the server's
  memory (PSS of all its processes): inputs of the README's capacity model.

It starts a private PostgreSQL 15 (``tests.chaos.servers``: initdb on a free
port, ``max_connections`` raised for 500 idle sessions; never the shared
server) and stops it at the end. An idle consumer here is what the database
sees of one: a session LISTENing on its queue's channel, recorded as waiting
there when the server has ``pg_broker_wait`` (migrations/core/131), as an
idle pg_broker consumer is. (A real idle worker adds a work connection and a
safety poll a second: "idle worker" rows of ``python -m bench``.)
Notifications sent to the measured queue's consumers are counted by one
more session LISTENing on the queue's channel and on each worker's own
channel (migrations/core/140: a publish notifies one waiting consumer
there), read from the workers' records in ``broker_waiters``.
Small sizes: a run takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

from bench.app import TASK_NAME, make_app
from bench.workers import Worker, install_cleanup, stop_all
from pg_broker.migrate import migrate
from pg_broker.transport import confirm_publishes, enqueue_in
from pg_broker.transport.listener import channel_name
from pg_broker.urls import broker_url, libpq_url
from tests.chaos.servers import PostgresServer

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUEUE = "bench.listeners"
DATABASE = "pg_broker_listeners"
WORKERS = 2
READY_TIMEOUT = 90.0
POLL = 0.002
BATCH = 50  # tasks per transaction of the producer under load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.listeners", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--idle", default="0,50,200,500",
                        help="idle consumers per step, comma-separated (default 0,50,200,500)")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per throughput run")
    parser.add_argument("--latency-samples", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved repeats of the steps (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--no-vacuum", dest="vacuum", action="store_false",
                        help="do not VACUUM job_tasks before each throughput run (by default "
                             "every run starts from the same table: the dead row versions of "
                             "the runs before it vacuumed away, whenever autovacuum and the "
                             "workers' own vacuum last ran)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    levels = [int(n) for n in args.idle.split(",")]
    install_cleanup()

    server = PostgresServer("listeners")
    server.settings.update({
        "max_connections": str(max(levels) + 100),
        # What each step's database time went to, per statement (statements
        # inside pg_broker's functions too: the claim is one).
        "shared_preload_libraries": "'pg_stat_statements'",
        "pg_stat_statements.track": "all",
        "pg_stat_statements.track_planning": "on",
    })
    server.start()
    workdir = Path(tempfile.mkdtemp(prefix="pg_broker_listeners_"))
    workers: list[Worker] = []
    try:
        database_url = server.create_database(DATABASE)
        migrate(database_url)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        url = broker_url(database_url)
        workers = [Worker(broker="pgbroker", role=f"solo{n}", pool="solo", concurrency=1,
                          queue=QUEUE, mark_file=workdir / f"worker{n}.marks",
                          log_file=workdir / f"worker{n}.log") for n in range(WORKERS)]
        env = {k: v for k, v in os.environ.items() if k not in ("PG_BROKER_URL", "DATABASE_URL")}
        for worker in workers:
            worker.start(url, env, "{}")
        app = make_app(url)
        loading = make_app(url, {"confirm_publish": False})
        _wait_ready(app, workers)
        postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
        with psycopg.connect(database_url, autocommit=True) as counter:
            counter.execute(f'LISTEN "{channel_name(QUEUE)}"')
            _listen_to_workers(counter)
            steps = []
            for repeat in range(args.repeats):
                for idle in levels:
                    step = _step(app, loading, database_url, workers, counter, postmaster,
                                 idle, args.tasks, args.latency_samples,
                                 workdir / "gate", args.vacuum)
                    step["repeat"] = repeat
                    steps.append(step)
                    print(_line(step), flush=True)
        app.close()
        loading.close()
    finally:
        stop_all(workers)
        server.destroy()
    result = {
        "figure": "many listeners",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": list(psutil.getloadavg())},
        "server": "private PostgreSQL 15 (tests.chaos.servers), fsync on",
        "workers": f"{WORKERS} celery workers, solo pool, prefetch 4, one queue",
        "producers": "latency: confirmed publishes (the default); throughput: "
                     "under load: all published first, 50 per transaction, while the workers "
                     "are held by a gate; paced: confirm_publish=False one at a time",
        "tasks": args.tasks, "latency_samples": args.latency_samples,
        "steps": steps, "summary": _summary(steps),
    }
    out = args.out or RESULTS_DIR / f"listeners-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result["summary"]))
    print(f"written to {out}")
    return 0


def _wait_ready(app, workers: list[Worker]) -> None:
    """Both workers took a task (published one at a time until each has)."""
    task = app.tasks[TASK_NAME]
    deadline = time.monotonic() + READY_TIMEOUT
    while not all(w.mark_count() for w in workers):
        if time.monotonic() > deadline:
            raise RuntimeError("a worker ran no task:\n" + "\n".join(
                w.log_tail() for w in workers if not w.mark_count()))
        task.apply_async((0.0,), queue=QUEUE)
        time.sleep(0.05)
    time.sleep(0.5)
    for worker in workers:
        worker.clear_marks()


def _idle_consumers(database_url: str, count: int) -> list[psycopg.Connection]:
    """``count`` sessions, each LISTENing on a queue of its own and recorded as
    waiting there (where the schema knows waiters)."""
    sessions = []
    for n in range(count):
        conn = psycopg.connect(database_url, autocommit=True)
        queue = f"bench.idle.{n}"
        conn.execute(f'LISTEN "{channel_name(queue)}"')
        if conn.execute("SELECT to_regprocedure('pg_broker_wait(text, uuid)')").fetchone()[0]:
            conn.execute("SELECT pg_broker_wait(%s, %s)", (queue, uuid.uuid4()))
        sessions.append(conn)
    return sessions


def _server_cpu(postmaster: int) -> float:
    """CPU seconds so far of the server: the postmaster, every child, and the
    children that exited (reaped by the postmaster: a session closed during
    a measurement, as idle connections close after IDLE_CLOSE, took its CPU
    time out of the sum of the live ones)."""
    parent = psutil.Process(postmaster)
    times = parent.cpu_times()
    total = times.children_user + times.children_system
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _notifications(counter: psycopg.Connection) -> int:
    """Notifications since the last call (see the module's docstring)."""
    heard = len(list(counter.notifies(timeout=0.05)))
    _listen_to_workers(counter)
    return heard


def _listen_to_workers(counter: psycopg.Connection) -> None:
    """LISTEN on the own channels of the workers that wait on the queue."""
    for (channel,) in counter.execute(
            "SELECT DISTINCT channel FROM broker_waiters WHERE queue = %s AND channel IS NOT NULL",
            (QUEUE,)).fetchall():
        counter.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))


def _marks(workers: list[Worker]) -> list[tuple[float, float]]:
    return [mark for worker in workers for mark in worker.marks()]


def _step(app, loading, database_url: str, workers: list[Worker], counter: psycopg.Connection,
          postmaster: int, idle: int, tasks: int, samples: int, gate: Path,
          vacuum: bool) -> dict:
    sessions = _idle_consumers(database_url, idle)
    try:
        time.sleep(1.0)  # the workers settle into waiting
        _notifications(counter)
        latency = _latency(app, workers, counter, samples)
        throughput = _throughput(loading, workers, counter, postmaster, tasks, gate, vacuum)
        paced = _throughput(loading, workers, counter, postmaster, tasks, None, vacuum)
        costs = _notify_cost(database_url, postmaster)
        memory = _server_memory_mb(postmaster)
    finally:
        for conn in sessions:
            conn.close()
    return {"idle_consumers": idle, **latency, **throughput, **paced, **costs,
            "server_memory_mb": memory}


def _notify_cost(database_url: str, postmaster: int, count: int = 1000) -> dict:
    """Server CPU and rate of ``count`` notifications on a channel nobody
    listens to, one autocommit statement each."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify('bench_nobody', '')")
        cpu_before, t0 = _server_cpu(postmaster), time.perf_counter()
        for _ in range(count):
            conn.execute("SELECT pg_notify('bench_nobody', '')")
        elapsed, cpu = time.perf_counter() - t0, _server_cpu(postmaster) - cpu_before
    return {"notify_server_cpu_us": cpu / count * 1e6, "notifies_per_second": count / elapsed}


def _server_memory_mb(postmaster: int) -> float:
    """Proportional set size of the server's processes (shared memory counted once)."""
    parent = psutil.Process(postmaster)
    total = 0
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def _latency(app, workers: list[Worker], counter: psycopg.Connection, samples: int) -> dict:
    task = app.tasks[TASK_NAME]
    for worker in workers:
        worker.clear_marks()
    for i in range(samples):
        task.apply_async((time.time(),), queue=QUEUE)
        deadline = time.monotonic() + 10
        while sum(w.mark_count() for w in workers) <= i and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(random.uniform(0.01, 0.03))  # the workers go idle again
    delays = sorted((started - sent) * 1e3 for sent, started in _marks(workers))
    notified = _notifications(counter)
    return {
        "latency_p50_ms": _percentile(delays, 50),
        "latency_p99_ms": _percentile(delays, 99),
        "latency_samples": len(delays),
        "notifications_per_task_idle": notified / max(len(delays), 1),
    }


def _hold(app, workers: list[Worker], gate: Path) -> int:
    """Hold every worker on a task waiting for ``gate`` (marked with sent =
    -1); how many such tasks were sent (a worker may have prefetched two)."""
    gate.touch()
    task = app.tasks[TASK_NAME]
    sent = 0
    deadline = time.monotonic() + READY_TIMEOUT
    while not all(w.mark_count() for w in workers):
        if time.monotonic() > deadline:
            raise RuntimeError("a worker took no gated task")
        task.apply_async((-1.0, str(gate)), queue=QUEUE)
        sent += 1
        time.sleep(0.05)
    return sent


def _publish_batches(task, count: int) -> None:
    """``count`` tasks, ``BATCH`` per transaction."""
    with psycopg.connect(libpq_url(task.app.conf.broker_url)) as conn:
        for first in range(0, count, BATCH):
            with conn.transaction(), enqueue_in(conn):
                for _ in range(min(BATCH, count - first)):
                    task.apply_async((0.0,), queue=QUEUE)


def _throughput(app, workers: list[Worker], counter: psycopg.Connection, postmaster: int,
                tasks: int, gate: Path | None, vacuum: bool) -> dict:
    """``tasks`` tasks end to end. With ``gate``: under load (published
    while the workers are held, see the module's docstring); without: paced.
    With ``vacuum``, the table is vacuumed first (see ``--no-vacuum``)."""
    task = app.tasks[TASK_NAME]
    for worker in workers:
        worker.clear_marks()
    if vacuum:
        with psycopg.connect(_database_url_of(app), autocommit=True) as conn:
            conn.execute("VACUUM job_tasks")
    held = _hold(app, workers, gate) if gate is not None else 0
    if gate is not None:
        _publish_batches(task, tasks)
    _notifications(counter)
    with psycopg.connect(_database_url_of(app), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
        table_before = _table_state(conn)
    cpu_before = _server_cpu(postmaster)
    with psycopg.connect(_database_url_of(app), autocommit=True) as conn:
        wal_before = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    t0 = time.time()
    if gate is None:
        for _ in range(tasks):
            task.apply_async((0.0,), queue=QUEUE)
        confirm_publishes(60)
    else:
        gate.unlink()
    deadline = time.monotonic() + 120
    while sum(w.mark_count() for w in workers) < tasks + held and time.monotonic() < deadline:
        time.sleep(POLL)
    starts = sorted(started for sent, started in _marks(workers) if sent >= 0)
    cpu = _server_cpu(postmaster) - cpu_before
    with psycopg.connect(_database_url_of(app), autocommit=True) as conn:
        wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)",
                           (wal_before,)).fetchone()[0]
        statements = _statements(conn)
        table_after = _table_state(conn)
    notified = _notifications(counter)
    done = len(starts)
    suffix = "" if gate is not None else "_paced"
    return {
        f"statements{suffix}": statements,
        f"table{suffix}": {"before": table_before, "after": table_after},
        f"throughput{suffix}": done / max((starts[-1] if starts else time.time()) - t0, 1e-9),
        f"done{suffix}": done,
        f"notifications_per_task{suffix}": notified / max(done, 1),
        f"database_cpu_ms_per_task{suffix}": cpu / max(done, 1) * 1e3,
        f"wal_bytes_per_task{suffix}": float(wal) / max(done, 1),
    }


def _statements(conn: psycopg.Connection, limit: int = 8) -> list[dict]:
    """The statements that took the most server time since the reset (the
    run's), with their calls and mean times: what a slow run spent on."""
    rows = conn.execute(
        "SELECT calls, total_exec_time, total_plan_time, rows, toplevel,"
        " left(regexp_replace(query, '\\s+', ' ', 'g'), 160)"
        " FROM pg_stat_statements WHERE query NOT LIKE '%%pg_stat_statements%%'"
        " ORDER BY total_exec_time + total_plan_time DESC LIMIT %s", (limit,)).fetchall()
    return [{"calls": calls, "exec_ms": round(exec_ms, 2), "plan_ms": round(plan_ms, 2),
             "mean_ms": round((exec_ms + plan_ms) / max(calls, 1), 4), "rows": n,
             "toplevel": top, "query": query}
            for calls, exec_ms, plan_ms, n, top, query in rows]


def _table_state(conn: psycopg.Connection) -> dict:
    """job_tasks' live and dead row versions and its vacuums so far."""
    live, dead, vacuums, autovacuums = conn.execute(
        "SELECT n_live_tup, n_dead_tup, vacuum_count, autovacuum_count"
        " FROM pg_stat_user_tables WHERE relname = 'job_tasks'").fetchone()
    return {"live": live, "dead": dead, "vacuums": vacuums, "autovacuums": autovacuums}


def _database_url_of(app) -> str:
    return libpq_url(app.conf.broker_url)


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(round(pct / 100 * (len(values) - 1))))]


FIGURES = ("throughput", "latency_p50_ms", "latency_p99_ms", "notifications_per_task",
           "notifications_per_task_idle", "database_cpu_ms_per_task", "wal_bytes_per_task",
           "throughput_paced", "notifications_per_task_paced",
           "database_cpu_ms_per_task_paced", "notify_server_cpu_us", "notifies_per_second",
           "server_memory_mb")


def _summary(steps: list[dict]) -> list[dict]:
    """Per idle level: the median of each figure over the repeats, and
    throughput as a ratio to the level without idle consumers."""
    levels = sorted({s["idle_consumers"] for s in steps})
    rows = []
    for level in levels:
        of_level = [s for s in steps if s["idle_consumers"] == level]
        row = {"idle_consumers": level}
        for figure in FIGURES:
            values = sorted(s[figure] for s in of_level if s[figure] is not None)
            row[figure] = values[len(values) // 2] if values else None
        rows.append(row)
    none = rows[0] if rows and rows[0]["idle_consumers"] == 0 else None
    for row in rows:
        for figure in ("throughput", "throughput_paced"):
            row[f"{figure}_ratio"] = row[figure] / none[figure] if none else None
    return rows


def _line(step: dict) -> str:
    return (f"idle {step['idle_consumers']:>4}: {step['throughput']:7.0f} tasks/s under load, "
            f"{step['throughput_paced']:.0f} paced, "
            f"p50 {step['latency_p50_ms']:.1f} ms, p99 {step['latency_p99_ms']:.1f} ms, "
            f"{step['notifications_per_task']:.3f} notifications/task under load "
            f"({step['notifications_per_task_paced']:.3f} paced, "
            f"{step['notifications_per_task_idle']:.2f} idle), "
            f"{step['database_cpu_ms_per_task']:.2f} ms database CPU/task, "
            f"{step['wal_bytes_per_task']:.0f} WAL bytes/task; a NOTIFY "
            f"{step['notify_server_cpu_us']:.0f} µs of server CPU "
            f"({step['notifies_per_second']:.0f}/s); server {step['server_memory_mb']:.0f} MiB; "
            f"under load the dearest statement {_dearest(step['statements'])}, "
            f"dead row versions {step['table']['before']['dead']} -> "
            f"{step['table']['after']['dead']}")


def _dearest(statements: list[dict]) -> str:
    if not statements:
        return "none"
    top = statements[0]
    return f"{top['mean_ms']:.3f} ms x {top['calls']} ({top['query'][:60]!r})"


def _table(rows: list[dict]) -> str:
    header = ("| idle consumers | tasks/s, load | ratio to none | notifications/task, load "
              "| database CPU ms/task, load | tasks/s, paced | ratio to none "
              "| notifications/task, paced | database CPU ms/task, paced | p50 ms | p99 ms "
              "| notifications/task, idle "
              "| WAL bytes/task | one NOTIFY: server CPU µs | NOTIFY/s | server MiB |")
    lines = [header, "|" + " --- |" * 16]

    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    for r in rows:
        lines.append(
            f"| {r['idle_consumers']} | {r['throughput']:,.0f} | {ratio(r['throughput_ratio'])} | "
            f"{r['notifications_per_task']:.3f} | {r['database_cpu_ms_per_task']:.2f} | "
            f"{r['throughput_paced']:,.0f} | {ratio(r['throughput_paced_ratio'])} | "
            f"{r['notifications_per_task_paced']:.3f} | "
            f"{r['database_cpu_ms_per_task_paced']:.2f} | "
            f"{r['latency_p50_ms']:.1f} | {r['latency_p99_ms']:.1f} | "
            f"{r['notifications_per_task_idle']:.2f} | {r['wal_bytes_per_task']:,.0f} | "
            f"{r['notify_server_cpu_us']:.0f} | {r['notifies_per_second']:,.0f} | "
            f"{r['server_memory_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
