"""A PgBouncer of the test's own: Debian's ``pgbouncer`` binary started on a
free port with a temporary configuration, in front of the test server, in
session or transaction mode (issue 16). Tests that need one skip, saying
why, where the binary is absent (``.ci/run`` installs it). Also a fixture
plugin (``pytest_plugins = ["pgbouncer"]``): ``transaction_pooler`` and
``session_pooler``, one per test module."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from chaos.servers import free_port
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pg_broker.database import with_database

BINARY = "pgbouncer"
MISSING = "Debian's pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)"
# How long a starting PgBouncer may take to accept connections.
START_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def transaction_pooler(server_url: str) -> Iterator[str]:
    """PgBouncer in transaction mode; a small pool, so that clients share
    server sessions as they would in production."""
    if not available():
        pytest.skip(MISSING)
    with pgbouncer(server_url, "transaction", pool_size=4) as url:
        yield url


@pytest.fixture(scope="module")
def session_pooler(server_url: str) -> Iterator[str]:
    """PgBouncer in session mode."""
    if not available():
        pytest.skip(MISSING)
    with pgbouncer(server_url, "session") as url:
        yield url


def through(pooler_url: str, database_url: str) -> str:
    """``database_url``'s database, reached through the pooler."""
    return with_database(pooler_url, conninfo_to_dict(database_url)["dbname"])


def available() -> bool:
    return shutil.which(BINARY) is not None


def version() -> tuple[int, ...]:
    """PgBouncer's version, e.g. (1, 18, 0)."""
    out = subprocess.run([BINARY, "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(part) for part in re.search(r"(\d+)\.(\d+)\.(\d+)", out).groups())


@contextmanager
def pgbouncer(server_url: str, pool_mode: str, pool_size: int = 20) -> Iterator[str]:
    """Run PgBouncer in ``pool_mode`` in front of the server of ``server_url``;
    yields ``server_url`` with its host and port replaced by PgBouncer's.
    Every database of the server is reachable through it, logged in as
    ``server_url``'s user (``auth_type = any``)."""
    params = conninfo_to_dict(server_url)
    server = " ".join(f"{key}={params[key]}" for key in ("host", "port", "user", "password")
                      if params.get(key))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pg_broker_pgbouncer_") as directory:
        config = Path(directory) / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = {server}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            "auth_type = any\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 1000\n"
            f"logfile = {directory}/pgbouncer.log\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        command = [BINARY, str(config)]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            user = _unprivileged(params.get("host", ""))
            os.chown(directory, pwd.getpwnam(user).pw_uid, -1)
            os.chmod(directory, 0o755)
            command[1:1] = ["-u", user]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        url = make_conninfo(server_url, host="127.0.0.1", port=str(port))
        try:
            _wait_until_accepting(url, process, Path(directory) / "pgbouncer.log")
            yield _as_url(url)
        finally:
            process.terminate()
            process.wait(10)


def _unprivileged(host: str) -> str:
    """Who PgBouncer runs as when the tests run as root: the owner of the
    server's socket directory (the embedded server's), else nobody."""
    if host.startswith("/"):
        owner = pwd.getpwuid(os.stat(host).st_uid).pw_name
        if owner != "root":
            return owner
    return "nobody"


def _as_url(conninfo: str) -> str:
    params = conninfo_to_dict(conninfo)
    dbname = params.pop("dbname", "postgres")
    host, port = params.pop("host"), params.pop("port")
    user = params.pop("user", "")
    password = params.pop("password", "")
    auth = f"{user}{':' + password if password else ''}@" if user else ""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"postgresql://{auth}{host}:{port}/{dbname}" + (f"?{query}" if query else "")


def _wait_until_accepting(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {process.returncode}: "
                               f"{log.read_text() if log.exists() else ''}")
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
