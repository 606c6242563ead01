"""The ``pg-broker`` command: one subcommand per thing an operator does."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from pg_broker import metrics
from pg_broker.database import (
    DatabaseUnavailable,
    configured_url,
    connect,
    database_url,
    default_data_dir,
    embedded_pid,
    embedded_url,
    stop_embedded,
)
from pg_broker.masking import mask_url, url_problem
from pg_broker.migrate import MigrationFailed, ensure_migrated, layer_installed, migrate
from pg_broker.queries import queries
from pg_broker.states import JobStatus

log = logging.getLogger(__name__)


def cmd_migrate(args: argparse.Namespace) -> int:
    url = database_url()
    applied = migrate(url, supabase=True if args.supabase else None)
    for migration in applied:
        print(f"applied {migration.label}")
    with connect(url, autocommit=True) as conn:
        if not layer_installed(conn):
            print("the Supabase/RLS layer is not installed (pg-broker migrate --supabase "
                  "installs it); the broker needs only the core schema")
    if not applied:
        print(f"{mask_url(url)}: schema up to date")
    return 0


def cmd_url(args: argparse.Namespace) -> int:
    url = database_url()
    print(mask_url(url))
    problem = url_problem(url)
    if problem:
        print(f"pg-broker url: the URL is malformed: {problem}", file=sys.stderr)
        return 2
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    url = database_url()
    ensure_migrated(url)
    with connect(url, autocommit=True) as conn:
        _print_table("Jobs by status", ["status", "count"], conn.execute(queries["jobs_by_status"]))
        _print_table(
            "Task backlog",
            ["task_type", "status", "count"],
            conn.execute(queries["backlog_by_task_type"]),
        )
        _print_table(
            "Worker health",
            ["worker_id", "active_tasks", "last_seen"],
            conn.execute(queries["worker_health"]),
        )
        _print_table(
            "Live consumers by queue (idle or busy)",
            ["queue", "worker_id", "holds", "since"],
            conn.execute(queries["consumers_by_queue"]),
        )
        (stale,) = conn.execute(queries["stale_tasks"]).fetchone()
        print(f"\nStale tasks (no heartbeat for 10 minutes): {stale}")
    return 0


def cmd_reclaim(args: argparse.Namespace) -> int:
    url = database_url()
    ensure_migrated(url)
    with connect(url, autocommit=True) as conn:
        (count,) = conn.execute(queries["reclaim_stale_tasks"]).fetchone()
    print(f"reclaimed {count} task(s) with expired leases")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """The embedded server outlives the command that started it, so that the
    next command, worker or producer finds it running; this starts, stops
    and shows it."""
    data_dir = default_data_dir()
    if configured_url():
        print(f"note: PG_BROKER_URL/DATABASE_URL is set, so pg-broker and workers use "
              f"{mask_url(configured_url())}, not the embedded server", file=sys.stderr)
    if args.action == "start":
        url = embedded_url()
        print(f"embedded PostgreSQL running (pid {embedded_pid(data_dir)}), data in {data_dir}")
        print(f"url: {url}")
        return 0
    pid = embedded_pid(data_dir)
    if args.action == "status":
        if pid is None:
            print(f"embedded PostgreSQL not running (data in {data_dir})")
            return 3
        print(f"embedded PostgreSQL running (pid {pid}), data in {data_dir}")
        url = embedded_url()
        with connect(url, autocommit=True) as conn:
            (sessions,) = conn.execute(queries["client_sessions"]).fetchone()
        print(f"url: {url}")
        print(f"client sessions: {sessions} (workers hold 2 or more each)")
        return 0
    if pid is None:
        print(f"embedded PostgreSQL not running (data in {data_dir})")
        return 0
    with connect(embedded_url(), autocommit=True) as conn:
        (sessions,) = conn.execute(queries["client_sessions"]).fetchone()
    stop_embedded(data_dir)
    print(f"embedded PostgreSQL stopped (pid {pid}); {sessions} client session(s) ended, "
          f"data kept in {data_dir}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from pg_broker import doctor

    results = doctor.run()
    print(doctor.report(results))
    return 1 if doctor.failed(results) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    demo = _app_module("tasks.demo", "demo")
    return demo.run_demo(chapters=args.chapters, pool=args.pool, concurrency=args.concurrency,
                         timeout=args.timeout)


def cmd_submit(args: argparse.Namespace) -> int:
    demo = _app_module("tasks.demo", "submit")
    package = _app_module("tasks.package", "submit")
    chapters = [package.Chapter(Path(f).stem, Path(f).read_text(encoding="utf-8"))
                for f in args.files]
    url = database_url()
    ensure_migrated(url)
    with connect(url, autocommit=True) as conn:
        try:
            job_id = package.submit_package(conn, user_id=args.user, title=args.title,
                                            chapters=chapters or demo.demo_chapters(),
                                            voice=args.voice, rate_wpm=args.speed)
        except ValueError as exc:
            print(f"pg-broker submit: {exc}", file=sys.stderr)
            return 2
        print(job_id)
        if args.wait:
            try:
                with demo.JobProgress(sys.stdout) as progress:
                    job = demo.wait_for_job(conn, job_id, timeout=args.wait,
                                            on_progress=progress.update)
            except TimeoutError as exc:
                print(f"pg-broker submit: {exc}; is a worker running (celery -A tasks worker)?",
                      file=sys.stderr)
                return 1
            return 0 if job.status == JobStatus.COMPLETED else 1
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    from pg_broker.jobs import get_job

    storage = _app_module("tasks.storage", "job")  # the artifacts' URLs are the app's
    package = _app_module("tasks.package", "job")  # and what each task makes
    url = database_url()
    ensure_migrated(url)
    with connect(url, autocommit=True) as conn:
        job = get_job(conn, args.job_id, artifact_url=storage.artifact_url)
    if job is None:
        print(f"pg-broker job: no job {args.job_id}", file=sys.stderr)
        return 1
    labels = package.task_labels(job) if job.job_type == package.PACKAGE else {}
    print(f"job {job.id} ({job.job_type})")
    for name, value in (
        ("title", job.title or "-"), ("owner", job.user_id or "-"),
        ("status", f"{job.status}, progress {job.progress}% ({job.completed_tasks} completed, "
                   f"{job.failed_tasks} failed of {job.total_tasks})"),
        ("created", _when(job.created_at)), ("finished", _when(job.completed_at)),
    ):
        print(f"  {name:<9} {_fit(str(value), WIDTH - 12)}")
    for line in _wrapped(job.error, "  error     "):
        print(line)

    print("\nTasks" if job.tasks else "\nTasks (none: their rows are past retention)")
    if job.tasks:
        print(f"  {'task':<44}  {'status':<10}  {'tries':<5}  row")
    for t in job.tasks:
        label = labels.get(t.task_id) or (t.task_type or "?").rsplit(".", 1)[-1]
        print(f"  {_fit(label, 44):<44}  {t.status:<10}  {t.attempts}/{t.max_attempts:<3}  {t.id}")
        for line in _wrapped(t.error, "    ", limit=3):
            print(line)

    links = [link for link in job.artifacts if link.url]
    base = _common_directory([link.url for link in links])
    if base:
        # {storage root}/{user}/{job}/ is too long for one line: the root, then the job's folder.
        root, folder = base.rstrip("/").rsplit("/", 2)[0] + "/", "/".join(base.split("/")[-3:])
        print(f"\nFiles under {root}\n  {folder}")
    else:
        print("\nFiles" if links else "\nFiles (none yet)")
    for link in links:
        a = link.artifact
        label = labels.get(a.task_id) or a.kind
        size = f"{a.bytes / 1e6:.1f} MB" if a.bytes >= 1e6 else f"{a.bytes / 1e3:.0f} kB"
        length = (f"{int(a.duration_seconds) // 60}:{int(a.duration_seconds) % 60:02d}"
                  if a.duration_seconds is not None else
                  f"{a.metadata['pages']} pages" if "pages" in a.metadata else "")
        print(f"  {_fit(label, WIDTH - 24):<{WIDTH - 24}}  {length:>8}  {size:>8}")
        print(f"    {link.url.removeprefix(base) if base else link.url}")
    return 0


WIDTH = 80  # a line of the job's report fits a terminal this wide (all but a long URL)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _wrapped(text: str | None, indent: str, limit: int = 6) -> list[str]:
    import textwrap

    if not text:
        return []
    lines = textwrap.wrap(" ".join(text.split()), WIDTH - len(indent))
    if len(lines) > limit:
        lines = [*lines[:limit - 1], _fit(lines[limit - 1] + " …", WIDTH - len(indent))]
    return [(indent if n == 0 else " " * len(indent)) + line for n, line in enumerate(lines)]


def _common_directory(urls: list[str]) -> str:
    """The ``file://`` directory every URL is in, with its slash, or '' when
    they are not all local files."""
    import posixpath

    if not urls or not all(u.startswith("file://") for u in urls):
        return ""
    paths = [posixpath.dirname(u.removeprefix("file://")) for u in urls]
    return "file://" + posixpath.commonpath(paths).rstrip("/") + "/"


def cmd_dead(args: argparse.Namespace) -> int:
    from pg_broker.maintenance import dead_tasks, not_dead_letters, retry_dead_tasks

    url = database_url()
    ensure_migrated(url)
    with connect(url, autocommit=True) as conn:
        if args.action == "list":
            _print_table("Dead and failed tasks",
                         ["id", "task_id", "type", "status", "attempts", "error"],
                         [(t["id"], t["task_id"], t["task_type"], t["status"],
                           f"{t['attempts']}/{t['max_attempts']}", (t["error"] or "")[:60])
                          for t in dead_tasks(conn, args.limit)])
            return 0
        if bool(args.ids) == args.all:
            print("pg-broker dead retry: give task ids, or --all", file=sys.stderr)
            return 2
        with conn.transaction():
            unknown = [] if args.all else not_dead_letters(conn, args.ids)
            if unknown:
                print(f"pg-broker dead retry: no dead or failed task {', '.join(unknown)} "
                      "(pg-broker dead list shows them); nothing re-queued", file=sys.stderr)
                return 1
            count = retry_dead_tasks(conn, None if args.all else args.ids)
    print(f"re-queued {count} task(s)")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    url = database_url()
    ensure_migrated(url)
    if args.serve:
        metrics.serve(url, args.host, args.port)
        return 0
    with connect(url, autocommit=True) as conn:
        print(metrics.exposition(conn), end="")
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    from pg_broker.maintenance import ResultExpiry, Retention, default_retention

    url = database_url()
    ensure_migrated(url)
    age = args.older_than or default_retention()
    retention = Retention.older_than(age)
    if args.partitioned_history:
        retention.partitioned = True
    with connect(url, autocommit=True) as conn:
        deleted = retention.run(conn)
        expired = ResultExpiry().run(conn)
    if retention.partitioned:
        print(f"{deleted} finished task row(s) left job_tasks (finished jobs' completed and "
              f"cancelled rows to job_tasks_history, kept {age} after their job; the rest "
              f"deleted past {age})")
    else:
        print(f"deleted {deleted} finished task row(s) older than {age}")
    print(f"deleted {expired} expired result(s) and chord counter(s)")
    return 0


class AppMissing(RuntimeError):
    """A command of the app was run where the app is not installed."""


def _app_module(name: str, command: str):
    """A module of the worker app (tasks/), imported only when one of its
    commands runs: the library never imports its app at import time."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise AppMissing(
            f"pg-broker {command} needs the worker app ({name}), which did not import "
            f"({exc}); install it with: pip install 'pg_broker[app]' "
            "(in a checkout: pip install -e '.[app]')") from exc


