"""celeryconfig.py: defaults that need no configuration, every setting
overridable from the environment, and a result backend on the broker's
database (pgbroker://, or Celery's SQLAlchemy backend by name)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_SHOW = """
import json
from tasks import app
app.loader.import_default_modules()
route = app.amqp.router.route
print(json.dumps({
    "broker": app.conf.broker_url, "backend": app.conf.result_backend,
    "prefetch": app.conf.worker_prefetch_multiplier, "acks_late": app.conf.task_acks_late,
    "reject_on_lost": app.conf.task_reject_on_worker_lost,
    "acks_on_failure": app.conf.task_acks_on_failure,
    "backoff": app.conf.broker_transport_options["retry_backoff"],
    "watchdog": app.conf.beat_schedule["watchdog"]["schedule"],
    "queues": {name: route({}, name)["queue"].name for name in (
        "tasks.audio.synthesize_chapter", "tasks.documents.render_package_pdf",
        "tasks.maintenance.reclaim_stale_tasks", "somebody.else.task")},
}))
"""


def _settings(env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _SHOW], env=env, cwd="/", capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_defaults_are_the_pgbroker_database_acks_late_and_the_domain_queues(
    broker_env: dict[str, str], database_url: str
) -> None:
    settings = _settings(broker_env)
    assert (settings["broker"], settings["backend"]) == ("pgbroker://", "pgbroker://")
    assert (settings["acks_late"], settings["reject_on_lost"], settings["acks_on_failure"]) == (
        True, True, False)
    assert (settings["prefetch"], settings["backoff"], settings["watchdog"]) == (1, 10.0, 60.0)
    assert settings["queues"] == {
        "tasks.audio.synthesize_chapter": "audio", "tasks.documents.render_package_pdf": "documents",
        "tasks.maintenance.reclaim_stale_tasks": "default", "somebody.else.task": "default"}


def test_every_setting_is_overridable_from_the_environment(broker_env: dict[str, str]) -> None:
    settings = _settings({
        **broker_env, "CELERY_WORKER_PREFETCH_MULTIPLIER": "4", "CELERY_TASK_ACKS_LATE": "false",
        "CELERY_BROKER_URL": "pgbroker://postgres@127.0.0.1:5432/other",
        "CELERY_RESULT_BACKEND": "db+postgresql+psycopg://postgres@127.0.0.1:5432/results",
        "PG_BROKER_RETRY_BACKOFF": "2.5", "PG_BROKER_WATCHDOG_INTERVAL": "15",
    })
    assert settings["prefetch"] == 4 and settings["acks_late"] is False
    assert settings["broker"] == "pgbroker://postgres@127.0.0.1:5432/other"
    assert settings["backend"] == "db+postgresql+psycopg://postgres@127.0.0.1:5432/results"
    assert (settings["backoff"], settings["watchdog"]) == (2.5, 15.0)
