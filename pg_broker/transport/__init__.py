"""The ``pgbroker://`` Kombu transport (see :mod:`.transport` for its map).

``import pg_broker`` registers the scheme; importing the transport connects
the ``task_failure`` handler that keeps a failed task's exception in its row
(:mod:`pg_broker.bookkeeping`); ``enqueue_in(conn)`` makes the
publishes of the current thread part of the caller's transaction;
``confirm_publishes()`` waits for the confirms of publishes sent without
waiting (see :mod:`.pipeline`).
"""

from pg_broker import bookkeeping  # noqa: F401  connects the task_failure handler

from .channel import Channel, enqueue_in
from .pipeline import confirm_publishes
from .qos import QoS
from .transport import Transport

__all__ = ["Channel", "QoS", "Transport", "confirm_publishes", "enqueue_in"]
