"""pg_broker: a Celery broker over PostgreSQL, with the job system around it.

Importing the package registers the ``pgbroker://`` scheme with Kombu, so any
Celery app can say ``broker_url = "pgbroker://user:pass@host/db"``.
"""

from kombu.transport import TRANSPORT_ALIASES

TRANSPORT_ALIASES.setdefault("pgbroker", "pg_broker.transport:Transport")

__version__ = "0.1.0"
