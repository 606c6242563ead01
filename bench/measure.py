"""One function per figure. Each takes a broker's producer app and workers and
returns plain numbers; the runner decides when to call it and collects them.

Completion is read from the workers' mark files (see :mod:`bench.app`), never
through the broker under test, so every broker is timed the same way: from
the first publish to the start of the last task (a no-op finishes within
microseconds of its start).
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass

from celery import Celery, chord, group
from celery.result import ResultSet

from bench.app import ECHO_TASK, TASK_NAME, TOTAL_TASK
from bench.brokers import Broker, statement_costs
from bench.flower import Flower, dashboard_open
from bench.workers import Worker

log = logging.getLogger(__name__)

POLL = 0.002  # seconds between looks at a mark file
# task-received, task-started, task-succeeded: what a -E worker sends per task.
EVENTS_PER_TASK = 3
EVENTS_GRACE = 3.0  # seconds Flower may take to count the last events of a run


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does (``--quick`` and full presets in __main__)."""

    enqueue: int  # delay() loop
    bulk: int  # signatures in one group; also the transactional batch
    throughput: int  # tasks per end-to-end run (each pool, and with events)
    latency_samples: int
    drain: int  # backlog a freshly started solo worker consumes (0: not measured)
    endurance: int
    idle_seconds: float  # one idle-worker window
    # Wait before the idle windows: a busy backend may flush its counters to
    # pg_stat_database up to ~10 s late (PostgreSQL's idle-flush retry).
    stats_settle: float
    cap: float  # seconds after which a run stops waiting and reports what it got
    latency_cap: float
    endurance_cap: float
    # The result-backend figures: request/response samples, a chord's header,
    # results awaited at once by one process, and the cap of each of them.
    results_samples: int
    chord: int
    at_once: int
    results_cap: float


def enqueue_delay(app: Celery, n: int) -> dict:
    """delay() in a loop, one process, the way application code publishes."""
    task = app.tasks[TASK_NAME]
    task.delay(0.0)  # connect and declare outside the timed loop
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        task.delay(0.0)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"enqueue_delay": n / elapsed, "producer_cpu_us_per_delay": cpu / n * 1e6}


def enqueue_group(app: Celery, n: int) -> dict:
    """One group of n signatures, published with apply_async()."""
    task = app.tasks[TASK_NAME]
    signatures = group(task.s(0.0) for _ in range(n))
    t0 = time.perf_counter()
    signatures.apply_async()
    return {"enqueue_group": n / (time.perf_counter() - t0)}


def enqueue_transactional(app: Celery, broker: Broker, n: int) -> dict:
    """pg_broker's own path: n delay() calls inside one caller transaction."""
    import psycopg

    from pg_broker.transport import enqueue_in

    task = app.tasks[TASK_NAME]
    with psycopg.connect(broker.database_url) as conn:
        with conn.transaction(), enqueue_in(conn):
            task.delay(0.0)  # warm-up inside a transaction that commits with the rest
        t0 = time.perf_counter()
        with conn.transaction(), enqueue_in(conn):
            for _ in range(n):
                task.delay(0.0)
        elapsed = time.perf_counter() - t0
    return {"enqueue_transactional": n / elapsed}


