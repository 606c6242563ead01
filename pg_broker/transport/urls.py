"""Broker URLs: ``pgbroker://…`` to a libpq URL, and back for display.

``pgbroker://user:pass@host:5432/db?sslmode=require`` names the same database
as ``postgresql://user:pass@host:5432/db?sslmode=require``; every libpq query
parameter passes through untouched. ``pgbroker://`` with nothing after the
scheme means "the pg_broker database": ``PG_BROKER_URL``/``DATABASE_URL`` when
set, otherwise the embedded server.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pg_broker.database import database_url

SCHEME = "pgbroker"
# libpq query parameters whose value is a secret.
_SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def libpq_url(broker_url: str) -> str:
    """The libpq connection URL a ``pgbroker://`` URL stands for."""
    parts = urlsplit(broker_url)
    if not (parts.netloc or parts.path.strip("/") or parts.query):
        return database_url()
    return urlunsplit(parts._replace(scheme="postgresql"))


def masked_url(url: str, mask: str = "**", scheme: str = SCHEME) -> str:
    """``url`` with its password (in the user info or the query) masked."""
    parts = urlsplit(url)
    if not (parts.password is not None or any(k in parts.query for k in _SECRET_PARAMETERS)):
        return urlunsplit(parts._replace(scheme=scheme)) if parts.netloc else f"{scheme}://{parts.path}"
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:{mask}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(key, mask if key in _SECRET_PARAMETERS else value) for key, value in pairs],
            safe="/:*",
        )
    return urlunsplit(parts._replace(scheme=scheme, netloc=netloc, query=query))
