"""Passwords out of everything pg_broker shows of a database URL.

A URL a user typed may be malformed: a password with an unencoded ``/``,
``@`` or ``%``, an IPv6 host never closed. Parsers then disagree about where
the password ends (``urlsplit`` raises, libpq reads a piece of the password
as the host, port or database) and libpq quotes the URL, or a piece of it,
in its errors. So nothing here parses the URL to mask it: everything from
``scheme://user:`` to the last ``@`` is taken as the password, as are the
values of ``password``/``sslpassword`` in a query string or a ``key=value``
connection string; and an error message is redacted of each of those, of
their decoded forms and of their pieces. Nothing here raises.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

PERCENT_ENCODE = ("a URL must percent-encode @ : / ? # [ ] % and spaces in its password "
                  "(%40 %3A %2F %3F %23 %5B %5D %25 %20)")
# A query-string password runs to the next parameter; a key=value one is
# quoted (to its closing quote, or the end), or runs over the words up to the
# next key=value.
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)(.*?)(?=&[A-Za-z_]+=|$)", re.DOTALL)
_CONNINFO_PASSWORD = re.compile(
    r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*(?:'|$)|[^\s']+(?:\s+[^\s=']+(?=\s|$))*)"
)
# Where a parser may cut a malformed password: libpq's errors quote the pieces.
_CUTS = re.compile(r"[@:/?#\[\]&=,%'\\\s]+")


def _read_as_written(url: str) -> bool:
    """Whether libpq parses ``url`` and reads it as written: it ends a URL's
    credentials at the first ``@`` or ``/``, so a password holding either
    is misread, and the rest lands in the host, port or database name, none
    of which can hold an ``@``."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return False
    return not any("@" in (params.get(key) or "") for key in ("host", "port", "dbname"))


def _password_span(url: str) -> tuple[str, str, str] | None:
    """(before, password, after) of a URL with ``user:`` in it; None without.

    The password ends where libpq ends it when libpq reads the URL as
    written; otherwise at the last ``@``, wherever a malformed password
    puts it (an ``@`` in a query string is then masked too).
    """
    start = url.find("://")
    if start < 0:
        return None
    start += 3
    first = url.find("@", start)
    if first < 0:
        return None
    if _read_as_written(url):
        if "/" in url[start:first]:
            return None  # an @ of the path or query string
        at = first
    else:
        at = url.rfind("@")
    colon = url.find(":", start, at)
    if colon < 0:
        return None
    return url[:colon + 1], url[colon + 1:at], url[at:]


def mask_url(url: str, mask: str = "***") -> str:
    """The URL (or ``key=value`` connection string) with every password
    (``password``, ``sslpassword``) replaced by ``mask``, for messages and logs."""
    span = _password_span(url)
    if span is not None and span[1]:
        url = span[0] + mask + span[2]
    pattern = _QUERY_PASSWORD if "://" in url else _CONNINFO_PASSWORD
    return pattern.sub(lambda match: match.group(1) + mask, url)


def _secrets(url: str) -> set[str]:
    """Every password in ``url``, as written and as a parser would decode it."""
    found = set()
    span = _password_span(url)
    if span is not None:
        found.add(span[1])
    for pattern in (_QUERY_PASSWORD, _CONNINFO_PASSWORD):
        found.update(match.group(2) for match in pattern.finditer(url))
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        params = {}
    found.update(params.get(key) or "" for key in ("password", "sslpassword"))
    found |= {unquote(secret) for secret in found}
    found |= {secret.strip("'") for secret in found}
    return {secret for secret in found if secret}


def redact(text: str, url: str, mask: str = "***") -> str:
    """``text`` (an error message, say) with ``url`` masked and each of its
    passwords, decoded or in the pieces a parser may cut it into, replaced
    by ``mask``."""
    if url:
        text = text.replace(url, mask_url(url, mask))
    secrets = _secrets(url)
    pieces = {piece for secret in secrets for piece in _CUTS.split(secret) if piece} - secrets
    for secret in sorted(secrets, key=len, reverse=True) + sorted(pieces, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", mask, text)
    return text


def url_problem(url: str) -> str | None:
    """Why libpq cannot read ``url`` as written (no password in it), or None."""
    if _read_as_written(url):
        return None
    try:
        conninfo_to_dict(url)
    except psycopg.Error as exc:
        problem = f"libpq cannot parse it ({redact(first_line(exc), url)})"
    else:
        problem = "libpq reads another password than the one written"
    return f"{problem}; {PERCENT_ENCODE}" if "://" in url else problem


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def redacting(url: str) -> Iterator[None]:
    """Re-raise a psycopg error met inside as the same error with every
    password of ``url`` redacted from its message (libpq quotes a URL it
    cannot parse, or the piece of it that it took for a host)."""
    try:
        yield
    except psycopg.Error as exc:
        message = str(exc)
        cleaned = redact(message, url)
        if cleaned == message:
            raise
        raise type(exc)(cleaned) from None
