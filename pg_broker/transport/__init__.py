"""The ``pgbroker://`` Kombu transport (see :mod:`.transport`).

``import pg_broker`` registers the scheme; ``enqueue_in(conn)`` makes the
publishes of the current thread part of the caller's transaction.
"""

from .transport import Channel, QoS, Transport, enqueue_in

__all__ = ["Channel", "QoS", "Transport", "enqueue_in"]
