"""The ``pgbroker://`` Kombu transport (see :mod:`.transport`).

``import pg_broker`` registers the scheme; ``enqueue_in(conn)`` makes the
publishes of the current thread part of the caller's transaction;
``confirm_publishes()`` waits for the confirms of publishes sent without
waiting (see :mod:`.pipeline`).
"""

from .pipeline import confirm_publishes
from .transport import Channel, QoS, Transport, enqueue_in

__all__ = ["Channel", "QoS", "Transport", "confirm_publishes", "enqueue_in"]
