"""kombu's own transport integration tests, run against ``pgbroker://``.

The test classes come from ``t/integration/common.py`` of the kombu source
distribution matching the installed kombu (downloaded from PyPI once, then
cached), and are wired the way kombu's ``t/integration/test_redis.py`` wires
Redis: a ``connection`` fixture to a live broker, an ``invalid_connection``
fixture to nothing, and ``PRIORITY_ORDER`` for the priority direction.
None of kombu's code is copied here; pytest collects the subclasses below.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import kombu
import psycopg
import pytest
from celery_workers import pgbroker_url

import pg_broker  # noqa: F401  (registers the pgbroker scheme)

KOMBU_VERSION = importlib.metadata.version("kombu")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pg_broker-test"
# Nothing listens on port 1: connecting fails at once.
UNREACHABLE_URL = "pgbroker://postgres@127.0.0.1:1/postgres?connect_timeout=2"


def _download_sdist(version: str) -> Path:
    """kombu's sdist from PyPI, through pip, kept in the cache directory."""
    sdist = CACHE_DIR / f"kombu-{version}.tar.gz"
    if sdist.exists():
        return sdist
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as download_dir:
        command = [
            sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
            "--no-deps", "--disable-pip-version-check", f"kombu=={version}", "-d", download_dir,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        downloaded = Path(download_dir) / sdist.name
        if done.returncode != 0 or not downloaded.exists():
            raise RuntimeError(
                f"could not download the kombu {version} source distribution from PyPI "
                f"(needed for kombu's transport integration tests; `{' '.join(command)}` "
                f"exited {done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        downloaded.replace(sdist)
    return sdist


def _kombu_source(version: str) -> Path:
    """The extracted source tree of kombu ``version`` (downloaded once, then cached)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    source = CACHE_DIR / f"kombu-{version}"
    # Several pytest sessions may start at once: one downloads, the others wait.
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (source / "t" / "integration" / "common.py").exists():
            sdist = _download_sdist(version)
            with tempfile.TemporaryDirectory(dir=CACHE_DIR) as extract_dir:
                with tarfile.open(sdist) as archive:
                    archive.extractall(extract_dir, filter="data")
                shutil.rmtree(source, ignore_errors=True)
                (Path(extract_dir) / source.name).replace(source)
    return source


def _import_integration_common() -> ModuleType:
    source = _kombu_source(KOMBU_VERSION)
    # common.py's own imports resolve against the sdist's tree (t.*) if it has any.
    if str(source) not in sys.path:
        sys.path.append(str(source))
    path = source / "t" / "integration" / "common.py"
    spec = importlib.util.spec_from_file_location("kombu_integration_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _import_integration_common()


@pytest.fixture
def connection(db: psycopg.Connection, database_url: str) -> Iterator[kombu.Connection]:
    """A connection to the test database's broker, all broker tables emptied."""
    conn = kombu.Connection(pgbroker_url(database_url))
    yield conn
    conn.release()


@pytest.fixture
def invalid_connection() -> Iterator[kombu.Connection]:
    conn = kombu.Connection(UNREACHABLE_URL)
    yield conn
    conn.release()


class TestPgBrokerBasicFunctionality(common.BasicFunctionality):
    def test_failed_connection_raises_a_transport_connection_error(self, invalid_connection):
        with pytest.raises(Exception) as raised:
            invalid_connection.connect()
        assert isinstance(raised.value, invalid_connection.transport.connection_errors)


class TestPgBrokerBaseExchangeTypes(common.BaseExchangeTypes):
    pass


class TestPgBrokerTimeToLive(common.BaseTimeToLive):
    pass


class TestPgBrokerPriority(common.BasePriority):
    # Higher numbers are delivered first, as on RabbitMQ (py-amqp's 'asc'),
    # the opposite of kombu's Redis transport ('desc').
    PRIORITY_ORDER = "asc"


class TestPgBrokerMessage(common.BaseMessage):
    pass


class TestPgBrokerEventLoop(common.BaseEventLoop):
    pass
