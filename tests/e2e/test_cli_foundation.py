"""The `pg-broker` console script: help for every subcommand, and migrate,
status, reclaim, dead list and url run as a user runs them, in a subprocess against the
test database named by PG_BROKER_URL."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from taskrows import add_job, add_tasks, claim, task

from pg_broker.cli import build_parser, main
from pg_broker.database import embedded_pid, embedded_url


def _subcommands() -> list[str]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(action.choices)


def pg_broker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    executable = shutil.which("pg-broker")
    assert executable, "the console script is installed (pip install -e .)"
    return subprocess.run([executable, *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_console_script_lists_every_subcommand(broker_env: dict[str, str]) -> None:
    result = pg_broker("--help", env=broker_env)
    assert result.returncode == 0, result.stderr
    for name in _subcommands():
        assert name in result.stdout
    assert "PG_BROKER_URL" in result.stdout


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pg-broker {command}")
    assert len(out.splitlines()) >= 3, "a description follows the usage line"


def test_migrate_on_a_migrated_database_applies_nothing(broker_env: dict[str, str]) -> None:
    result = pg_broker("migrate", env=broker_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("schema up to date")


def test_status_shows_jobs_backlog_workers_and_stale_tasks(
    db: psycopg.Connection, broker_env: dict[str, str]
) -> None:
    job_id = add_job(db)
    add_tasks(db, 3, job_id=job_id, task_type="tasks.audio.synthesize_chapter")
    claim(db, worker="celery@audio-1", batch=2)
    db.execute("UPDATE job_tasks SET last_heartbeat = now() - interval '11 minutes'"
               " WHERE status = 'claimed'")

    result = pg_broker("status", env=broker_env)

    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["processing", "1"] in lines
    assert ["tasks.audio.synthesize_chapter", "claimed", "2"] in lines
    assert ["tasks.audio.synthesize_chapter", "pending", "1"] in lines
    assert any(line[:2] == ["celery@audio-1", "2"] for line in lines)
    assert "Stale tasks (no heartbeat for 10 minutes): 2" in result.stdout


def test_reclaim_returns_expired_leases_and_says_how_many(
    db: psycopg.Connection, broker_env: dict[str, str]
) -> None:
    (task_id,) = add_tasks(db)
    claim(db)
    db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 second'")

    result = pg_broker("reclaim", env=broker_env)

    assert result.returncode == 0, result.stderr
    assert "reclaimed 1 task(s)" in result.stdout
    assert task(db, task_id)["status"] == "pending"


def test_dead_list_shows_failed_and_dead_tasks_newest_first(
    db: psycopg.Connection, broker_env: dict[str, str]
) -> None:
    rows = {}
    for status, error, age in [("failed", "ValueError: boom", "2 minutes"),
                               ("dead", "lease expired on worker w1", "1 minute"),
                               ("completed", None, "30 seconds"), ("pending", None, None)]:
        (rows[status],) = add_tasks(db, task_type=f"app.{status}_task", status=status,
                                    error=error, attempts=3)
        if age:
            db.execute("UPDATE job_tasks SET completed_at = now() - %s::interval WHERE id = %s",
                       (age, rows[status]))

    result = pg_broker("dead", "list", env=broker_env)

    assert result.returncode == 0, result.stderr
    listed = [line.split() for line in result.stdout.splitlines()
              if line.split()[:1] in ([str(row_id)] for row_id in rows.values())]
    assert [line[0] for line in listed] == [str(rows["dead"]), str(rows["failed"])]
    assert "app.dead_task" in result.stdout and "lease expired on worker w1" in result.stdout
    assert "app.failed_task" in result.stdout and "ValueError: boom" in result.stdout
    assert "app.completed_task" not in result.stdout and "app.pending_task" not in result.stdout


def test_url_prints_the_configured_database(broker_env: dict[str, str]) -> None:
    env = {**broker_env, "PG_BROKER_URL": "postgresql://broker:pw@db.example:5432/broker"}
    result = pg_broker("url", env=env)
    assert result.stdout.strip() == "postgresql://broker:***@db.example:5432/broker"


def test_an_unreachable_database_is_one_line_on_stderr_not_a_traceback(
    broker_env: dict[str, str],
) -> None:
    env = {**broker_env, "PG_BROKER_URL": "postgresql://broker:s3cret@127.0.0.1:1/broker"}
    result = pg_broker("status", env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        "pg-broker: no database reachable at postgresql://broker:***@127.0.0.1:1/broker")
    assert "s3cret" not in result.stderr


def test_server_starts_shows_and_stops_the_embedded_postgresql_that_outlives_commands(
    new_data_dir: Callable[[], Path],
) -> None:
    data_dir = new_data_dir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("PG_BROKER_URL", "DATABASE_URL")}
    env["PG_BROKER_DATA_DIR"] = str(data_dir)

    assert pg_broker("server", "status", env=env).returncode == 3
    # Any command starts it, and it is still running after that command exited.
    assert pg_broker("migrate", env=env).returncode == 0
    status = pg_broker("server", "status", env=env)
    assert status.returncode == 0, status.stderr
    assert f"running (pid {embedded_pid(data_dir)}), data in {data_dir}" in status.stdout
    with psycopg.connect(embedded_url(data_dir)) as held:
        stopped = pg_broker("server", "stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert "1 client session(s) ended" in stopped.stdout
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
    assert embedded_pid(data_dir) is None
    assert pg_broker("server", "status", env=env).returncode == 3
    assert "not running" in pg_broker("server", "stop", env=env).stdout

    started = pg_broker("server", "start", env=env)
    assert started.returncode == 0, started.stderr
    assert embedded_pid(data_dir) is not None
    noted = pg_broker("server", "status", env={**env, "PG_BROKER_URL": "postgresql://x@h/db"})
    assert "PG_BROKER_URL/DATABASE_URL is set" in noted.stderr and noted.returncode == 0


def test_unknown_ids_are_errors_with_a_message_and_a_non_zero_exit(
    db: psycopg.Connection, broker_env: dict[str, str]
) -> None:
    not_a_uuid = pg_broker("job", "not-a-uuid", env=broker_env)
    assert not_a_uuid.returncode == 2
    assert "'not-a-uuid' is not a job id" in not_a_uuid.stderr
    assert "Traceback" not in not_a_uuid.stderr and not_a_uuid.stdout == ""

    (dead,) = add_tasks(db, task_id="a-dead-letter", status="dead", error="it broke")
    refused = pg_broker("dead", "retry", "99999999", "a-dead-letter", env=broker_env)
    assert refused.returncode == 1
    assert refused.stderr.startswith("pg-broker dead retry: no dead or failed task 99999999 ")
    assert task(db, dead)["status"] == "dead", "nothing was re-queued"
    retried = pg_broker("dead", "retry", str(dead), env=broker_env)
    assert (retried.returncode, retried.stdout, retried.stderr) == (0, "re-queued 1 task(s)\n", "")


def test_job_prints_every_time_in_one_format(db: psycopg.Connection, broker_env: dict[str, str]) -> None:
    job_id = add_job(db)
    add_tasks(db, 1, job_id=job_id, task_type="tasks.audio.synthesize_chapter",
              status="completed", completed_at="2026-11-29T02:23:00.453323+00:00")
    db.execute("UPDATE jobs SET completed_at = '2026-11-29 02:23:00.453323+00' WHERE id = %s",
               (job_id,))
    shown = pg_broker("job", job_id, env=broker_env)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^  created   \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\n"
                     r"  finished  2026-11-29 02:23:00 UTC$", shown.stdout, re.MULTILINE), shown.stdout
    assert ".453323" not in shown.stdout and "+00:00" not in shown.stdout
