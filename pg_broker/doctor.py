"""``pg-broker doctor``: is this machine's set-up able to run pg_broker?

Each check is a small function taking the shared :class:`Context` and
returning a :class:`Result` (ok, warn, fail or skip) with a fix for anything
not ok; :data:`CHECKS` lists them in order, so a new check is one function
and one line there. A check that needs the database is skipped, not failed,
when an earlier one found it unreachable.
"""

from __future__ import annotations

import importlib
import os
import secrets
import site
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from pg_broker.database import (
    LISTEN_URL_VARIABLE,
    URL_VARIABLES,
    DatabaseUnavailable,
    configured_listen_url,
    connect,
    database_url,
    mask_url,
)
from pg_broker.migrate import CORE, applied_versions, discover, layer_installed, migrations_dir
from pg_broker.queries import queries

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
# How far host and database clocks may drift before it matters: leases and
# visibility are the database's time, ETAs and token expiry the hosts'.
SKEW_WARN_SECONDS = 1.0
SKEW_FAIL_SECONDS = 30.0
NOTIFY_TIMEOUT = 5.0
SUPABASE_ROLES = ("anon", "authenticated", "service_role")
JOB_TABLES = ("jobs", "job_tasks", "job_artifacts")


@dataclass(frozen=True)
class Result:
    status: str
    message: str
    fix: str | None = None


