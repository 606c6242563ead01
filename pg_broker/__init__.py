"""pg_broker: a Celery broker over PostgreSQL, with the job system around it.

Importing the package registers the ``pgbroker://`` scheme with Kombu, so any
Celery app can say ``broker_url = "pgbroker://user:pass@host/db"``. Inside
Flower (``celery -A app flower`` imports Flower before the app) it also gives
Flower's Broker tab a reader for those queues (``pg_broker.flower``).
"""

import sys

from kombu.transport import TRANSPORT_ALIASES

TRANSPORT_ALIASES.setdefault("pgbroker", "pg_broker.transport:Transport")

if "flower.utils.broker" in sys.modules:
    from pg_broker.flower import install as _install_flower_queues

    _install_flower_queues()

__version__ = "0.1.0"
