"""One ``delay().get()`` round trip taken apart: where its milliseconds go.

    python -m bench.roundtrip --brokers redis,pgbroker --samples 200

A solo worker per broker (``celery -A bench.roundtrip worker``: the bench app
with probes), one caller in this process alternating the brokers call by
call, with a pause between calls (the worker idle again, as in the bench's
request/response figure). Worker and caller append ``(probe, time)``
records to one file (``BENCH_TRACE_FILE``); the clock is CLOCK_MONOTONIC,
the same for every process of the machine. Each call is a window from its
send to its result in hand; in it, the first time of each probe:

    send       the caller calls apply_async
    published  the publish returned (Celery's after_task_publish)
    wake       the worker's hub: the broker's socket turned readable
               (pgbroker: the LISTEN connection; Redis: the BRPOP reply)
    claimed    the worker has the message (pgbroker: the claim statement
               returned, or it took a message handed to it, migrations/core/220;
               Redis: the BRPOP reply read)
    prerun     the task starts (task_prerun)
    store      the worker starts storing the result (Backend.store_result)
    stored     ... and the store returned (its commit, and its notification sent)
    delivered  the caller has the result meta (ResultConsumer.on_state_change)
    done       get() returned

and, for pgbroker, the caller's own statement before it waits (``get`` to
``listened``: its LISTEN and read, pipelined). Stages are printed as medians
and 90th percentiles per broker. A probe costs a ``write`` (a few µs).

``--chord N`` takes a chord of N apart instead (the bench's chord figure:
``echo`` header tasks, a ``total`` callback, one solo worker), in ms from its
send: the header's N publishes done, the first header task's start, the last
header task's result stored, its ``on_chord_part_return`` returned (the
header read, the callback sent), the callback's publish and start, its result in
the caller's hands; and per header task, the worker's cycle (start to start)
and its store (``store`` -> ``stored``: result and chord count, one statement).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from celery import chord, signals

from bench.app import ECHO_TASK, TOTAL_TASK, app, make_app

TRACE_FILE_VARIABLE = "BENCH_TRACE_FILE"
CHAIN = ("send", "published", "wake", "claimed", "prerun", "store", "stored", "delivered", "done")
CALLER = ("get", "listened")

_fd: int | None = None


def probe(label: str) -> None:
    if _fd is not None:
        os.write(_fd, f"{label} {time.monotonic_ns()}\n".encode())


def _probed(cls: type, name: str, before: str | None, after: str | None) -> None:
    """Wrap ``cls.name`` with probes before and after it."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if before:
            probe(before)
        try:
            return original(*args, **kwargs)
        finally:
            if after:
                probe(after)

    setattr(cls, name, wrapper)


def install(path: str) -> None:
    """Probes on: records go to ``path`` (this process and its threads)."""
    global _fd
    if _fd is not None:
        return
    _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    from celery.backends.asynchronous import BaseResultConsumer
    from celery.backends.base import Backend
    from kombu.transport import redis as kombu_redis

    from pg_broker.results.backend import PgBrokerBackend, ResultConsumer
    from pg_broker.results.store import ResultStore
    from pg_broker.transport.delivery import Delivery
    from pg_broker.transport.poller import Poller
    from pg_broker.transport.store import Store

    _probed(Poller, "_on_readable", "wake", None)
    _probed(Store, "ack_and_claim", None, "claimed")
    _probed(Delivery, "accept", None, "claimed")  # a message handed to the worker
    _probed(kombu_redis.MultiChannelPoller, "on_readable", "wake", None)
    _probed(kombu_redis.Channel, "_brpop_read", None, "claimed")
    _probed(Backend, "store_result", "store", "stored")
    _probed(ResultStore, "listen_and_read", None, "listened")
    _probed(BaseResultConsumer, "on_state_change", "delivered", None)
    _probed(ResultConsumer, "on_state_change", "delivered", None)  # its own, without sleep(0)
    _probed(PgBrokerBackend, "on_chord_part_return", None, "part returned")
    signals.task_prerun.connect(lambda **kw: probe("prerun"), weak=False)
    signals.after_task_publish.connect(lambda **kw: probe("published"), weak=False)


if os.environ.get(TRACE_FILE_VARIABLE):  # a worker started by main()
    install(os.environ[TRACE_FILE_VARIABLE])

__all__ = ["app"]


def read_trace(path: Path) -> list[tuple[str, int]]:
    records = []
    for line in path.read_text().splitlines():
        label, _, ns = line.partition(" ")
        if ns.isdigit():
            records.append((label, int(ns)))
    records.sort(key=lambda record: record[1])
    return records


def stages(records: list[tuple[str, int]], windows: list[tuple[int, int]]) -> list[dict]:
    """Per call: the first time of each probe in its window, in ms from its send."""
    calls = []
    i = 0
    for start, end in windows:
        while i < len(records) and records[i][1] < start:
            i += 1
        first: dict[str, int] = {}
        j = i
        while j < len(records) and records[j][1] <= end:
            first.setdefault(records[j][0], records[j][1])
            j += 1
        calls.append({label: (t - start) / 1e6 for label, t in first.items()})
    return calls


