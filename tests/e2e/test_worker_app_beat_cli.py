"""celery beat runs the watchdog and retention; the CLI runs the demo, shows a
job, and runs the dead-letter and retention commands."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from tasks.demo import demo_chapters, start_worker

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def _pg_broker(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pg_broker.cli", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_beat_in_the_worker_runs_the_watchdog_and_retention_on_their_intervals(
    db: psycopg.Connection, broker_env: dict[str, str], tmp_path: Path
) -> None:
    stale, old = uuid.uuid4().hex, uuid.uuid4().hex
    db.execute(
        """INSERT INTO job_tasks (queue, payload, task_id, status, attempts, lease_token,
                                  lease_expires_at, worker_id)
           VALUES ('nobody-consumes-this', '{}', %s, 'claimed', 1, gen_random_uuid(),
                   now() - interval '1 minute', 'a-dead-worker')""", (stale,))
    db.execute(
        """INSERT INTO job_tasks (queue, payload, task_id, status, completed_at)
           VALUES ('nobody-consumes-this', '{}', %s, 'completed', now() - interval '1 hour')""",
        (old,))
    env = {**broker_env, "PG_BROKER_WATCHDOG_INTERVAL": "1", "PG_BROKER_RETENTION_INTERVAL": "1",
           "PG_BROKER_RETENTION": "10 minutes",
           "CELERY_BEAT_SCHEDULE_FILENAME": str(tmp_path / "celerybeat-schedule")}
    log_file = tmp_path / "worker.log"
    worker = start_worker(env, f"beat-{uuid.uuid4().hex[:8]}@%h", pool="solo",
                          log_file=log_file, extra_args=("--beat",))
    # The worker's own transport maintenance reclaims and deletes such rows
    # too (bounded storage): the rows alone do not show that beat ran, so
    # wait for both, and for beat's tasks to have run.
    try:
        deadline = time.monotonic() + 45
        while True:
            reclaimed = db.execute("SELECT status FROM job_tasks WHERE task_id = %s", (stale,)).fetchone()
            deleted = db.execute("SELECT count(*) FROM job_tasks WHERE task_id = %s", (old,)).fetchone()
            log = log_file.read_text()
            ran = all(line in log for line in (
                "Sending due task watchdog", "Sending due task retention",
                "Task tasks.maintenance.reclaim_stale_tasks[", "Task tasks.maintenance.delete_finished_tasks["))
            if reclaimed == ("pending",) and deleted == (0,) and ran:
                break
            assert time.monotonic() < deadline, log[-4000:]
            time.sleep(0.3)
    finally:
        worker.stop()


def test_demo_runs_a_package_job_and_the_cli_shows_it(
    db: psycopg.Connection, broker_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**broker_env, "PG_BROKER_STORAGE_DIR": str(tmp_path / "artifacts"),
           "XDG_DATA_HOME": str(tmp_path / "data")}
    demo = _pg_broker(env, "demo", "--chapters", "3", "--concurrency", "1", "--timeout", "90")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "completed" in demo.stdout and "3 MP3 files" in demo.stdout
    mp3s = re.findall(r"^ +(\d+)\. (.+): (file://\S+\.mp3)$", demo.stdout, re.MULTILINE)
    assert [number for number, _, _ in mp3s] == ["1", "2", "3"], demo.stdout
    assert all(title.strip() for _, title, _ in mp3s), "each MP3 named by its chapter's title"
    assert all(Path(url.removeprefix("file://")).stat().st_size > 0 for _, _, url in mp3s)
    (pdf_url,) = re.findall(r"PDF:\s+(file://\S+)", demo.stdout)
    assert Path(pdf_url.removeprefix("file://")).read_bytes().startswith(b"%PDF")
    job_id = re.search(r"submitted job ([0-9a-f-]{36})", demo.stdout).group(1)

    shown = _pg_broker(env, "job", job_id)
    assert shown.returncode == 0, shown.stderr
    assert "  status    completed, progress 100.00%" in shown.stdout
    # Each task and file says which chapter it is, and every line but the
    # storage root's (a path of the test's) fits 80 columns.
    for number, chapter in enumerate(demo_chapters(3), 1):
        assert re.search(rf"^  {number} {chapter.title} +completed +1/3 ", shown.stdout,
                         re.MULTILINE), shown.stdout
    files = re.findall(r"^    ((?:audio|pdf)/\S+)$", shown.stdout, re.MULTILINE)
    (folder,) = re.findall(r"^Files under file://(\S+)\n  (\S+)$", shown.stdout, re.MULTILINE)
    assert len(files) == 4 and all(Path(folder[0], folder[1], f).is_file() for f in files)
    assert max(len(line) for line in shown.stdout.splitlines()
               if not line.startswith("Files under ")) <= 80, shown.stdout

    assert _pg_broker(env, "dead", "retry").returncode == 2  # ids or --all, never a guess
    retry = _pg_broker(env, "dead", "retry", "--all")
    assert retry.returncode == 0 and "re-queued 0 task(s)" in retry.stdout
    # The demo's results (task_results, result_expires a day) stay; an expired one goes.
    db.execute("INSERT INTO task_results (key, value, expires_at)"
               " VALUES ('celery-task-meta-expired', '\\x00', now() - interval '1 minute')")
    kept = db.execute("SELECT count(*) FROM task_results").fetchone()[0] - 1
    assert kept >= 4  # three chapters and the PDF
    retention = _pg_broker(env, "retention", "--older-than", "0 seconds")
    assert retention.returncode == 0 and "finished task row(s) older than 0 seconds" in retention.stdout
    assert "deleted 1 expired result(s)" in retention.stdout
    assert db.execute("SELECT count(*) FROM task_results").fetchone() == (kept,)
    # The hot table lost the job's rows; the job and its artifacts stay.
    assert db.execute("SELECT count(*) FROM job_tasks WHERE job_id = %s", (job_id,)).fetchone() == (0,)
    after = _pg_broker(env, "job", job_id)
    assert "  status    completed" in after.stdout and "Tasks (none: their rows are past retention)" in after.stdout
    assert len(re.findall(r"^    (?:audio|pdf)/\S+$", after.stdout, re.MULTILINE)) == 4
