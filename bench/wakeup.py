"""``python -m bench.wakeup``: where publish → start goes on an idle worker.

One solo Celery worker (``celery -A bench.wakeup worker``: this module, which
times the transport's steps in the worker when ``BENCH_WAKEUP_TRACE`` names a
file, then serves ``bench.app``'s app) on a private PostgreSQL 15, and the
tasks published one at a time from this process, as ``python -m bench``'s
latency figure does (a 10–30 ms pause between them). Each sample is cut into
the steps between timestamps taken with ``time.time()`` in both processes:

- ``celery_build``: ``apply_async`` until the transport's publish starts
  (Celery and kombu building the message);
- ``publish_call``: the confirmed publish's round trip (0 when pipelined);
- ``publish_to_wakeup``: from the publish's return (pipelined: its send) to
  the worker's hub calling the LISTEN connection's reader — the server
  storing and committing the message, the NOTIFY, two process wake-ups;
- ``wakeup_to_claim``: reading the notification, deciding to claim;
- ``claim``: the claim's round trip (``Store.ack_and_claim``), or taking a
  message a publish handed to the worker already claimed
  (``Delivery.accept``, migrations/core/220: no statement unless the
  message was too large for its notification);
- ``claim_to_deliver``, ``deliver_to_start``: the transport handing the
  message to Celery, and Celery starting the task (the solo pool).

Also prints pg_stat_statements' mean execution time of the statements run
100 times or more. Used to choose what to cut on the wake-up path; the
latency figures themselves stay ``python -m bench``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRACE_VARIABLE = "BENCH_WAKEUP_TRACE"
QUEUE = "bench.wakeup"
STEPS = [  # (name, from event, to event); events in the order they happen
    ("celery_build", "sent", "publish"),
    ("publish_call", "publish", "published"),
    ("publish_to_wakeup", "published", "readable"),
    ("wakeup_to_claim", "readable", "claim"),
    ("claim", "claim", "claimed"),
    ("claim_to_deliver", "claimed", "deliver"),
    ("deliver_to_start", "deliver", "started"),
    ("total", "sent", "started"),
]
# Each event is the first of its name after the one named beside it.
FOLLOWS = [("publish", "sent"), ("published", "publish"), ("readable", "publish"),
           ("claim", "readable"), ("claimed", "claim"), ("deliver", "claimed")]


def _install_hooks(path: str) -> None:
    """Record (event, time) around the transport's steps into ``path``."""
    from pg_broker.transport import delivery, pipeline, poller, store

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def timed(cls, name: str, before: str, after: str | None = None) -> None:
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            os.write(fd, f"{before} {time.time():.6f}\n".encode())
            result = original(self, *args, **kwargs)
            if after:
                os.write(fd, f"{after} {time.time():.6f}\n".encode())
            return result
        setattr(cls, name, wrapper)

    timed(poller.Poller, "_on_readable", "readable")
    timed(store.Store, "ack_and_claim", "claim", "claimed")
    timed(delivery.Delivery, "accept", "claim", "claimed")
    timed(delivery.Delivery, "deliver", "deliver")
    timed(store.Store, "publish", "publish", "published")
    timed(pipeline.Pipeline, "send", "publish", "published")


if os.environ.get(TRACE_VARIABLE):
    _install_hooks(os.environ[TRACE_VARIABLE])

from bench.app import RECORD, TASK_NAME, make_app  # noqa: E402
from bench.app import app as app  # noqa: E402,F401  (celery -A bench.wakeup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wakeup",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--transport-options", type=json.loads, default={},
                        help='as JSON, e.g. \'{"confirm_publish": false}\'')
    args = parser.parse_args(argv)

    import psycopg

    from pg_broker.migrate import migrate
    from tests.chaos.servers import PostgresServer

    server = PostgresServer("wakeup")
    server.settings.update({"shared_buffers": "128MB",
                            "shared_preload_libraries": "'pg_stat_statements'"})
    server.start()
    trace = Path(tempfile.mkdtemp(prefix="bench_wakeup_"))
    worker = None
    try:
        url = server.create_database("wakeup")
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
        broker = url.replace("postgresql://", "pgbroker://", 1)
        options = json.dumps(args.transport_options)
        marks, events = trace / "marks", trace / "events"
        marks.write_bytes(b"")
        env = dict(os.environ, BENCH_BROKER_URL=broker, BENCH_MARK_FILE=str(marks),
                   BENCH_TRANSPORT_OPTIONS=options)
        env[TRACE_VARIABLE] = str(events)
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.wakeup", "worker", "--pool", "solo",
             "--loglevel", "warning", "--queues", QUEUE, "--without-gossip",
             "--without-mingle", "--hostname", "bench-wakeup@%h"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        _install_hooks(str(events))
        task = make_app(broker, args.transport_options).tasks[TASK_NAME]
        started = _publish(task, marks, args.samples)
        with psycopg.connect(url, autocommit=True) as conn:
            statements = conn.execute(
                "SELECT calls, mean_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 60)"
                " FROM pg_stat_statements WHERE calls >= 100"
                " ORDER BY total_exec_time DESC LIMIT 6").fetchall()
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(10)
        server.destroy()
    print(_report(started, events.read_text().split("\n")))
    for calls, mean, query in statements:
        print(f"  {mean:6.3f} ms mean execution  ×{calls:<5} {query}")
    return 0


def _publish(task, marks: Path, samples: int) -> list[tuple[float, float]]:
    def done() -> int:
        return marks.stat().st_size // RECORD.size

    task.apply_async((time.time(),), queue=QUEUE)  # the worker is up once this ran
    deadline = time.time() + 60
    while done() < 1:
        if time.time() > deadline:
            raise RuntimeError("the worker took no task within 60 s")
        time.sleep(0.01)
    time.sleep(0.5)
    first = done()
    for i in range(samples):
        task.apply_async((time.time(),), queue=QUEUE)
        while done() <= first + i:
            time.sleep(0.0005)
        time.sleep(random.uniform(0.01, 0.03))
    data = marks.read_bytes()
    return [RECORD.unpack_from(data, at) for at in range(first * RECORD.size, len(data),
                                                          RECORD.size)]


def _report(samples: list[tuple[float, float]], lines: list[str]) -> str:
    events = sorted((float(t), name) for name, t in (line.split() for line in lines if line))
    steps: dict[str, list[float]] = {name: [] for name, _, _ in STEPS}
    for sent, started in samples:
        at = {"sent": sent, "started": started}
        for name, after in FOLLOWS:
            at[name] = next((t for t, event in events
                             if event == name and at[after] <= t <= started), None)
            if at[name] is None:
                break
        else:
            for name, start, end in STEPS:
                steps[name].append((at[end] - at[start]) * 1e3)
    rows = [f"{len(steps['total'])} of {len(samples)} samples traced; ms (publish_to_wakeup "
            "is negative when the worker woke before a confirmed publish returned):"]
    for name, values in steps.items():
        if values:
            values.sort()
            rows.append(f"  {name:<18} p50 {statistics.median(values):6.3f}   "
                        f"p90 {values[int(len(values) * 0.9)]:6.3f}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
