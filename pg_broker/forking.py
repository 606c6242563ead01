"""What a forked child must forget, in one place.

A Celery prefork pool forks its children from a parent that holds database
sessions (the transport's work and LISTEN connections, the publish pipeline,
the result store, the worker app's bookkeeping connection), threads (lease
renewal, confirms, the response watchdog) and in-memory state about messages
the parent holds. In the child all of that is the parent's:

- a connection must never be closed there: libpq would send Terminate on the
  socket both processes share and end the parent's session. It is disowned
  (:func:`disown`) and the child opens its own when it first needs one;
- the threads did not survive the fork, and a lock another thread held at
  that moment stays taken for ever: both are replaced;
- rows, acks and buffers are the parent's to settle: the child drops them.

One at-fork hook runs every forget-callback registered here. An object that
owns such state registers itself with :func:`forget_in_child` (weakly: the
registry keeps nothing alive) and implements ``forget_after_fork()``; a module
with module-level state registers a function with :func:`on_fork`. Each
callback forgets only what its owner holds, so their order does not matter.
An owner never checks ``os.getpid()`` itself.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Protocol

import psycopg

log = logging.getLogger(__name__)


class ForgetsAfterFork(Protocol):
    def forget_after_fork(self) -> None: ...


_owners: weakref.WeakSet[ForgetsAfterFork] = weakref.WeakSet()
_functions: list[Callable[[], None]] = []
# Inherited connections a child disowned: kept referenced, so that they are
# never finalised (their sockets point at /dev/null by then anyway).
_disowned: list[psycopg.Connection] = []


def forget_in_child(owner: ForgetsAfterFork) -> None:
    """Call ``owner.forget_after_fork()`` in every child forked while it lives."""
    _owners.add(owner)


def on_fork(function: Callable[[], None]) -> Callable[[], None]:
    """Call ``function()`` in every child forked from now on (module-level
    state); returns it, so that it serves as a decorator."""
    _functions.append(function)
    return function


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


def _after_fork_in_child() -> None:
    # One thread is left in the child: nothing registers while this runs.
    callbacks = [*_functions, *(owner.forget_after_fork for owner in list(_owners))]
    for callback in callbacks:
        try:
            callback()
        except Exception:  # one owner's failure must not leave the others' state behind
            log.exception("forgetting the parent's state in a forked child failed")


os.register_at_fork(after_in_child=_after_fork_in_child)
