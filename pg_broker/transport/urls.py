"""Broker URLs: ``pgbroker://…`` to a libpq URL, and back for display.

``pgbroker://user:pass@host:5432/db?sslmode=require`` names the same database
as ``postgresql://user:pass@host:5432/db?sslmode=require``; every libpq query
parameter passes through untouched. ``pgbroker://`` with nothing after the
scheme means "the pg_broker database": ``PG_BROKER_URL``/``DATABASE_URL`` when
set, otherwise the embedded server.
"""

from __future__ import annotations

from pg_broker.database import database_url
from pg_broker.masking import mask_url

SCHEME = "pgbroker"


def _after_scheme(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


def libpq_url(broker_url: str) -> str:
    """The libpq connection URL a ``pgbroker://`` URL stands for (text
    surgery, never a parse: a malformed URL is libpq's to report, masked)."""
    rest = _after_scheme(broker_url)
    if not rest.strip("/"):
        return database_url()
    return f"postgresql://{rest}"


def masked_url(url: str, mask: str = "**", scheme: str = SCHEME) -> str:
    """``url`` under ``scheme`` with its passwords masked (see
    :func:`pg_broker.masking.mask_url`)."""
    return f"{scheme}://{_after_scheme(mask_url(url, mask))}"