def summarise(name: str, calls: list[dict]) -> str:
    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    lines = [f"{name}: {len(calls)} calls; ms, median [p90]"]
    points = [label for label in CHAIN if any(label in call for call in calls)]
    for a, b in itertools.pairwise(points):
        gaps = [call[b] - call[a] for call in calls if a in call and b in call]
        if gaps:
            lines.append(f"  {a:>9} -> {b:<9} {statistics.median(gaps):6.2f} [{pct(gaps, .9):6.2f}]")
    for a, b in itertools.pairwise(CALLER):
        gaps = [call[b] - call[a] for call in calls if a in call and b in call]
        if gaps:
            lines.append(f"  caller {a} -> {b:<9} {statistics.median(gaps):6.2f} "
                         f"[{pct(gaps, .9):6.2f}]")
    for label in ("wake", "delivered", "done"):
        values = [call[label] for call in calls if label in call]
        if values:
            lines.append(f"  send -> {label:<9} {statistics.median(values):6.2f} "
                         f"[{pct(values, .9):6.2f}]")
    return "\n".join(lines)


def chord_stages(records: list[tuple[str, int]], windows: list[tuple[int, int]],
                 n: int) -> list[dict]:
    """Per chord (its window): the times (ms from its send) of the n-th
    ``published`` (the header sent), the first ``prerun``, the n-th
    ``stored`` (the last part's result), the (n+1)-th ``published`` and
    ``prerun`` (the callback's), ``done``; and the worker's per-part cycle
    and store, medians over the parts."""
    chords = []
    for start, end in windows:
        times: dict[str, list[int]] = {}
        for label, t in records:
            if start <= t <= end:
                times.setdefault(label, []).append(t)

        def at(label: str, index: int, times=times, start=start) -> float | None:
            found = times.get(label, [])
            return (found[index] - start) / 1e6 if len(found) > index else None

        starts, stores, stored = (times.get(label, []) for label in ("prerun", "store", "stored"))
        cycles = [(b - a) / 1e6 for a, b in itertools.pairwise(starts[:n])]
        writes = [(b - a) / 1e6 for a, b in zip(stores[:n], stored[:n], strict=False)]
        chords.append({
            "header published": at("published", n - 1), "first start": at("prerun", 0),
            "last part stored": at("stored", n - 1), "callback published": at("published", n),
            "last part returned": at("part returned", n - 1),
            "callback start": at("prerun", n), "done": at("done", 0),
            "part cycle": statistics.median(cycles) if cycles else None,
            "part store": statistics.median(writes) if writes else None,
        })
    return chords


def summarise_chords(name: str, chords: list[dict]) -> str:
    lines = [f"{name}: {len(chords)} chords; ms, median [max]"]
    for label in dict.fromkeys(label for c in chords for label in c):
        values = [c[label] for c in chords if c.get(label) is not None]
        if values:
            lines.append(f"  {label:<20} {statistics.median(values):8.2f} [{max(values):8.2f}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import choose_pg_server
    from bench.brokers import prepare
    from bench.workers import Worker, install_cleanup, kill_all, stop_all

    parser = argparse.ArgumentParser(prog="python -m bench.roundtrip", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", default="redis,pgbroker",
                        help="comma-separated bench broker names with a result backend")
    parser.add_argument("--samples", type=int, default=200, help="calls per broker")
    parser.add_argument("--chord", type=int, default=0,
                        help="take chords of this many header tasks apart instead (--samples "
                             "of them per broker)")
    parser.add_argument("--pg-server", default="private",
                        help="as python -m bench's --pg-server (default private)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)

    install_cleanup()
    workdir = Path(tempfile.mkdtemp(prefix="bench_roundtrip_"))
    trace = workdir / "trace"
    server, pg_server, _ = choose_pg_server(args.pg_server)
    workers = []
    try:
        brokers = prepare(args.brokers.split(","), pg_server, None, redis_url=args.redis_url)
        apps = {}
        for broker in brokers:
            if broker.skip or not broker.result_backend:
                print(f"skipping {broker.name}: {broker.skip or 'no result backend'}")
                continue
            worker = Worker(broker=broker.name, role="roundtrip", pool="solo", concurrency=1,
                            queue="bench.roundtrip", mark_file=workdir / f"{broker.name}.marks",
                            log_file=workdir / f"{broker.name}.log", app="bench.roundtrip")
            env = dict(broker.worker_env(), **{TRACE_FILE_VARIABLE: str(trace)})
            worker.start(broker.url, env, broker.transport_options_json(),
                         broker.result_backend)
            workers.append(worker)
            apps[broker.name] = (make_app(broker.url, broker.transport_options,
                                          broker.result_backend), worker)
        for producer, worker in apps.values():  # connect, subscribe, warm up
            for _ in range(20):
                producer.tasks[ECHO_TASK].apply_async((0.0,), queue=worker.queue).get(timeout=60)
        install(str(trace))
        windows: dict[str, list[tuple[int, int]]] = {name: [] for name in apps}
        for _ in range(args.samples):
            for name, (producer, worker) in apps.items():
                start = time.monotonic_ns()
                probe("send")
                if args.chord:
                    header = [producer.tasks[ECHO_TASK].s(1.0).set(queue=worker.queue)
                              for _ in range(args.chord)]
                    callback = producer.tasks[TOTAL_TASK].s().set(queue=worker.queue)
                    chord(header)(callback).get(timeout=120)
                else:
                    result = producer.tasks[ECHO_TASK].apply_async((0.0,), queue=worker.queue)
                    probe("get")
                    result.get(timeout=30)
                probe("done")
                windows[name].append((start, time.monotonic_ns()))
                time.sleep(random.uniform(0.01, 0.03) if not args.chord else 0.5)
        records = read_trace(trace)
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
        for name, spans in windows.items():
            if args.chord:
                print(summarise_chords(name, chord_stages(records, spans, args.chord)))
            else:
                print(summarise(name, stages(records, spans)))
        stop_all(workers)
    finally:
        kill_all()
        if server is not None:
            server.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
