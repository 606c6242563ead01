"""kombu's own transport integration tests, run against ``pgbroker://``.

The test classes come from ``t/integration/common.py`` of the kombu source
distribution matching the installed kombu (downloaded from PyPI once, then
cached), and are wired the way kombu's ``t/integration/test_redis.py`` wires
Redis: a ``connection`` fixture to a live broker, an ``invalid_connection``
fixture to nothing, and ``PRIORITY_ORDER`` for the priority direction.
None of kombu's code is copied here; pytest collects the subclasses below.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from types import ModuleType

import kombu
import psycopg
import pytest
from sdists import source_tree

import pg_broker  # noqa: F401  (registers the pgbroker scheme)
from pg_broker.urls import broker_url

# Nothing listens on port 1: connecting fails at once.
UNREACHABLE_URL = "pgbroker://postgres@127.0.0.1:1/postgres?connect_timeout=2"


def _import_integration_common() -> ModuleType:
    source = source_tree("kombu", "t/integration/common.py", "kombu's transport integration tests")
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
    conn = kombu.Connection(broker_url(database_url))
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