def cmd_api(args: argparse.Namespace) -> int:
    api = _app_module("tasks.api", "api")
    auth = _app_module("tasks.api.auth", "api")
    try:
        api.serve(args.host, args.port, dev=args.dev)
    except auth.AuthNotConfigured as exc:
        print(f"pg-broker api: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    auth = _app_module("tasks.api.auth", "token")
    secret = auth.DEV_SECRET if args.dev else os.environ.get(auth.SECRET_VARIABLE, "").strip()
    if not secret:
        print(f"pg-broker token: set {auth.SECRET_VARIABLE} (the JWT secret the API checks), "
              "or pass --dev for the built-in development secret (pg-broker api --dev)",
              file=sys.stderr)
        return 2
    print(auth.mint_token(args.user, secret, expires_in=args.expires_in))
    return 0


def _print_table(title: str, columns: Sequence[str], rows) -> None:
    rows = [tuple("" if v is None else _when(v) if isinstance(v, datetime) else str(v)
                  for v in row) for row in rows]
    print(f"\n{title}")
    if not rows:
        print("  (none)")
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _job_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a job id (a UUID, as pg-broker submit prints)") from None


def _when(moment: datetime | None) -> str:
    """Every time the CLI prints, in one format: to the second, in UTC."""
    return "-" if moment is None else f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg-broker",
        description="Celery on PostgreSQL: schema, monitoring and maintenance. "
        "The database is PG_BROKER_URL (or DATABASE_URL); with neither set, an "
        "embedded PostgreSQL in a per-user data directory (PG_BROKER_DATA_DIR).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(func=func)
        return command

    migrate_command = add(
        "migrate", cmd_migrate, "apply the migrations in migrations/ that are not applied yet: "
        "the core schema, and the Supabase/RLS layer where it is installed or Supabase is detected")
    migrate_command.add_argument(
        "--supabase", action="store_true",
        help="install the Supabase/RLS layer too (roles anon, authenticated and service_role "
        "where they are missing, auth.uid(), row-level security, grants)")
    add("url", cmd_url, "print the database URL in use (password masked)")
    add("status", cmd_status, "jobs by status, task backlog, worker health and stale tasks")
    add("reclaim", cmd_reclaim, "return tasks with expired leases to pending (or dead)")
    server = add("server", cmd_server, "the embedded PostgreSQL (used when PG_BROKER_URL and "
                 "DATABASE_URL are unset): start it, stop it, or show whether it runs "
                 "(status exits 3 when it does not)")
    server.add_argument("action", choices=("start", "stop", "status"))
    add("doctor", cmd_doctor, "check the set-up: configuration, database, migrations, the "
        "Supabase layer, storage, LISTEN/NOTIFY, clock skew; each problem with its fix")

    demo = add("demo", cmd_demo, "start a worker, run a real 16-chapter package job "
               "(speech to MP3, a PDF), show where the files are, stop the worker")
    demo.add_argument("--chapters", type=int, default=16, help="chapters (default 16)")
    demo.add_argument("--pool", choices=("prefork", "solo", "threads"), default="prefork")
    demo.add_argument("--concurrency", type=int, help="worker processes (default: CPU count)")
    demo.add_argument("--timeout", type=float, default=600, help="seconds to wait for the job")

    submit = add("submit", cmd_submit, "submit a package job: one MP3 per chapter file and a "
                 "PDF of them all (no files: the demo's chapters); prints the job id")
    submit.add_argument("files", nargs="*", help="chapter text files, in order")
    submit.add_argument("--title", default="Package", help="the package title")
    submit.add_argument("--user", default="00000000-0000-4000-8000-00000000d3e0",
                        help="the owner's user id (uuid)")
    submit.add_argument("--voice", default="en-us", help="eSpeak NG voice (en-us, en-gb, de, fr …)")
    submit.add_argument("--speed", type=int, default=175, help="words per minute (80–450)")
    submit.add_argument("--wait", type=float, metavar="SECONDS",
                        help="wait for the job, showing progress")

    job = add("job", cmd_job, "a job's status, progress, tasks and artifacts (with URLs)")
    job.add_argument("job_id", type=_job_id, help="the job's uuid")

    dead = add("dead", cmd_dead, "dead letters: list failed and dead tasks, or re-queue them")
    dead.add_argument("action", choices=("list", "retry"))
    dead.add_argument("ids", nargs="*", help="retry: row ids or Celery task ids")
    dead.add_argument("--all", action="store_true", help="retry: every dead or failed task")
    dead.add_argument("--limit", type=int, default=100, help="list: at most this many")

    api = add("api", cmd_api, "serve the HTTP API and its page (needs SUPABASE_JWT_SECRET or "
              "SUPABASE_URL to check tokens, or --dev)")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    api.add_argument("--dev", action="store_true",
                     help="accept tokens of the built-in development secret (never in production)")

    token = add("token", cmd_token, "print an access token for a user, signed with "
                "SUPABASE_JWT_SECRET (or --dev), for local use of the API")
    token.add_argument("--user", type=uuid.UUID, required=True, help="the user's id (uuid)")
    token.add_argument("--expires-in", type=int, default=3600, metavar="SECONDS",
                       help="lifetime (default 3600)")
    token.add_argument("--dev", action="store_true", help="sign with the development secret")

    metrics_command = add("metrics", cmd_metrics, "per queue: ready, delayed, oldest ready message's age, "
                  "held leases, renewals, dead letters, in Prometheus's text format; --serve "
                  "serves them at /metrics")
    metrics_command.add_argument("--serve", action="store_true",
                                 help="serve http://HOST:PORT/metrics")
    metrics_command.add_argument("--host", default="127.0.0.1",
                                 help="address to listen on (default 127.0.0.1)")
    metrics_command.add_argument("--port", type=int, default=metrics.DEFAULT_PORT,
                                 help=f"port (default {metrics.DEFAULT_PORT})")

    retention = add("retention", cmd_retention, "delete finished task rows older than an age "
                    "(a job's once the job finished that long ago), and results past their "
                    "result_expires")
    retention.add_argument("--older-than", metavar="INTERVAL",
                           help="a PostgreSQL interval (default PG_BROKER_RETENTION or '7 days')")
    retention.add_argument("--partitioned-history", action="store_true",
                           help="move finished jobs' completed and cancelled rows to the "
                                "day-partitioned job_tasks_history instead of deleting them "
                                "(default: PG_BROKER_PARTITIONED_HISTORY); old days are "
                                "dropped either way")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        # What a command did, it prints; logs are for warnings (and -v).
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (DatabaseUnavailable, MigrationFailed, AppMissing) as exc:
        print(f"pg-broker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
