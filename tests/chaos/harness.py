"""Runs one fault scenario against real Celery workers and counts what happened.

A :class:`Cluster` is one broker (pg_broker on a private PostgreSQL server, or
Redis on a private redis-server), optionally behind a :class:`~.proxy.Proxy`,
with Celery worker process groups consuming from it. A paced producer calls
``delay()`` in a thread of the harness; every ``delay()`` that returned is
*enqueued*. Each execution of the task is a row of the ledger (another
PostgreSQL server, which no fault touches), so after the run the harness
counts, per task: enqueued, executed at least once, lost (enqueued, never
executed), executed again, and how long executions took to resume after each
fault ended.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from pg_broker.processes import Supervised, worker_command
from pg_broker.urls import broker_url

from .app import LEDGER_TABLE, QUEUE, make_app
from .proxy import Proxy
from .servers import PostgresServer, RedisServer, set_read_only

log = logging.getLogger("chaos")

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_MODULE = "tests.chaos.app"


@dataclass
class Fault:
    """One injected fault: what, when it began and when it ended (wall clock)."""

    what: str
    began: float
    ended: float | None = None
    killed: list[str] = field(default_factory=list)  # worker nodes it killed


@dataclass
class Figures:
    """What one scenario measured (see :meth:`Cluster.figures`)."""

    scenario: str
    broker: str
    enqueued: int
    executed: int
    lost: int
    undelivered: int
    executions: int
    duplicates: int
    reruns_after_kill: int
    reruns_other: int
    publish_errors: int
    refused_but_ran: int
    resume_seconds: float | None
    max_wait_seconds: float | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    lost_examples: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class WorkerProcess(Supervised):
    """One ``celery worker`` in a process group of its own, logging to a file."""

    _numbers = itertools.count(1)

    def __init__(self, env: dict[str, str], log_dir: Path, pool: str, concurrency: int) -> None:
        self.pool = pool
        name = f"chaos-{pool}-{next(self._numbers)}-{uuid.uuid4().hex[:4]}"
        self.node = f"{name}@chaos"
        super().__init__(
            worker_command(APP_MODULE, hostname=self.node, pool=pool, concurrency=concurrency,
                           queues=[QUEUE], extra_args=["--without-gossip", "--without-mingle"]),
            env=env, log_file=log_dir / f"{name}.log", cwd=REPO_ROOT,
        )
        self.start()


class Producer(threading.Thread):
    """Calls ``delay()`` ``count`` times at ``rate`` per second; records what returned."""

    def __init__(self, task, run: str, count: int, rate: float, work_seconds: float) -> None:
        super().__init__(name="chaos-producer", daemon=True)
        self.task, self.run_id, self.count = task, run, count
        self.rate, self.work_seconds = rate, work_seconds
        self.enqueued: dict[int, float] = {}  # seq -> when delay() returned
        self.task_ids: dict[str, int] = {}  # Celery task id -> seq
        self.errors: dict[int, str] = {}  # seq -> the error delay() raised
        self.done = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        try:
            for seq in range(self.count):
                delay = start + seq / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:  # behind (the broker was down): go on at the pace from now
                    start -= delay
                try:
                    result = self.task.delay(self.run_id, seq, self.work_seconds)
                except Exception as exc:  # noqa: BLE001 - counted, and shown in the report
                    self.errors[seq] = f"{type(exc).__name__}: {exc}"
                else:
                    self.enqueued[seq] = time.time()
                    self.task_ids[result.id] = seq
        finally:
            self.done.set()


class Ledger:
    """The executions table, on a server of its own."""

    def __init__(self, server: PostgresServer) -> None:
        self.url = server.create_database("chaos_ledger")
        self.conn = psycopg.connect(self.url, autocommit=True)
        self.conn.execute(LEDGER_TABLE)

    def executions(self, run: str) -> list[tuple]:
        """(seq, node, started, finished) per execution, in start order (epoch seconds)."""
        return self.conn.execute(
            "SELECT seq, node, extract(epoch FROM started_at)::float8,"
            " extract(epoch FROM finished_at)::float8"
            " FROM executions WHERE run = %s ORDER BY started_at, id", (run,),
        ).fetchall()

    def executed(self, run: str) -> set[int]:
        return {row[0] for row in self.conn.execute(
            "SELECT DISTINCT seq FROM executions WHERE run = %s", (run,))}


class Cluster:
    """One broker, its workers and a producer, for one scenario."""

    def __init__(self, broker: str, ledger: Ledger, log_dir: Path, *, lease: float,
                 maintenance: float = 10.0, proxied: bool = False) -> None:
        self.kind = broker
        self.ledger = ledger
        self.log_dir = log_dir
        self.run_id = uuid.uuid4().hex[:12]
        self.faults: list[Fault] = []
        self.workers: list[WorkerProcess] = []
        self.killed_nodes: dict[str, float] = {}  # node -> when it was killed
        self.notes: list[str] = []
        if broker == "pgbroker":
            self.pg = PostgresServer("chaos_broker").start()
            self.pg.create_database("broker")
            self.server_port = self.pg.port
            options = {"lease_seconds": lease, "maintenance_interval": maintenance}
        elif broker == "redis":
            self.redis = RedisServer().start()
            self.server_port = self.redis.port
            # Redis redelivers unacked messages after the visibility timeout: our
            # lease. Its workers look for them as often as pg_broker's reclaim
            # runs (maintenance_interval); kombu's default is every 100 s
            # (unacked_restore_interval 10 x unacked_restore_throttle 10).
            options = {"visibility_timeout": lease, "unacked_restore_interval": maintenance,
                       "unacked_restore_throttle": 1}
        else:
            raise ValueError(f"unknown broker {broker!r}")
        self.proxy = Proxy(self.server_port).start() if proxied else None
        self.worker_url = self._url(self.proxy.port if self.proxy else None)
        self.producer_url = self._url(None)
        self.env = dict(os.environ)
        self.env.pop("PG_BROKER_URL", None)
        self.env.pop("DATABASE_URL", None)
        self.env.update({
            "CHAOS_BROKER_URL": self.worker_url,
            "CHAOS_TRANSPORT_OPTIONS": json.dumps(options),
            "CHAOS_LEDGER_URL": ledger.url,
            "PYTHONUNBUFFERED": "1",
        })
        self.app = make_app(self.producer_url, options)
        self.task = self.app.tasks["chaos.work"]
        self.started = time.time()

    def _url(self, port: int | None) -> str:
        if self.kind == "pgbroker":
            return broker_url(self.pg.url("broker", port))
        return self.redis.url(port)

    # Workers -----------------------------------------------------------------

    def start_worker(self, pool: str, concurrency: int = 2) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.log_dir, pool, concurrency)
        self.workers.append(worker)
        return worker

    def wait_ready(self, workers: list[WorkerProcess], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.wait_for_log(" ready.", max(deadline - time.monotonic(), 1))

    def kill_worker(self, worker: WorkerProcess) -> None:
        worker.kill()
        self.killed_nodes[worker.node] = time.time()

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive and w.node not in self.killed_nodes]

    # Faults ------------------------------------------------------------------

    def fault(self, what: str, inject: Callable[[], object], hold: float = 0.0,
              clear: Callable[[], object] | None = None) -> Fault:
        """Inject, hold for ``hold`` seconds, clear; the fault ends when ``clear`` returned."""
        fault = Fault(what, time.time())
        self.faults.append(fault)
        inject()
        if hold:
            time.sleep(hold)
        if clear is not None:
            clear()
        fault.ended = time.time()
        return fault

    def terminate_sessions(self) -> int:
        if self.kind == "redis":
            return int(self.redis.client().execute_command("CLIENT KILL TYPE normal SKIPME yes"))
        with self.pg.admin() as conn:
            return conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = 'broker' AND pid <> pg_backend_pid()").fetchone()[0]

    def restart_server(self, mode: str) -> None:
        if self.kind == "redis":
            self.redis.restart(mode)
        else:
            self.pg.restart(mode)

    def set_read_only(self, on: bool) -> None:
        set_read_only(self.pg.url(), "broker", on)

    # Producing and draining ---------------------------------------------------

    def produce(self, count: int, rate: float, work_seconds: float) -> Producer:
        producer = Producer(self.task, self.run_id, count, rate, work_seconds)
        self.producer = producer
        producer.start()
        return producer

    def broker_idle(self) -> bool:
        """Nothing ready or held in the broker any more."""
        if self.kind == "redis":
            client = self.redis.client()
            return client.llen(QUEUE) == 0 and client.hlen("unacked") == 0
        with self.pg.admin("broker") as conn:
            return conn.execute(
                "SELECT NOT EXISTS (SELECT 1 FROM job_tasks WHERE queue = %s"
                " AND status IN ('pending', 'claimed', 'processing'))", (QUEUE,),
            ).fetchone()[0]

    def waiting_task_ids(self) -> set[str]:
        """Celery task ids of the messages still in the broker (ready, held or unacked)."""
        if self.kind == "redis":
            client = self.redis.client()
            messages = [json.loads(m) for m in client.lrange(QUEUE, 0, -1)]
            messages += [json.loads(m)[0] for m in client.hvals("unacked")]
            return {m["headers"]["id"] for m in messages}
        with self.pg.admin("broker") as conn:
            return {row[0] for row in conn.execute(
                "SELECT task_id FROM job_tasks WHERE queue = %s"
                " AND status IN ('pending', 'claimed', 'processing')", (QUEUE,))}

    def describe_rows(self, task_ids: list[str]) -> str:
        """What became of these messages' rows: (status, attempts, error) counted."""
        with self.pg.admin("broker") as conn:
            found = conn.execute(
                "SELECT status, attempts, left(error, 80), count(*) FROM job_tasks"
                " WHERE task_id = ANY (%s) GROUP BY 1, 2, 3 ORDER BY 4 DESC", (task_ids,),
            ).fetchall()
        missing = len(task_ids) - sum(row[3] for row in found)
        return "; ".join([f"{n} {status} after {attempts} deliveries ({error})"
                          for status, attempts, error, n in found]
                         + ([f"{missing} no row"] if missing else []))

    def drain(self, timeout: float) -> bool:
        """Wait until every enqueued task ran and the broker holds nothing more."""
        self.producer.done.wait()
        deadline = time.monotonic() + timeout
        enqueued = set(self.producer.enqueued)
        while time.monotonic() < deadline:
            try:
                if enqueued <= self.ledger.executed(self.run_id) and self.broker_idle():
                    return True
            except Exception as exc:  # noqa: BLE001 - the broker may still be down
                log.debug("drain check failed: %s", exc)
            time.sleep(0.5)
        return False

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        try:
            self.app.close()
        except Exception:  # noqa: BLE001 - the broker may be gone
            log.debug("closing the producer app failed", exc_info=True)
        if self.proxy is not None:
            self.proxy.close()
        if self.kind == "pgbroker":
            self.pg.destroy()
        else:
            self.redis.destroy()

    # Counting ------------------------------------------------------------------

    def figures(self, scenario: str) -> Figures:
        executions = self.ledger.executions(self.run_id)
        enqueued = self.producer.enqueued
        by_seq: dict[int, list[tuple]] = {}
        for seq, node, started, finished in executions:
            by_seq.setdefault(seq, []).append((node, started, finished))
        executed = set(by_seq) & set(enqueued)
        waiting = {self.producer.task_ids[t] for t in self.waiting_task_ids()
                   if t in self.producer.task_ids}
        # Never executed and no longer anywhere in the broker: lost for good.
        # Still in the broker: not delivered again yet (reported, not lost).
        lost = sorted(set(enqueued) - executed - waiting)
        stuck = sorted(set(enqueued) - executed - set(lost))
        if lost and self.kind == "pgbroker":
            self.notes.append("lost rows: " + self.describe_rows(
                [t for t, seq in self.producer.task_ids.items() if seq in set(lost)]))
        reruns_after_kill = reruns_other = 0
        for runs in by_seq.values():
            for i in range(1, len(runs)):
                # A re-run is explained when an earlier execution's worker was
                # killed after it started: its ack never happened.
                if any(self.killed_nodes.get(node, 0) > started for node, started, _ in runs[:i]):
                    reruns_after_kill += 1
                else:
                    reruns_other += 1
        first_start = {seq: runs[0][1] for seq, runs in by_seq.items()}
        waits = [first_start[s] - enqueued[s] for s in executed]
        starts = sorted(started for _, _, started, _ in executions)
        resume = []
        for fault in self.faults:
            if fault.ended is None:
                continue
            after = [s for s in starts if s >= fault.ended]
            if after:
                resume.append(after[0] - fault.ended)
        return Figures(
            scenario=scenario, broker=self.kind, enqueued=len(enqueued), executed=len(executed),
            lost=len(lost), undelivered=len(stuck), executions=len(executions),
            duplicates=len(executions) - len(by_seq),
            reruns_after_kill=reruns_after_kill, reruns_other=reruns_other,
            publish_errors=len(self.producer.errors),
            refused_but_ran=len(set(by_seq) & set(self.producer.errors)),
            resume_seconds=round(max(resume), 2) if resume else None,
            max_wait_seconds=round(max(waits), 2) if waits else None,
            seconds=round(time.time() - self.started, 1),
            notes=self.notes, lost_examples=lost[:10],
        )