def run_tasks(app: Celery, broker: Broker, worker: Worker, n: int, cap: float,
              task_name: str = TASK_NAME, progress: dict | None = None) -> dict:
    """Publish n no-op tasks to a running worker's queue; time first publish -> last start.

    Stops publishing and waiting after ``cap`` seconds; the figure is then what
    completed over the time spent, flagged ``capped``. ``published_at`` holds
    the time each tenth of the tasks had been published; ``progress["published"]``,
    when given, follows the count every 64 publishes.
    """
    task = app.tasks[task_name]
    worker.clear_marks()
    cpu_before = worker.cpu_seconds()
    server_before = broker.server_cpu()
    statements_before = broker.statement_totals()
    producer_before = time.process_time()
    tenth = max(n // 10, 1)
    published_at = []
    t0 = time.time()
    published = 0
    for _ in range(n):
        task.apply_async((0.0,), queue=worker.queue)
        published += 1
        if published % tenth == 0:
            published_at.append(time.time())
        if published % 64 == 0:
            if progress is not None:
                progress["published"] = published
            if time.time() - t0 > cap:
                break
    while worker.mark_count() < published and time.time() - t0 < cap:
        time.sleep(POLL)
    starts = sorted(started for _, started in worker.marks())
    done = len(starts)
    capped = done < n
    end = time.time() if capped or not starts else starts[-1]
    elapsed = max(end - t0, 1e-9)
    cpu = worker.cpu_seconds() - cpu_before
    producer_cpu = time.process_time() - producer_before
    server_after = broker.server_cpu()
    server_cpu = sum(t - server_before.get(pid, 0.0) for pid, t in server_after.items())
    statements = (statement_costs(statements_before, broker.statement_totals(), done)
                  if done and broker.has_statements else [])
    return {
        "statements": statements,
        "throughput": done / elapsed,
        "done": done,
        "published": published,
        "capped": capped,
        "elapsed": elapsed,
        "starts": starts,
        "t0": t0,
        "published_at": published_at,
        "worker_cpu_ms_per_task": cpu / done * 1e3 if done else None,
        "producer_cpu_ms_per_task": producer_cpu / done * 1e3 if done else None,
        "broker_cpu_ms_per_task": server_cpu / done * 1e3 if done and server_after else None,
    }


def throughput(app: Celery, broker: Broker, worker: Worker, n: int, cap: float) -> dict:
    run = run_tasks(app, broker, worker, n, cap)
    role = worker.role
    figures = {
        f"throughput_{role}": run["throughput"],
        f"rss_{role}_mb": worker.rss_bytes() / 2**20,
        f"worker_cpu_ms_per_task_{role}": run["worker_cpu_ms_per_task"],
        f"producer_cpu_ms_per_task_{role}": run["producer_cpu_ms_per_task"],
        f"broker_cpu_ms_per_task_{role}": run["broker_cpu_ms_per_task"],
        **statement_figures(run["statements"], role),
    }
    return {"figures": figures, "capped": run["capped"]}


def statement_figures(statements: list[dict], role: str) -> dict:
    """Server time per task from pg_stat_statements (where the server has it):
    executing, planning, and the per-statement breakdown (a list: the JSON's
    series)."""
    if not statements:
        return {}
    return {
        f"db_exec_ms_per_task_{role}": sum(s["exec_ms_per_task"] for s in statements),
        f"db_plan_ms_per_task_{role}": sum(s["plan_ms_per_task"] for s in statements),
        f"db_statements_per_task_{role}": sum(s["calls_per_task"] for s in statements),
        f"statements_{role}": statements,
    }


def drain(app: Celery, broker: Broker, worker: Worker, n: int, cap: float) -> dict:
    """Consume rate alone: a solo worker is held by a gated task while n tasks
    are published behind it, then released; from the first of them to start
    to the last. No producer runs while it consumes."""
    task = app.tasks[TASK_NAME]
    gate = worker.mark_file.with_suffix(".gate")
    gate.touch()
    try:
        worker.clear_marks()
        task.apply_async((0.0, str(gate)), queue=worker.queue)
        deadline = time.monotonic() + cap
        while worker.mark_count() < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the gated task did not start")
            time.sleep(POLL)
        for _ in range(n):
            task.apply_async((0.0,), queue=worker.queue)
        server_before = broker.server_cpu()
        statements_before = broker.statement_totals()
    finally:
        gate.unlink(missing_ok=True)
    deadline = time.monotonic() + cap
    while worker.mark_count() < n + 1 and time.monotonic() < deadline:
        time.sleep(POLL)
    server_after = broker.server_cpu()
    starts = sorted(started for _, started in worker.marks())[1:]
    if len(starts) < 2:
        raise RuntimeError("fewer than 2 tasks of the backlog ran")
    server_cpu = sum(t - server_before.get(pid, 0.0) for pid, t in server_after.items())
    statements = (statement_costs(statements_before, broker.statement_totals(), len(starts))
                  if broker.has_statements else [])
    return {
        "figures": {
            "drain_solo": (len(starts) - 1) / max(starts[-1] - starts[0], 1e-9),
            "broker_cpu_ms_per_task_drain": (server_cpu / len(starts) * 1e3
                                             if server_after else None),
            **statement_figures(statements, "drain"),
        },
        "capped": len(starts) < n,
    }


def latency(app: Celery, worker: Worker, samples: int, cap: float) -> dict:
    """publish -> task start on an idle worker: one task at a time, with a pause."""
    task = app.tasks[TASK_NAME]
    worker.clear_marks()
    t_end = time.time() + cap
    for i in range(samples):
        task.apply_async((time.time(),), queue=worker.queue)
        while worker.mark_count() <= i and time.time() < t_end:
            time.sleep(0.0005)
        if time.time() >= t_end:
            break
        time.sleep(random.uniform(0.01, 0.03))  # let the worker go idle again
    delays = sorted((started - sent) * 1e3 for sent, started in worker.marks())
    if not delays:
        raise RuntimeError("no task started within the time cap")
    return {
        "latency_p50_ms": percentile(delays, 50),
        "latency_p95_ms": percentile(delays, 95),
        "latency_p99_ms": percentile(delays, 99),
        "latency_samples": len(delays),
    }


def endurance(app: Celery, broker: Broker, worker: Worker, n: int, cap: float) -> dict:
    """Many tasks through one queue: does the rate hold, and what is left in the table?

    The first and last tenths are windows of the publishing loop (from the
    first publish to the 10% mark, from the 90% mark to the last publish), so
    both are measured with the producer running, and the figure is the number
    of tasks that started inside each window divided by its length. While it
    runs, a thread samples the message tables (sizes, live and dead tuples)
    every ``ENDURANCE_SAMPLE`` seconds: ``endurance_table_over_time``, with
    the tasks published and started by then (their difference is the backlog:
    a table that grows with it is not growing from finished rows).
    """
    progress = {"published": 0}
    sampler = TableSampler(broker, worker, progress)
    sampler.start()
    try:
        run = run_tasks(app, broker, worker, n, cap, progress=progress)
    finally:
        sampler.stop()
    figures = {"endurance_throughput": run["throughput"]}
    marks = run["published_at"]
    if len(marks) >= 10:
        first = _started_between(run["starts"], run["t0"], marks[0])
        last = _started_between(run["starts"], marks[8], marks[9])
        figures["endurance_first10_rate"] = first
        figures["endurance_last10_rate"] = last
        figures["endurance_last_vs_first"] = last / first if first else None
    state = broker.table_state()
    samples = [s for s in sampler.samples if s["t"] >= run["t0"]]
    if state is None:  # no tables (Redis, RabbitMQ): the backlog over time alone
        figures["endurance_table_over_time"] = [
            {**s, "t": round(s["t"] - run["t0"], 1)} for s in samples]
    else:
        figures["endurance_table_mb"] = state["total_bytes"] / 2**20
        figures["endurance_dead_tuples"] = state["dead_tuples"]
        figures["endurance_live_tuples"] = state["live_tuples"]
        tenth = [s for s in samples
                 if len(marks) >= 1 and s["t"] <= marks[0] and "total_bytes" in s]
        if tenth:  # the table after the first tenth of the run against the end
            figures["endurance_table_mb_first10"] = tenth[-1]["total_bytes"] / 2**20
            figures["endurance_table_end_vs_first10"] = (
                state["total_bytes"] / tenth[-1]["total_bytes"])
        figures["endurance_table_over_time"] = [
            {**s, "t": round(s["t"] - run["t0"], 1)} for s in samples] + [
            {**state, "t": round(time.time() - run["t0"], 1), "after_run": True}]
    return {"figures": figures, "capped": run["capped"], "done": run["done"]}


ENDURANCE_SAMPLE = 5.0  # seconds between samples of the message tables


class TableSampler(threading.Thread):
    """Samples a broker's message tables (sizes, live and dead tuples) every
    ``ENDURANCE_SAMPLE`` seconds until stopped; a sample is a dict with its
    wall-clock time ``t`` and the tasks ``published`` and ``started`` by then."""

    def __init__(self, broker: Broker, worker: Worker, progress: dict) -> None:
        super().__init__(name="table-sampler", daemon=True)
        self.broker = broker
        self.worker = worker
        self.progress = progress
        self.samples: list[dict] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        import psycopg

        delay = 0.0  # the first sample at once
        while not self._stopping.wait(delay):
            delay = ENDURANCE_SAMPLE
            sample = {"t": time.time(), "published": self.progress["published"],
                      "started": self.worker.mark_count()}
            try:
                state = self.broker.table_state(settle=False)
            except psycopg.Error as exc:  # a full server, say: no table figures this time
                log.warning("table sample incomplete: %s", str(exc).splitlines()[0])
                state = None
            self.samples.append({**sample, **(state or {})})

    def stop(self) -> None:
        self._stopping.set()
        self.join(30)


def _started_between(starts: list[float], begin: float, end: float) -> float:
    """Tasks started per second inside [begin, end)."""
    count = bisect.bisect_left(starts, end) - bisect.bisect_left(starts, begin)
    return count / max(end - begin, 1e-9)


def events(app: Celery, broker: Broker, worker: Worker, flower: Flower, n: int,
           cap: float) -> dict:
    """Throughput of a worker started with -E while a real Flower watches it,
    its dashboard open (see :mod:`bench.flower`)."""
    events_before = flower.task_events(worker.nodename)
    flower_cpu_before = flower.cpu_seconds()
    with dashboard_open(flower):
        run = run_tasks(app, broker, worker, n, cap)
        # The last events are still on their way to Flower.
        expected = events_before + EVENTS_PER_TASK * run["done"]
        deadline = time.monotonic() + EVENTS_GRACE
        while (counted := flower.task_events(worker.nodename)) < expected \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    if not flower.alive:
        raise RuntimeError(f"Flower exited during the run:\n{flower.log_tail()}")
    flower_cpu = flower.cpu_seconds() - flower_cpu_before
    done = run["done"]
    return {
        "figures": {
            "throughput_events_flower": run["throughput"],
            "flower_task_events_per_task": (counted - events_before) / done if done else 0.0,
            "worker_cpu_ms_per_task_events": run["worker_cpu_ms_per_task"],
            "broker_cpu_ms_per_task_events": run["broker_cpu_ms_per_task"],
            "flower_cpu_ms_per_task": flower_cpu / done * 1e3 if done else None,
        },
        "capped": run["capped"],
    }


# Result backends ------------------------------------------------------------
# The broker's own kind of backend (Redis + Redis, RabbitMQ + rpc://, pg_broker
# + pgbroker://, pg_broker + SQLAlchemy), a solo worker storing every result.


def request_response(app: Celery, worker: Worker, samples: int, cap: float) -> dict:
    """``delay().get()`` round trips of one caller on an idle worker, with a pause between."""
    task = app.tasks[ECHO_TASK]
    task.apply_async((0.0,), queue=worker.queue).get(timeout=cap)  # connect, subscribe
    worker.clear_marks()
    trips = []
    deadline = time.monotonic() + cap
    for _ in range(samples):
        started = time.perf_counter()
        task.apply_async((0.0,), queue=worker.queue).get(
            timeout=max(deadline - time.monotonic(), 1.0))
        trips.append((time.perf_counter() - started) * 1e3)
        if time.monotonic() > deadline:
            break
        time.sleep(random.uniform(0.01, 0.03))  # let the worker go idle again
    trips.sort()
    return {
        "rr_p50_ms": percentile(trips, 50),
        "rr_p95_ms": percentile(trips, 95),
        "rr_p99_ms": percentile(trips, 99),
        "rr_samples": len(trips),
    }


def chord_round_trip(app: Celery, worker: Worker, n: int, cap: float) -> dict:
    """A chord of n tasks: from sending it to its callback's result in hand."""
    echo, total = app.tasks[ECHO_TASK], app.tasks[TOTAL_TASK]
    started = time.perf_counter()
    header = [echo.s(1.0).set(queue=worker.queue) for _ in range(n)]
    value = chord(header)(total.s().set(queue=worker.queue)).get(timeout=cap)
    elapsed = time.perf_counter() - started
    if value != n:
        raise RuntimeError(f"the chord's callback returned {value!r}, not {n}")
    return {"chord_ms": elapsed * 1e3}


def results_at_once(app: Celery, broker: Broker, worker: Worker, n: int, cap: float) -> dict:
    """n tasks sent, then their n results awaited together by this process
    (``ResultSet.get``: a native join where the backend has one); from the
    first send to the last result, and the connections this process then
    holds to the broker and its backend."""
    task = app.tasks[ECHO_TASK]
    started = time.perf_counter()
    results = ResultSet([task.apply_async((0.0,), queue=worker.queue) for _ in range(n)])
    values = results.get(timeout=cap)
    elapsed = time.perf_counter() - started
    if len(values) != n:
        raise RuntimeError(f"{len(values)} results of {n}")
    figures = {"results_at_once_s": elapsed}
    sessions = broker.sessions_of([os.getpid()])
    if sessions is not None:
        figures["producer_connections_results"] = sessions
    return figures


def throughput_with_results(app: Celery, broker: Broker, worker: Worker, n: int,
                            cap: float) -> dict:
    """End to end with every task's result stored, and what that costs the
    database (or Redis) per task; then the worker's connections."""
    run = run_tasks(app, broker, worker, n, cap, task_name=ECHO_TASK)
    figures = {
        "throughput_results": run["throughput"],
        "worker_cpu_ms_per_task_results": run["worker_cpu_ms_per_task"],
        "broker_cpu_ms_per_task_results": run["broker_cpu_ms_per_task"],
        **statement_figures(run["statements"], "results"),
    }
    sessions = broker.sessions_of(worker.pids())
    if sessions is not None:
        figures["worker_connections_results"] = sessions
    return {"figures": figures, "capped": run["capped"]}


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        raise ValueError("no values")
    rank = min(len(sorted_values), max(1, math.ceil(pct / 100 * len(sorted_values))))
    return sorted_values[rank - 1]
