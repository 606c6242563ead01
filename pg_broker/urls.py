"""The URL converters, one of each: ``pgbroker://…`` to a libpq URL, a
database to its broker URL and to Celery's database result backend URL, and
any of them for display.

``pgbroker://user:pass@host:5432/db?sslmode=require`` names the same database
as ``postgresql://user:pass@host:5432/db?sslmode=require``; every libpq query
parameter passes through untouched. ``pgbroker://`` with nothing after the
scheme means "the pg_broker database": ``PG_BROKER_URL``/``DATABASE_URL`` when
set, otherwise the embedded server.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pg_broker.database import DatabaseUnavailable, database_url
from pg_broker.masking import mask_url, url_problem

SCHEME = "pgbroker"


def _after_scheme(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


def with_scheme(url: str, scheme: str) -> str:
    """``url`` under another scheme, the rest as written:
    ``postgresql://u@h/db?x=y`` -> ``<scheme>://u@h/db?x=y``."""
    return f"{scheme}://{_after_scheme(url)}"


def broker_url(conninfo: str, **params: str) -> str:
    """The ``pgbroker://`` URL of a database given as a libpq URL or as
    ``key=value`` pairs (those become query parameters, which libpq reads
    the same), with ``params`` as more libpq parameters."""
    if params:
        conninfo = make_conninfo(conninfo, **params)
    if "://" in conninfo:
        return with_scheme(conninfo, SCHEME)
    # libpq decodes %XX only: a space must not become "+".
    return f"{SCHEME}://?{urlencode(conninfo_to_dict(conninfo), quote_via=quote)}"


def libpq_url(broker_url: str) -> str:
    """The libpq connection URL a ``pgbroker://`` URL stands for (text
    surgery, never a parse: a malformed URL is libpq's to report, masked)."""
    rest = _after_scheme(broker_url)
    if not rest.strip("/"):
        return database_url()
    return with_scheme(rest, "postgresql")


def masked_url(url: str, mask: str = "**", scheme: str = SCHEME) -> str:
    """``url`` under ``scheme`` with its passwords masked (see
    :func:`pg_broker.masking.mask_url`)."""
    return with_scheme(mask_url(url, mask), scheme)


def result_backend_url(conninfo: str) -> str:
    """Celery's SQLAlchemy result backend URL (``db+``, psycopg 3 driver) for
    any libpq conninfo: a URL, ``key=value`` pairs, a unix-socket ``?host=/dir``.
    A malformed one is refused here, masked: SQLAlchemy and libpq would quote
    pieces of its password in their errors. Needs SQLAlchemy, which an app
    using that backend has."""
    from sqlalchemy.engine import URL

    problem = url_problem(conninfo)
    if problem:
        raise DatabaseUnavailable(f"the database URL {mask_url(conninfo)} is malformed: {problem}")
    params = conninfo_to_dict(conninfo)
    host = params.get("host") or ""
    tcp = bool(host) and not host.startswith("/") and "," not in host
    url = URL.create(
        "postgresql+psycopg",
        username=params.pop("user", None),
        password=params.pop("password", None),
        # A socket directory or a host list stays a query parameter for libpq.
        host=params.pop("host") if tcp else None,
        port=int(params.pop("port")) if tcp and "port" in params else None,
        database=params.pop("dbname", None),
        query=params,
    )
    return "db+" + url.render_as_string(hide_password=False)
