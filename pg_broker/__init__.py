"""pg_broker: a Celery broker over PostgreSQL, with the job system around it.

Importing the package registers the ``pgbroker://`` scheme with Kombu and
with Celery's result backends, so any Celery app can say
``broker_url = "pgbroker://user:pass@host/db"`` and
``result_backend = "pgbroker://user:pass@host/db"``; inside Flower it also
gives Flower's Broker tab a reader for those queues (``pg_broker.flower``).
The installed ``pg_broker.pth`` imports the package in every interpreter of
the environment, so an app need not (see :mod:`pg_broker.scheme`): the import
is cheap, the registration waits for Kombu, Celery or Flower to be imported.
"""

from pg_broker.scheme import register as _register

_register()

__version__ = "0.1.0"
