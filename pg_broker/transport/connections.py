"""The transport's PostgreSQL connections: ended quietly in the process that
opened them, disowned (never closed) in a forked child; their errors told in
a form safe to log."""

from __future__ import annotations

import logging
import os

import psycopg

log = logging.getLogger(__name__)

# Inherited connections a child disowned: kept referenced so that they are
# never finalised (their sockets point at /dev/null by then anyway).
_disowned: list[psycopg.Connection] = []


def close_quietly(conn: psycopg.Connection | None) -> None:
    """Close ``conn`` if open; a connection that is already broken is just dropped."""
    if conn is not None and not conn.closed:
        try:
            conn.close()
        except psycopg.Error:
            log.debug("closing a broker connection failed", exc_info=True)


def disown(conn: psycopg.Connection | None) -> None:
    """Make an inherited connection harmless in a forked child.

    Closing it would end the parent's session (libpq sends Terminate on the
    shared socket). Instead the child's copy of the socket descriptor is
    pointed at /dev/null and the object is kept alive, never closed.
    """
    if conn is None:
        return
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        fd = None
    if fd is not None and fd >= 0:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    _disowned.append(conn)


def first_line(exc: BaseException) -> str:
    """An error's primary message, without the lines PostgreSQL adds after it:
    its DETAIL may quote the row (``Failing row contains (...)``), payload
    included, and logs never carry payloads."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
