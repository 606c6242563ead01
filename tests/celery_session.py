"""pytest plugin: the session's in-process Celery app (``pytest_plugins = ["celery_session"]``).

The test app of ``tests/celery_app.py`` in the test process, on the test
database: producer, result reader and remote-control client beside the worker
subprocesses.
"""

from __future__ import annotations

from collections.abc import Iterator

import celery_app
import kombu.pools
import pytest
from celery import Celery

from pg_broker.urls import broker_url


@pytest.fixture(scope="session")
def app(database_url: str) -> Iterator[Celery]:
    """The test app in this process, on the test database.

    Its pooled broker connections are closed at the end of the session, with
    the transport's background threads, before the test database goes away.
    """
    app = celery_app.app
    app.conf.update(broker_url=broker_url(database_url), result_backend=broker_url(database_url))
    yield app
    kombu.pools.reset()
