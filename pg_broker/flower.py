"""Flower's Broker tab and ``/api/queues/length`` for ``pgbroker://``.

Flower asks ``flower.utils.broker.Broker(broker_url, ...)`` for an object with
``async def queues(names)`` and knows only RabbitMQ and Redis URLs; for any
other scheme the Broker page stays empty and the API answers 404.
:func:`install` teaches that factory the ``pgbroker`` scheme, answering from
``job_tasks`` and ``broker_transient_messages``.

It runs by itself when Flower is imported in an environment where pg_broker
is installed (``pg_broker.pth``; see :mod:`pg_broker.scheme`), or imported
before it. Where that file is not read, put this in ``flowerconfig.py``::

    import pg_broker.flower
    pg_broker.flower.install()
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pg_broker.masking import redacting
from pg_broker.queries import queries
from pg_broker.urls import libpq_url

log = logging.getLogger(__name__)

SCHEME = "pgbroker"  # as pg_broker.urls.SCHEME


class PgBroker:
    """Queue lengths for Flower, read from the broker database."""

    def __init__(self, broker_url: str, *_: Any, **__: Any) -> None:
        self.url = libpq_url(broker_url)

    async def queues(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """One dict per queue name: messages, ready, unacknowledged, consumers.

        ``messages`` counts every message the queue holds (including those
        waiting for a retry back-off), ``messages_ready`` those a worker could
        take now, ``messages_unacknowledged`` those workers hold,
        ``consumers`` the processes consuming it now, idle or busy (their
        registrations, see :mod:`pg_broker.transport.leases`).
        """
        names = list(names)
        with redacting(self.url):  # Flower logs the error
            async with await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, row_factory=dict_row,
            ) as conn:
                cursor = await conn.execute(queries["flower_queue_lengths"], {"names": names})
                rows = {row["name"]: row for row in await cursor.fetchall()}
        return [
            {
                "name": name,
                "messages": rows[name]["messages"],
                "messages_ready": rows[name]["messages_ready"],
                "messages_unacknowledged": rows[name]["messages_unacknowledged"],
                "consumers": rows[name]["consumers"],
            }
            for name in names
        ]


def install() -> None:
    """Make Flower's broker factory answer ``pgbroker://`` URLs with :class:`PgBroker`.

    Flower binds ``Broker`` by name in several modules, so the factory's
    ``__new__`` is wrapped in place rather than the name replaced. Idempotent.
    """
    from flower.utils.broker import Broker

    if getattr(Broker.__new__, "pg_broker", False):
        return
    flower_new = Broker.__new__

    def __new__(cls, broker_url, *args, **kwargs):
        if broker_url.startswith(f"{SCHEME}://"):  # no parse: it may be malformed
            return PgBroker(broker_url, *args, **kwargs)
        return flower_new(cls, broker_url, *args, **kwargs)

    __new__.pg_broker = True
    Broker.__new__ = staticmethod(__new__)
    log.debug("Flower's broker view now reads %s:// queues", SCHEME)