@dataclass
class Context:
    """What the checks share: the database URL, one connection, the host clock."""

    url: str | None = None
    clock: Callable[[], float] = time.time
    notify_timeout: float = NOTIFY_TIMEOUT
    conn: psycopg.Connection | None = None
    facts: dict[str, object] = field(default_factory=dict)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def check_configuration(ctx: Context) -> Result:
    """Which database, from where; settings that contradict one another."""
    try:
        ctx.url = database_url()
    except DatabaseUnavailable as exc:
        return Result(FAIL, str(exc), "fix the embedded server's data directory, or set "
                      "PG_BROKER_URL to a PostgreSQL server")
    source = next((name for name in URL_VARIABLES if os.environ.get(name, "").strip()), None)
    where = f"{mask_url(ctx.url)} (from {source})" if source else \
        f"{mask_url(ctx.url)} (embedded server; set PG_BROKER_URL for a real one)"
    broker = os.environ.get("CELERY_BROKER_URL", "").strip()
    if broker and not broker.startswith("pgbroker://"):
        return Result(WARN, f"{where}; but CELERY_BROKER_URL sends tasks to {mask_url(broker)}",
                      "unset CELERY_BROKER_URL, or set it to pgbroker://… (during a cutover "
                      "this is expected)")
    supabase = [os.environ.get(n, "").strip() for n in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY")]
    if any(supabase) and not all(supabase):
        return Result(WARN, f"{where}; only one of SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY is "
                      "set, so artifacts go to local files",
                      "set both to store artifacts in Supabase Storage, or neither")
    return Result(OK, where)


def check_database(ctx: Context) -> Result:
    """The database answers."""
    if ctx.url is None:
        return Result(SKIP, "no database configured")
    try:
        ctx.conn = connect(ctx.url, autocommit=True)
    except DatabaseUnavailable as exc:
        return Result(FAIL, str(exc), "start the server, check host, port, user and password "
                      "in the URL, or unset PG_BROKER_URL to use the embedded server")
    version = ctx.conn.execute(queries["doctor_server_version"]).fetchone()[0]
    return Result(OK, f"PostgreSQL {version}, connected as {ctx.conn.info.user}")


def _record(ctx: Context) -> str | None:
    """How the database records its migrations: None (never migrated),
    'single-track' (by a pg_broker from before the tracks) or 'tracks'."""
    exists, tracked = ctx.conn.execute(queries["doctor_migrations_record"]).fetchone()
    return None if not exists else "tracks" if tracked else "single-track"


def check_migrations(ctx: Context) -> Result:
    """Every migration of this version of pg_broker is applied: the core
    track, and the Supabase layer's where it is installed."""
    if ctx.conn is None:
        return Result(SKIP, "database unreachable")
    record = _record(ctx)
    if record == "single-track":
        return Result(FAIL, "migrated by a pg_broker from before the migration tracks",
                      "pg-broker migrate (it records the database on the tracks and applies "
                      "what is new)")
    layer = record is not None and layer_installed(ctx.conn)
    known = {m.version: m for m in discover() if m.track == CORE or layer}
    applied = dict(applied_versions(ctx.conn)) if record else {}
    missing = [known[v].label for v in sorted(set(known) - set(applied))]
    if missing:
        return Result(FAIL, f"{len(missing)} of {len(known)} migrations not applied: "
                      + ", ".join(missing), "pg-broker migrate")
    newer = sorted(set(applied) - {m.version for m in discover()})
    if newer:
        return Result(WARN, f"the database has migrations this install does not know: {newer}",
                      f"upgrade pg_broker here (migrations from {migrations_dir()})")
    return Result(OK, f"all {len(known)} migrations applied")


def check_supabase_layer(ctx: Context) -> Result:
    """Where the Supabase layer is installed or Supabase detected: roles,
    auth.uid(), row-level security and submit_job() for users."""
    if ctx.conn is None:
        return Result(SKIP, "database unreachable")
    record = _record(ctx)
    # The single-track schema always had the layer.
    installed = record == "single-track" or (record == "tracks" and layer_installed(ctx.conn))
    if not installed and not ctx.conn.execute(queries["supabase_detected"]).fetchone()[0]:
        return Result(SKIP, "not installed: the broker needs only the core schema; for "
                      "row-level security and Supabase's users: pg-broker migrate --supabase")
    roles, uid, forced, submit = ctx.conn.execute(queries["doctor_supabase_layer"]).fetchone()
    missing = ([f"role {r}" for r in SUPABASE_ROLES if r not in roles]
               + ([] if uid else ["auth.uid()"])
               + [f"forced RLS on {t}" for t in JOB_TABLES if t not in forced]
               + ([] if submit else ["submit_job()"]))
    if missing:
        return Result(FAIL, "missing: " + ", ".join(missing),
                      "pg-broker migrate --supabase (as a role that may create roles, or "
                      "create anon, authenticated and service_role first)")
    return Result(OK, "roles, auth.uid(), forced row-level security and submit_job() in place")


def check_storage(ctx: Context) -> Result:
    """Where artifacts go: Supabase Storage's private bucket, or a writable directory."""
    try:  # the worker app's storage backends (tasks/storage.py), looked up only now
        storage = importlib.import_module("tasks.storage")
    except ImportError as exc:
        return Result(SKIP, f"no artifact storage: the worker app is not installed ({exc})",
                      "pip install -e '.[app]' in a pg_broker checkout "
                      "(pip install 'pg_broker[app]' from a wheel or package index)")

    url = os.environ.get("SUPABASE_URL", "").strip()
    key = os.environ.get("SUPABASE_SERVICE_ROLE_KEY", "").strip()
    if not (url and key):
        root = storage.LocalStorage().root
        probe = root / f".doctor-{secrets.token_hex(4)}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return Result(FAIL, f"local storage {root} is not writable ({exc})",
                          f"set {storage.STORAGE_DIR_VARIABLE} to a writable directory")
        return Result(OK, f"local files in {root} (set SUPABASE_URL and "
                      "SUPABASE_SERVICE_ROLE_KEY for Supabase Storage)")
    try:
        store = storage.SupabaseStorage(url, key)
        bucket = store.client.get_bucket(store.bucket)
    except Exception as exc:  # noqa: BLE001 - any client or HTTP error is the finding
        return Result(FAIL, f"Supabase Storage at {url}: bucket unavailable "
                      f"({str(exc).strip() or type(exc).__name__})",
                      "check SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY; pg-broker migrate "
                      "creates the private bucket job-artifacts on Supabase")
    if bucket.public:
        return Result(FAIL, f"bucket {store.bucket} is public: anyone with a path reads every "
                      "user's files", f"make it private (Storage → {store.bucket} → settings)")
    return Result(OK, f"Supabase Storage bucket {store.bucket} exists and is private")


def check_listen(ctx: Context) -> Result:
    """A notification sent on the database URL reaches a LISTEN connection on
    the listen URL (``PG_BROKER_LISTEN_URL``, else the same): what workers'
    wake-ups need. Through a transaction-mode pooler it does not."""
    if ctx.conn is None or ctx.url is None:
        return Result(SKIP, "database unreachable")
    listen_url = configured_listen_url() or ctx.url
    via = f" (LISTEN on {mask_url(listen_url)}, from {LISTEN_URL_VARIABLE})" \
        if listen_url != ctx.url else ""
    channel = f"pg_broker_doctor_{secrets.token_hex(6)}"
    try:
        with connect(listen_url, autocommit=True) as listener:
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            started = time.monotonic()
            ctx.conn.execute(queries["doctor_notify"], {"channel": channel})
            heard = list(listener.notifies(timeout=ctx.notify_timeout, stop_after=1))
    except (psycopg.Error, DatabaseUnavailable) as exc:
        return Result(FAIL, f"LISTEN failed{via}: {exc}", _POOLER_FIX)
    if not heard:
        return Result(FAIL, f"a notification sent on one connection did not reach another "
                      f"within {ctx.notify_timeout:.0f} s{via}: workers would wake only at "
                      "their 1 s safety poll", _POOLER_FIX)
    return Result(OK, f"LISTEN/NOTIFY round trip in {(time.monotonic() - started) * 1000:.1f} ms"
                  f"{via}")


