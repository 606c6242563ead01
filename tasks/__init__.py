"""The pg_broker Celery app: ``celery -A tasks worker``, ``celery -A tasks beat``.

Settings come from the top-level ``celeryconfig`` module (every one
overridable from the environment). Tasks are grouped by domain:
``tasks.audio`` (chapters to MP3), ``tasks.documents`` (the package PDF) and
``tasks.maintenance`` (the watchdog and retention, run by beat).
"""

from celery import Celery

import pg_broker  # noqa: F401  registers the pgbroker:// transport with Kombu

app = Celery("tasks", include=["tasks.audio", "tasks.documents", "tasks.maintenance"])
app.config_from_object("celeryconfig")

from tasks import lifecycle  # noqa: E402, F401  connects the job_tasks bookkeeping

__all__ = ["app"]
