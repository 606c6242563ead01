"""Broker URLs: ``pgbroker://…`` to a libpq URL, and back for display.

``pgbroker://user:pass@host:5432/db?sslmode=require`` names the same database
as ``postgresql://user:pass@host:5432/db?sslmode=require``; every libpq query
parameter passes through untouched. ``pgbroker://`` with nothing after the
scheme means "the pg_broker database": ``PG_BROKER_URL``/``DATABASE_URL`` when
set, otherwise the embedded server.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from pg_broker.database import database_url, mask_url

SCHEME = "pgbroker"


def libpq_url(broker_url: str) -> str:
    """The libpq connection URL a ``pgbroker://`` URL stands for."""
    parts = urlsplit(broker_url)
    if not (parts.netloc or parts.path.strip("/") or parts.query):
        return database_url()
    return urlunsplit(parts._replace(scheme="postgresql"))


def masked_url(url: str, mask: str = "**", scheme: str = SCHEME) -> str:
    """``url`` under ``scheme`` with its passwords masked (see
    :func:`pg_broker.database.mask_url`)."""
    parts = urlsplit(mask_url(url, mask))
    return urlunsplit(parts._replace(scheme=scheme)) if parts.netloc else f"{scheme}://{parts.path}"
