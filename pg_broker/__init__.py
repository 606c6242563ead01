"""pg_broker: a Celery broker over PostgreSQL, with the job system around it.

Importing the package registers the ``pgbroker://`` scheme with Kombu and
with Celery's result backends, so any Celery app can say
``broker_url = "pgbroker://user:pass@host/db"`` and
``result_backend = "pgbroker://user:pass@host/db"`` (the backend is also an
entry point, ``celery.result_backends``: Celery finds it without the import). Inside
Flower (``celery -A app flower`` imports Flower before the app) it also gives
Flower's Broker tab a reader for those queues (``pg_broker.flower``).
"""

import sys

from celery.app.backends import BACKEND_ALIASES
from kombu.transport import TRANSPORT_ALIASES

TRANSPORT_ALIASES.setdefault("pgbroker", "pg_broker.transport:Transport")
BACKEND_ALIASES.setdefault("pgbroker", "pg_broker.results:PgBrokerBackend")

if "flower.utils.broker" in sys.modules:
    from pg_broker.flower import install as _install_flower_queues

    _install_flower_queues()

__version__ = "0.1.0"
