"""``python -m bench [--quick]``: run the comparison and write bench/results/*.json."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import os
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path

import psutil

from bench import flower, report
from bench.brokers import (
    ALL_BROKERS,
    DEFAULT_BROKERS,
    PG_SERVER_URL,
    RABBITMQ_URL,
    REDIS_URL,
    prepare,
)
from bench.measure import Sizes
from bench.runner import FIGURE_GROUPS, ROLES, Run
from bench.workers import install_cleanup

RESULTS_DIR = Path(__file__).resolve().parent / "results"

PRESETS = {
    "quick": Sizes(enqueue=200, bulk=300, throughput=200, latency_samples=10, drain=300,
                   endurance=600, idle_seconds=2.0, stats_settle=12.0,
                   cap=2.5, latency_cap=2.5, endurance_cap=4.0,
                   results_samples=20, chord=100, at_once=1000, results_cap=30.0),
    "full": Sizes(enqueue=2000, bulk=10_000, throughput=2000, latency_samples=100, drain=5000,
                  endurance=200_000, idle_seconds=10.0, stats_settle=12.0,
                  cap=60.0, latency_cap=20.0, endurance_cap=900.0,
                  results_samples=100, chord=100, at_once=1000, results_cap=120.0),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Celery on pg_broker against Redis, RabbitMQ and kombu's SQL transports: "
                    "same app, task and worker settings; interleaved repeats; ratios to Redis.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, a few minutes (default: full sizes)")
    parser.add_argument("--brokers", default=",".join(DEFAULT_BROKERS),
                        help=f"comma-separated, from {','.join(ALL_BROKERS)} "
                             f"(default {','.join(DEFAULT_BROKERS)})")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repeats per figure (default 3; fewer is a smoke run)")
    parser.add_argument("--pg-server", default="auto",
                        help="PostgreSQL server (maintenance database URL) for pgbroker, "
                             "sqla and pgmq; each gets a bench database of its own there. "
                             f"'auto' (the default): {PG_SERVER_URL} if it has "
                             "pg_stat_statements loaded, else 'private': a PostgreSQL 15 the "
                             "bench starts on a free port with pg_stat_statements "
                             "(track_planning on) and stops at the end, so the run can say "
                             "what each statement costs the database per task")
    parser.add_argument("--redis-url", default=REDIS_URL,
                        help=f"Redis for the redis broker and backend (default {REDIS_URL}); "
                             "a server of your own keeps two runs at once apart")
    parser.add_argument("--rabbitmq-url", default=RABBITMQ_URL,
                        help=f"RabbitMQ for the rabbitmq broker (default {RABBITMQ_URL}); "
                             "a vhost of your own keeps two runs at once apart")
    parser.add_argument("--pgbroker-database", default=None,
                        help="use this existing database for pgbroker instead of "
                             "pg_broker_bench on --pg-server")
    parser.add_argument("--results-only", action="store_true",
                        help="only the result-backend figures (request/response, chord, "
                             "results at once, end to end with results) of the brokers "
                             "that have a result backend")
    parser.add_argument("--only", default=None, metavar="FIGURES",
                        help="comma-separated groups of figures to measure, the others "
                             f"skipped (and the workers they alone need not started): "
                             f"{','.join(FIGURE_GROUPS)}; e.g. --only endurance")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    for field in dataclasses.fields(Sizes):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=field.type == "int" and int
                            or float, default=None, help=f"override the preset's {field.name}")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    preset = PRESETS["quick" if args.quick else "full"]
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)
                 if getattr(args, f.name) is not None}
    return dataclasses.replace(preset, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("bench").setLevel(logging.DEBUG)
    install_cleanup()
    names = [n.strip() for n in args.brokers.split(",") if n.strip()]
    unknown = set(names) - set(ALL_BROKERS)
    if unknown:
        print(f"unknown broker(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    only = None
    if args.only:
        only = {n.strip() for n in args.only.split(",") if n.strip()}
        if only - set(FIGURE_GROUPS):
            print(f"unknown figure group(s): {', '.join(sorted(only - set(FIGURE_GROUPS)))}; "
                  f"choose from {','.join(FIGURE_GROUPS)}", file=sys.stderr)
            return 2
    sizes = sizes_from(args)
    mode = "quick" if args.quick else "full"
    started = dt.datetime.now(dt.UTC)
    print(f"pg_broker benchmark ({mode}), {args.repeats} interleaved repeats, {sizes}")

    on_server = [n for n in names if n not in ("redis", "rabbitmq", "pgbroker-embedded")
                 and not (n == "pgbroker" and args.pgbroker_database)]
    server, pg_server, pg_server_note = choose_pg_server(args.pg_server if on_server
                                                         else PG_SERVER_URL)
    try:
        return run_and_report(args, argv, names, sizes, mode, started, pg_server, pg_server_note,
                              only)
    finally:
        if server is not None:
            server.destroy()


def choose_pg_server(wanted: str):
    """(private server or None, maintenance URL, what the report says about it)."""
    if wanted == "auto":
        wanted = PG_SERVER_URL if has_statements(PG_SERVER_URL) else "private"
    if wanted != "private":
        return None, wanted, "given server"
    from tests.chaos.servers import PostgresServer

    server = PostgresServer("bench")
    server.settings.update({
        # As the shared server here (shared_buffers 128MB), plus the statistics.
        "shared_buffers": "128MB",
        "shared_preload_libraries": "'pg_stat_statements'",
        "pg_stat_statements.track_planning": "on",
    })
    server.start()
    return server, server.url(), (
        "private PostgreSQL 15 started by the bench (tests.chaos.servers: fsync on, "
        "shared_buffers 128MB, autovacuum on, pg_stat_statements with track_planning), "
        "data directory on the same disk as the shared server's")


def has_statements(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            loaded = conn.execute("SHOW shared_preload_libraries").fetchone()[0]
    except psycopg.Error:
        return False
    return "pg_stat_statements" in loaded


def run_and_report(args, argv, names, sizes, mode, started, pg_server, pg_server_note,
                   only) -> int:
    brokers = prepare(names, pg_server, args.pgbroker_database,
                      redis_url=args.redis_url, rabbitmq_url=args.rabbitmq_url)
    if args.results_only:
        brokers = [b for b in brokers if b.result_backend]
        for broker in brokers:
            broker.results_only = True
    for broker in brokers:
        if broker.skip:
            print(f"skipping {broker.name}: not reachable or not set up ({broker.skip})")
    run = Run(brokers, sizes, args.repeats, only=only)
    load_before = os.getloadavg()
    clock = time.monotonic()
    run.execute()
    duration = time.monotonic() - clock

    measured = [b.name for b in brokers if b.skip is None]
    summary = report.summarise(run.samples, measured)
    print()
    print(report.text_table(summary, measured))
    print(report.statements_table(run.series, measured))
    for broker, messages in run.errors.items():
        print(f"errors on {broker}: {len(messages)} (first: {messages[0]})")
    capped = {k: dict(v) for k, v in run.capped.items()}
    if capped:
        print("hit the time cap (figure = what finished in the time):",
              ", ".join(f"{k}[{', '.join(v)}]" for k, v in capped.items()))

    document = {
        "meta": {
            "mode": mode,
            "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
            "started": started.isoformat(timespec="seconds"),
            "duration_seconds": round(duration, 1),
            "repeats": args.repeats,
            "only": sorted(only) if only else None,
            "order": "interleaved: every repeat runs every broker in turn",
            "sizes": dataclasses.asdict(sizes),
            "worker_roles": {role: {"pool": p, "concurrency": c, "events": e}
                             for role, (p, c, e) in ROLES.items()},
            "flower": {"watches": "the events worker (its own control exchange)",
                       "dashboard_refresh_s": flower.TABLE_REFRESH,
                       "inspect_refresh_every_s": flower.INSPECT_INTERVAL},
            "pg_server": pg_server_note,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "machine": machine_facts(),
        "versions": versions(brokers),
        "brokers": {
            b.name: {"url": mask(b.url), "description": b.description, "version": b.version,
                     "skipped": b.skip}
            for b in brokers
        },
        "figures": summary,
        "capped": capped,
        "errors": dict(run.errors),
        "statements": dict(run.statements),
        "series": {key: dict(by_broker) for key, by_broker in run.series.items()},
    }
    out = args.out or RESULTS_DIR / f"bench-{mode}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    report.write_json(out, document)
    out.with_suffix(".md").write_text(report.markdown_table(summary, measured) + "\n")
    print(f"\nwrote {out} (and {out.with_suffix('.md').name}) in {duration:.0f}s")
    return 0


def machine_facts() -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions(brokers: list) -> dict:
    found = {}
    for package in ("celery", "kombu", "pg_broker", "flower", "psycopg", "redis", "amqp",
                    "sqlalchemy", "pgmq"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    for broker in brokers:
        if broker.version:
            found[f"{broker.name} server"] = broker.version
    return found


def mask(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


if __name__ == "__main__":
    sys.exit(main())
