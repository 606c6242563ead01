"""Orchestration: start every broker's workers, interleave the repeats
(broker A, B, C, A, B, C ...), measure idle workers last, stop everything.

Each broker gets four long-lived workers, one per role, each on its own
queue: ``solo``, ``threads`` (8), ``prefork`` (2) and ``events`` (solo with
``-E``), and a Flower watching the ``events`` one (:mod:`bench.flower`); a
broker with a result backend also a ``results`` worker (solo, storing results:
the result figures), and a results-only entry that worker alone. They
stay up for the whole run so start-up time is paid once; the workers of the
brokers not being measured sit idle, the same background for every broker.
Before every measurement the broker's queues are emptied (message tables
truncated for the PostgreSQL-backed ones). A broker whose Flower does not
start is measured without the events figures, and the failure is reported.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from bench import measure
from bench.app import ENQUEUE_QUEUE, TASK_NAME, make_app
from bench.brokers import Broker
from bench.flower import Flower
from bench.measure import Sizes
from bench.workers import Worker, kill_all, stop_all

log = logging.getLogger(__name__)

ROLES = {  # role: (pool, concurrency, events)
    "solo": ("solo", 1, False),
    "threads": ("threads", 8, False),
    "prefork": ("prefork", 2, False),
    "events": ("solo", 1, True),
    "results": ("solo", 1, False),
}
QUEUES = [ENQUEUE_QUEUE] + [f"bench.{role}" for role in ROLES]
# The groups of figures ``--only`` picks from, each with the workers it needs.
FIGURE_GROUPS = {
    "enqueue": (),  # delay() loop, group, enqueue_in
    "latency": ("solo",),
    "throughput": ("solo", "threads", "prefork"),
    "events": ("events",),
    "drain": ("solo",),
    "endurance": ("solo",),
    "results": ("results",),
    "idle": ("solo",),
}


def roles_of(broker: Broker, only: set[str] | None = None) -> list[str]:
    """The workers a broker gets: the result-figure one where it has a backend;
    with ``only``, those its figure groups need."""
    if broker.results_only:
        return ["results"]
    roles = [role for role in ROLES if role != "results" or broker.result_backend]
    if only is not None:
        needed = {role for group in only for role in FIGURE_GROUPS[group]}
        roles = [role for role in roles if role in needed]
    return roles
READY_TIMEOUT = 90.0


class Run:
    """Samples of one benchmark run, keyed figure -> broker -> [value per repeat]."""

    def __init__(self, brokers: list[Broker], sizes: Sizes, repeats: int,
                 echo: Callable[[str], None] = print, only: set[str] | None = None):
        self.brokers = brokers
        self.only = only  # figure groups to measure (None: all)
        self.sizes = sizes
        self.repeats = repeats
        self.echo = echo
        self.samples: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        # Figures that are lists (a table sampled over time), per repeat.
        self.series: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.capped: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.errors: dict[str, list[str]] = defaultdict(list)
        self.workers: dict[str, dict[str, Worker]] = {}
        self.flowers: dict[str, Flower] = {}  # those that started
        # pg_stat_statements, where the server has it: {broker: {"run"|"idle": [...]}}
        self.statements: dict[str, dict[str, list]] = defaultdict(dict)
        self.workdir = Path(tempfile.mkdtemp(prefix="pg_broker_bench_", dir=_scratch_dir()))

    @property
    def usable(self) -> list[Broker]:
        return [b for b in self.brokers if b.skip is None]

    # --- the run ----------------------------------------------------------

    def execute(self) -> None:
        try:
            self.start_workers()
            for broker in self.usable:
                broker.reset_statements()
            for repeat in range(1, self.repeats + 1):
                for broker in self.usable:
                    started = time.monotonic()
                    self.measure_broker(broker)
                    self.echo(f"  repeat {repeat}/{self.repeats} {broker.name}: "
                              f"{time.monotonic() - started:.1f}s")
            for broker in self.usable:
                if broker.has_statements:
                    self.statements[broker.name]["run"] = broker.top_statements()
            if self.wants("idle"):
                self.measure_idle()
            stop_all([w for ws in self.workers.values() for w in ws.values()])
        finally:
            kill_all()
        failed = self.errors or any(b.skip and b.name in self.workers for b in self.brokers)
        if failed:
            self.echo(f"worker logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def start_workers(self) -> None:
        for broker in self.usable:
            # Declaring the queues first also creates the SQL transports' tables,
            # which four workers starting at once would race to create.
            broker.purge(QUEUES)
            self.reset(broker)
            self.workers[broker.name] = {}
            for role in roles_of(broker, self.only):
                worker = self.new_worker(broker, role)
                worker.start(broker.url, broker.worker_env(), broker.transport_options_json(),
                             broker.result_backend if role == "results" else None)
                self.workers[broker.name][role] = worker
        # Flowers start alongside the workers; they are waited for once the workers are up.
        flowers = {broker.name: Flower(broker, self.workdir) for broker in self.usable
                   if "events" in self.workers[broker.name]}
        for flower in flowers.values():
            flower.start()
        started = sum(len(workers) for workers in self.workers.values())
        self.echo(f"started {started} workers and {len(flowers)} Flowers; "
                  f"waiting for the workers to take a task (logs in {self.workdir})")
        for broker in self.usable:
            self.wait_ready(broker)
        for flower in flowers.values():
            self.wait_flower(flower)

    def wait_flower(self, flower: Flower) -> None:
        """Keep a Flower that watches its broker's -E worker; report and stop
        one that does not (its broker goes on without the events figures)."""
        name = flower.broker.name
        if flower.broker.skip is None:
            try:
                flower.wait_watching(self.workers[name]["events"].nodename)
            except RuntimeError as exc:
                problem, *log_lines = str(exc).splitlines()
                self.errors[name].append(f"Flower did not start: {problem} "
                                         f"(log: {flower.log_file})")
                last_lines = "\n    ".join(log_lines[-3:])
                self.echo(f"    {name}: Flower did not start: {problem}\n    {last_lines}")
            else:
                self.flowers[name] = flower
                return
        flower.stop(timeout=0)

    def new_worker(self, broker: Broker, role: str) -> Worker:
        pool, concurrency, events = ROLES[role]
        return Worker(
            broker=broker.name, role=role, pool=pool, concurrency=concurrency,
            queue=f"bench.{role}", events=events,
            mark_file=self.workdir / f"{broker.name}-{role}.marks",
            log_file=self.workdir / f"{broker.name}-{role}.log",
        )

    def wait_ready(self, broker: Broker) -> None:
        """A worker is ready once a probe task published to its queue has run."""
        app = make_app(broker.url, broker.transport_options)
        task = app.tasks[TASK_NAME]
        workers = self.workers[broker.name]
        try:
            for worker in workers.values():
                task.apply_async((0.0,), queue=worker.queue)
            deadline = time.monotonic() + READY_TIMEOUT
            pending = dict(workers)
            while pending and time.monotonic() < deadline:
                for role, worker in list(pending.items()):
                    if worker.mark_count() > 0:
                        del pending[role]
                    elif not worker.alive:
                        raise RuntimeError(f"{role} worker exited:\n{worker.log_tail()}")
                time.sleep(0.05)
            if pending:
                role, worker = next(iter(pending.items()))
                raise RuntimeError(f"{role} worker ran no task within {READY_TIMEOUT:.0f}s:\n"
                                   f"{worker.log_tail()}")
        except Exception as exc:
            broker.skip = f"workers did not start: {exc}"
            last_lines = "\n    ".join(str(exc).splitlines()[-3:])
            if "too many clients" in str(exc):
                last_lines += ("\n    (every PostgreSQL-backed broker holds its workers' and its "
                               "Flower's connections for the whole run: measure fewer at "
                               "once or raise max_connections)")
            self.echo(f"skipping {broker.name}: workers did not start:\n    {last_lines}")
            stop_all(list(workers.values()))
        finally:
            app.close()
        for worker in workers.values():
            worker.clear_marks()

    def reset(self, broker: Broker) -> None:
        """Empty the queues before a measurement."""
        if broker.tables:
            broker.truncate()
        else:
            broker.purge(QUEUES)

    def wants(self, group: str) -> bool:
        return self.only is None or group in self.only

    def measure_broker(self, broker: Broker) -> None:
        if not broker.results_only:
            self.measure_transport(broker)
        if broker.result_backend and self.wants("results"):
            self.measure_results(broker)

    def measure_results(self, broker: Broker) -> None:
        """The result figures, on the broker's results worker."""
        sizes = self.sizes
        worker = self.workers[broker.name]["results"]
        app = make_app(broker.url, broker.transport_options, broker.result_backend)
        try:
            self.attempt(broker, lambda: measure.request_response(
                app, worker, sizes.results_samples, sizes.results_cap))
            self.attempt(broker, lambda: measure.chord_round_trip(
                app, worker, sizes.chord, sizes.results_cap))
            self.attempt(broker, lambda: measure.results_at_once(
                app, broker, worker, sizes.at_once, sizes.results_cap))
            self.attempt(broker, lambda: measure.throughput_with_results(
                app, broker, worker, sizes.throughput, sizes.cap))
        finally:
            app.close()

    def measure_transport(self, broker: Broker) -> None:
        sizes = self.sizes
        workers = self.workers[broker.name]
        app = make_app(broker.url, broker.transport_options)
        try:
            if self.wants("enqueue"):
                self.attempt(broker, lambda: measure.enqueue_delay(app, sizes.enqueue))
                self.attempt(broker, lambda: measure.enqueue_group(app, sizes.bulk))
                if broker.name.startswith("pgbroker"):
                    self.attempt(broker, lambda: measure.enqueue_transactional(
                        app, broker, sizes.bulk))
            if self.wants("latency"):
                self.attempt(broker, lambda: measure.latency(
                    app, workers["solo"], sizes.latency_samples, sizes.latency_cap))
            plain = {}
            if self.wants("throughput"):
                for role in ("solo", "threads", "prefork"):
                    plain[role] = self.attempt(broker, lambda role=role: measure.throughput(
                        app, broker, workers[role], sizes.throughput, sizes.cap))
            flower = self.flowers.get(broker.name)
            with_events = flower and self.attempt(broker, lambda: measure.events(
                app, broker, workers["events"], flower, sizes.throughput, sizes.cap))
            solo = (plain.get("solo") or {}).get("throughput_solo")
            if with_events and solo:
                self.add(broker, "events_flower_vs_plain",
                         with_events["throughput_events_flower"] / solo)
            if sizes.drain and self.wants("drain"):
                self.attempt(broker, lambda: measure.drain(
                    app, broker, workers["solo"], sizes.drain, sizes.cap))
            if self.wants("endurance"):
                self.attempt(broker, lambda: measure.endurance(
                    app, broker, workers["solo"], sizes.endurance, sizes.endurance_cap))
        finally:
            app.close()

    def attempt(self, broker: Broker, measurement: Callable[[], dict]) -> dict | None:
        """Run one measurement on clean queues; keep its figures, or its error."""
        started = time.monotonic()
        try:
            self.reset(broker)
            result = measurement()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.debug("measurement failed on %s", broker.name, exc_info=True)
            self.errors[broker.name].append(message)
            self.echo(f"    {broker.name}: {message}")
            return None
        figures = result.get("figures", result)
        capped = result.get("capped", False)
        log.info("%s: %s in %.1fs", broker.name, ", ".join(figures), time.monotonic() - started)
        for key, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.add(broker, key, value)
                if capped:
                    self.capped[key][broker.name] += 1
            elif isinstance(value, list):
                self.series[key][broker.name].append(value)
        return figures

    def add(self, broker: Broker, key: str, value: float | None) -> None:
        if value is not None:
            self.samples[key][broker.name].append(value)

    def measure_idle(self) -> None:
        """Stop the Flowers and all but the solo workers; then, in simultaneous
        windows, count each idle solo worker's transactions on its database and its CPU."""
        others = [w for ws in self.workers.values() for role, w in ws.items() if role != "solo"]
        stop_all([*others, *self.flowers.values()])
        idle = [b for b in self.usable if "solo" in self.workers[b.name]]
        solos = {b.name: self.workers[b.name]["solo"] for b in idle}
        for broker in idle:
            self.reset(broker)
        time.sleep(self.sizes.stats_settle)  # see Sizes.stats_settle
        for broker in idle:
            broker.reset_statements()
        for _ in range(self.repeats):
            xacts0 = {b.name: b.transactions() for b in idle}
            calls0 = {b.name: b.statement_calls() for b in idle}
            cpu0 = {name: w.cpu_seconds() for name, w in solos.items()}
            t0 = time.monotonic()
            time.sleep(self.sizes.idle_seconds)
            elapsed = time.monotonic() - t0
            for broker in idle:
                name = broker.name
                if not solos[name].alive:
                    continue
                self.add(broker, "idle_cpu_percent",
                         (solos[name].cpu_seconds() - cpu0[name]) / elapsed * 100)
                if xacts0[name] is not None:
                    self.add(broker, "idle_queries_per_s",
                             (broker.transactions() - xacts0[name]) / elapsed)
                if calls0[name] is not None:
                    self.add(broker, "idle_statements_per_s",
                             (broker.statement_calls() - calls0[name]) / elapsed)
        for broker in idle:
            if broker.has_statements:
                self.statements[broker.name]["idle"] = broker.top_statements()


def _scratch_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None
