"""The ``pg-broker`` command: one subcommand per thing an operator does."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from pg_broker.database import DatabaseUnavailable, connect, database_url, mask_url
from pg_broker.migrate import ensure_migrated, migrate
from pg_broker.queries import queries

log = logging.getLogger(__name__)


def cmd_migrate(args: argparse.Namespace) -> int:
    url = database_url()
    applied = migrate(url)
    if applied:
        for migration in applied:
            print(f"applied {migration.version:03d}_{migration.name}")
    else:
        print(f"{mask_url(url)}: schema up to date")
    return 0


def cmd_url(args: argparse.Namespace) -> int:
    print(mask_url(database_url()))
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


def _print_table(title: str, columns: Sequence[str], rows) -> None:
    rows = [tuple("" if v is None else str(v) for v in row) for row in rows]
    print(f"\n{title}")
    if not rows:
        print("  (none)")
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


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

    add("migrate", cmd_migrate, "apply the migrations in migrations/ that are not applied yet")
    add("url", cmd_url, "print the database URL in use (password masked)")
    add("status", cmd_status, "jobs by status, task backlog, worker health and stale tasks")
    add("reclaim", cmd_reclaim, "return tasks with expired leases to pending (or dead)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except DatabaseUnavailable as exc:
        print(f"pg-broker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
