"""A Celery user's application role, as a managed PostgreSQL hands one out:
LOGIN, no CREATEROLE, no superuser, owner of its database, on a server where
no Supabase role exists (a private one: nothing else creates roles there).

``pg-broker migrate`` installs the broker, a real worker runs a ``delay()``
through ``pgbroker://``, and the cluster has exactly the roles it had before.
Asking for the Supabase layer says what a superuser must run; once they have,
the layer installs for the same role and the worker still runs under
row-level security."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from celery import Celery
from celery_workers import REPO_ROOT, Worker, process_environment, wait_for
from psycopg.conninfo import make_conninfo

from pg_broker.database import embedded_url, with_database
from pg_broker.urls import broker_url

pytestmark = pytest.mark.slow

ROLE = "appuser"


def _roles(admin_url: str) -> set[tuple]:
    with psycopg.connect(admin_url) as conn:
        return set(conn.execute("SELECT rolname, rolsuper, rolcreaterole, rolbypassrls"
                                " FROM pg_roles").fetchall())


def _pg_broker(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pg_broker.cli", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=180)


def _add_delayed_through_a_worker(env: dict[str, str], url: str, logs: Path) -> int:
    """``e2e.add(2, 3)`` sent from this process, run by a real worker as the role;
    returns once its message row is acked too."""
    producer = Celery("ordinary", broker=broker_url(url), backend=broker_url(url))
    producer.conf.task_default_queue = "e2e"
    worker = Worker(env, logs, pool="solo", concurrency=1, queues=["e2e"]).start()
    try:
        # By name: a task defined here would shadow the test app's e2e.add
        # (Celery warns of the duplicate name).
        result = producer.send_task("e2e.add", (2, 3))
        value = result.get(timeout=90)
        with psycopg.connect(url) as conn:
            # The ack deletes the plain message's row: the role may delete.
            wait_for(lambda: conn.execute("SELECT status FROM job_tasks WHERE task_id = %s",
                                          (result.id,)).fetchone() is None,
                     30, lambda: worker.describe(f"the ack of {result.id}"))
        return value
    finally:
        worker.kill()
        producer.close()


@pytest.fixture(scope="module")
def cluster(new_data_dir: Callable[[], Path]) -> str:
    """A fresh PostgreSQL server of this module's own: no Supabase roles."""
    return embedded_url(new_data_dir())


def test_an_ordinary_role_migrates_and_runs_a_worker_and_no_role_is_created(
    cluster: str, tmp_path: Path,
) -> None:
    with psycopg.connect(cluster, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {ROLE} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB")
        admin.execute(f"CREATE DATABASE app OWNER {ROLE}")
    before = _roles(cluster)
    assert {(r, c) for r, _, c, _ in before} >= {(ROLE, False)}
    url = make_conninfo(with_database(cluster, "app"), user=ROLE)
    env = process_environment(url)

    migrated = _pg_broker(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "applied core/100_broker_schema.sql" in migrated.stdout
    assert "the Supabase/RLS layer is not installed" in migrated.stdout
    assert _add_delayed_through_a_worker(env, url, tmp_path) == 5
    with psycopg.connect(url) as conn:
        # The role published, claimed and, at the ack, deleted the message.
        assert conn.execute("SELECT task_type FROM job_tasks").fetchall() == []
    assert _roles(cluster) == before

    refused = _pg_broker(env, "migrate", "--supabase")
    assert refused.returncode == 2
    message = refused.stderr
    assert f'role "anon" does not exist and role "{ROLE}" may not create it' in message
    assert "The core schema is complete" in message
    told = re.search(r"Have a superuser run: (.*); then migrate again", message)
    assert told, message
    assert "CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS" in told.group(1)
    assert _roles(cluster) == before

    with psycopg.connect(cluster, autocommit=True) as admin:
        for statement in told.group(1).split(";"):
            admin.execute(statement)
    layered = _pg_broker(env, "migrate", "--supabase")
    assert layered.returncode == 0, layered.stderr
    assert "applied supabase/101_supabase_layer.sql" in layered.stdout
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT relforcerowsecurity FROM pg_class WHERE relname = 'job_tasks'"
                            ).fetchone() == (True,)
    assert _add_delayed_through_a_worker(env, url, tmp_path) == 5