_POOLER_FIX = (f"set {LISTEN_URL_VARIABLE} (or the transport option listen_url) to the database "
               "reached directly or through PgBouncer in session mode (Supabase: port 5432): a "
               "transaction-mode pooler, such as Supabase's port 6543, drops notifications; the "
               "other connections may stay on it")


def check_clock(ctx: Context) -> Result:
    """Host and database clocks agree (leases, ETAs and token expiry depend on both)."""
    if ctx.conn is None:
        return Result(SKIP, "database unreachable")
    before = ctx.clock()
    (server,) = ctx.conn.execute(queries["doctor_clock"]).fetchone()
    after = ctx.clock()
    skew = server - (before + after) / 2
    text = f"database clock {abs(skew):.3f} s {'ahead of' if skew > 0 else 'behind'} this host"
    if abs(skew) > SKEW_FAIL_SECONDS:
        return Result(FAIL, text, "synchronise both clocks (NTP: chrony or systemd-timesyncd)")
    if abs(skew) > SKEW_WARN_SECONDS:
        return Result(WARN, text, "synchronise both clocks (NTP): ETAs and token expiry drift "
                      "by as much")
    return Result(OK, text)


def check_scheme(ctx: Context) -> Result:
    """A Celery app that does not ``import pg_broker`` finds ``pgbroker://``
    (the installed pg_broker.pth registers it; see :mod:`pg_broker.scheme`)."""
    fix = ("reinstall pg_broker with pip (its wheel, and pip install -e, put pg_broker.pth into "
           "site-packages), or `import pg_broker` before the Celery app is created")
    if sys.flags.no_site:
        return Result(WARN, "this interpreter runs without site (-S): pg_broker.pth is not read",
                      fix)
    directories = [*site.getsitepackages(), site.getusersitepackages()]
    found = [d for d in directories if os.path.exists(os.path.join(d, "pg_broker.pth"))]
    if not found:
        return Result(WARN, f"no pg_broker.pth in {', '.join(directories)}: an app that does not "
                      "import pg_broker fails with \"KeyError: No such transport: pgbroker\"", fix)
    return Result(OK, f"pgbroker:// known to every Celery app of {sys.prefix} "
                  f"({os.path.join(found[0], 'pg_broker.pth')})")


CHECKS: list[tuple[str, Callable[[Context], Result]]] = [
    ("configuration", check_configuration),
    ("database", check_database),
    ("migrations", check_migrations),
    ("supabase layer", check_supabase_layer),
    ("storage", check_storage),
    ("listen/notify", check_listen),
    ("clock", check_clock),
    ("pgbroker:// scheme", check_scheme),
]


def run(ctx: Context | None = None,
        checks: list[tuple[str, Callable[[Context], Result]]] | None = None,
        ) -> list[tuple[str, Result]]:
    """Run every check in order; each result as (name, result)."""
    ctx = ctx or Context()
    results = []
    try:
        for name, check in checks or CHECKS:
            try:
                result = check(ctx)
            except psycopg.Error as exc:
                result = Result(FAIL, f"the database refused the check: {exc}",
                                "run pg-broker doctor as the role that owns the schema")
            results.append((name, result))
    finally:
        ctx.close()
    return results


def failed(results: list[tuple[str, Result]]) -> bool:
    return any(result.status == FAIL for _, result in results)


def report(results: list[tuple[str, Result]]) -> str:
    """One line per check, and the fix under each that is not ok."""
    width = max(len(name) for name, _ in results)
    lines = []
    for name, result in results:
        lines.append(f"{result.status:<4}  {name:<{width}}  {result.message}")
        if result.fix and result.status in (WARN, FAIL):
            lines.append(f"{'':<4}  {'':<{width}}  fix: {result.fix}")
    return "\n".join(lines)

