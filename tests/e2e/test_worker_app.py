"""The worker app end to end: a real ``celery -A tasks worker`` subprocess on
real PostgreSQL turns package jobs into MP3s and a PDF, retries and fails,
cancels, and enqueues inside the caller's transaction."""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import mutagen.mp3
import psycopg
import pypdf
import pytest
from celery.exceptions import TimeoutError
from celery_workers import wait_for

from pg_broker.jobs import Job, cancel_job, get_job, submit_job, user_session
from pg_broker.transport import enqueue_in
from tasks import app as worker_app
from tasks.demo import start_worker, wait_for_job
from tasks.package import AUDIO_TASK, PDF_TASK, submit_package
from tasks.pdf import Chapter
from tasks.storage import LocalStorage

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
OWNER = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
STRANGER = uuid.UUID("00000000-0000-4000-8000-0000000000b2")
# Seconds before a failed task's first retry (doubling after): longer than the
# workers' safety poll (1 s), so that the delays show in when attempts ran.
RETRY_BACKOFF = 2.0
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


def _chapters(count: int, words: int = 12) -> list[Chapter]:
    return [
        Chapter(f"Chapter {n + 1}",
                " ".join(WORDS[(n + i) % len(WORDS)] for i in range(words)) + f". End of part {n + 1}.")
        for n in range(count)
    ]


@pytest.fixture(scope="module")
def storage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def worker(database_url: str, storage_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One worker for the module; yields its log file. The test process sees
    the same database and storage through the same environment variables."""
    env = {"PG_BROKER_URL": database_url, "PG_BROKER_STORAGE_DIR": str(storage_dir),
           "PG_BROKER_RETRY_BACKOFF": str(RETRY_BACKOFF)}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    log_file = tmp_path_factory.mktemp("worker") / "worker.log"
    process = start_worker(
        {**os.environ, "PYTHONPATH": str(REPO_ROOT)}, f"app-{uuid.uuid4().hex[:8]}@%h",
        pool="prefork", concurrency=2, log_file=log_file,
        extra_args=("--include", "tests.worker_app_tasks"),
    )
    try:
        yield log_file
    finally:
        process.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def _finished(conn: psycopg.Connection, job_id: uuid.UUID, log_file: Path, timeout: float = 60) -> Job:
    try:
        return wait_for_job(conn, job_id, timeout=timeout)
    except TimeoutError:
        pytest.fail(f"job did not finish; worker log:\n{log_file.read_text()[-4000:]}")


def test_a_16_chapter_package_becomes_16_mp3s_and_a_pdf_with_true_artifact_rows(
    worker: Path, conn: psycopg.Connection, storage_dir: Path
) -> None:
    chapters = _chapters(16)
    job_id = submit_package(conn, user_id=OWNER, title="Sixteen parts", chapters=chapters,
                            voice="en-gb", rate_wpm=200)
    job = _finished(conn, job_id, worker)

    assert (job.status, job.progress, job.completed_tasks, job.total_tasks) == ("completed", 100, 17, 17)
    assert all(t.status == "completed" and t.attempts == 1 for t in job.tasks)
    # Each went through 'processing' (task_prerun) before it completed.
    assert all(t.started_at is not None and t.started_at <= t.completed_at for t in job.tasks)
    task_types = {t.task_id: t.task_type for t in job.tasks}
    audio = [a.artifact for a in job.artifacts if a.artifact.kind == "audio"]
    (document,) = [a.artifact for a in job.artifacts if a.artifact.kind == "pdf"]
    assert [a.metadata["chapter"] for a in audio] == list(range(1, 17))
    store = LocalStorage(storage_dir)
    for artifact in [*audio, document]:
        kind, ext = ("audio", "mp3") if artifact in audio else ("pdf", "pdf")
        assert task_types[artifact.task_id] == (AUDIO_TASK if kind == "audio" else PDF_TASK)
        assert artifact.storage_path == f"{OWNER}/{job_id}/{kind}/{artifact.task_id}.{ext}"
        data = store.file(artifact.storage_path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (artifact.bytes, artifact.sha256)

    for number, (artifact, chapter) in enumerate(zip(audio, chapters, strict=True), start=1):
        mp3 = mutagen.mp3.MP3(io.BytesIO(store.get(artifact.storage_path)))
        info = mp3.info
        # Which chapter a file is, for a player or a file manager: its ID3 tag.
        assert {key: mp3.tags[key].text for key in ("TIT2", "TALB", "TRCK")} == {
            "TIT2": [chapter.title], "TALB": ["Sixteen parts"], "TRCK": [f"{number}/16"]}
        assert (info.bitrate, info.sample_rate, info.channels) == (128_000, 22_050, 1)
        assert info.length == pytest.approx(float(artifact.duration_seconds), abs=0.2)
        # Constant bit rate all through: the size is what 128 kbps frames take.
        assert artifact.bytes == pytest.approx(info.length * 16_000, rel=0.05)
        words = len(chapter.text.split())
        assert 0.5 < info.length / (words / 200 * 60) < 2.5
        assert artifact.content_type == "audio/mpeg"

    reader = pypdf.PdfReader(io.BytesIO(store.get(document.storage_path)))
    text = "\n".join(page.extract_text() for page in reader.pages)
    assert "Sixteen parts" in text
    for chapter in chapters:
        assert chapter.title in text and chapter.text.split(".")[-2].strip() in text

    with user_session(conn, OWNER):
        seen = get_job(conn, job_id)
    assert seen is not None and len(seen.tasks) == 17 and len(seen.artifacts) == 17
    with user_session(conn, STRANGER):
        assert get_job(conn, job_id) is None
        assert conn.execute("SELECT count(*) FROM job_artifacts WHERE job_id = %s",
                            (job_id,)).fetchone() == (0,)


def test_a_failing_chapter_is_retried_with_backoff_then_fails_its_job(
    worker: Path, conn: psycopg.Connection
) -> None:
    # Chapter index 7 does not exist in a one-chapter package: the real audio
    # task raises IndexError on every attempt.
    job_id = submit_job(conn, user_id=OWNER, job_type="package", title="broken",
                        params={"voice": "en-us", "rate_wpm": 175,
                                "chapters": [{"title": "Only", "text": "Just one chapter."}]},
                        tasks=[(AUDIO_TASK, (0,)), (AUDIO_TASK, (7,))], app=worker_app)
    job = _finished(conn, job_id, worker)
    good, bad = job.tasks
    assert (good.status, good.attempts) == ("completed", 1)
    assert (bad.status, bad.attempts) == ("failed", 3)
    assert bad.error.startswith("IndexError")
    # When each attempt failed (the worker's log): a backoff, then twice that,
    # apart (less a little: the log line may follow the reject).
    failed_at = [datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
                 for line in worker.read_text().splitlines()
                 if f"[{bad.task_id}] raised unexpected" in line]
    assert len(failed_at) == 3, worker.read_text()[-4000:]
    gaps = [(failed_at[n + 1] - failed_at[n]).total_seconds() for n in range(2)]
    assert gaps[0] > RETRY_BACKOFF - 0.5 and gaps[1] > 2 * RETRY_BACKOFF - 0.5, gaps
    assert (job.status, job.completed_tasks, job.failed_tasks) == ("failed", 1, 1)
    assert job.error == bad.error
    assert len(job.artifacts) == 1


def test_a_cancelled_jobs_pending_tasks_never_run(worker: Path, conn: psycopg.Connection) -> None:
    # Long chapters keep the two pool processes busy while the rest wait.
    job_id = submit_package(conn, user_id=OWNER, title="cancel me",
                            chapters=_chapters(12, words=600))
    cancelled = cancel_job(conn, job_id)
    assert cancelled and cancelled >= 6

    def settled() -> bool:
        return conn.execute("SELECT count(*) FROM job_tasks WHERE job_id = %s AND status IN "
                            "('pending', 'claimed', 'processing')", (job_id,)).fetchone() == (0,)

    deadline = time.monotonic() + 60
    while not settled():
        assert time.monotonic() < deadline, worker.read_text()[-3000:]
        time.sleep(0.2)
    job = get_job(conn, job_id)
    ended_cancelled = [t for t in job.tasks if t.status == "cancelled"]
    assert job.status == "cancelled" and job.cancelled_tasks == len(ended_cancelled)
    never_claimed = [t for t in ended_cancelled if t.attempts == 0]
    assert len(never_claimed) == cancelled
    assert all(t.started_at is None for t in never_claimed)
    # A task a worker had already claimed when the cancel came (prefetched)
    # is skipped by the worker and ends cancelled too, after its one delivery.
    assert all(t.attempts == 1 for t in ended_cancelled if t.attempts)
    produced = {a.artifact.task_id for a in job.artifacts}
    assert not produced & {t.task_id for t in ended_cancelled}


def test_a_task_claimed_before_its_job_was_cancelled_is_skipped_and_ends_cancelled(
    worker: Path, conn: psycopg.Connection
) -> None:
    from tasks.audio import synthesize_chapter

    (job_id,) = conn.execute(
        "INSERT INTO jobs (user_id, params) VALUES (%s, %s) RETURNING id",
        (OWNER, '{"chapters": [{"title": "T", "text": "Never spoken."}]}')).fetchone()
    # With a countdown the worker claims the message at once and holds it,
    # unstarted, until then: the job is cancelled while a worker holds its task.
    result = synthesize_chapter.apply_async(
        (str(job_id), 0), headers={"job_id": str(job_id), "user_id": str(OWNER)}, countdown=8)

    def row() -> tuple:
        return conn.execute("SELECT status, attempts, started_at, id FROM job_tasks"
                            " WHERE task_id = %s", (result.id,)).fetchone()

    deadline = time.monotonic() + 60
    while row()[0] == "pending":
        assert time.monotonic() < deadline, worker.read_text()[-3000:]
        time.sleep(0.05)
    assert cancel_job(conn, job_id) == 0, "nothing pending: the worker holds the task"
    assert row()[:3:2] == ("claimed", None), "the task must not have started before the cancel"

    assert result.get(timeout=60) == {"skipped": True}
    while row()[0] in ("claimed", "processing"):  # the ack follows the result
        assert time.monotonic() < deadline, worker.read_text()[-3000:]
        time.sleep(0.05)
    assert row()[:2] == ("cancelled", 1)
    job = get_job(conn, job_id)
    assert (job.status, job.total_tasks, job.completed_tasks, job.cancelled_tasks) == (
        "cancelled", 1, 0, 1)
    assert job.artifacts == []
    assert f"job_tasks row {row()[3]} " not in worker.read_text(), "no ack or renewal was refused"


def test_delay_inside_a_rolled_back_transaction_sends_nothing_and_a_commit_runs_it_once(
    worker: Path, database_url: str, conn: psycopg.Connection
) -> None:
    # Imported here: pytest inspecting a task proxy at collection would
    # configure the app before the worker fixture points it at the test database.
    from tasks.audio import synthesize_chapter

    params = '{"chapters": [{"title": "T", "text": "Sent with the transaction."}]}'
    with psycopg.connect(database_url) as tx:
        (job_id,) = tx.execute("INSERT INTO jobs (user_id, params) VALUES (%s, %s) RETURNING id",
                               (OWNER, params)).fetchone()
        with enqueue_in(tx):
            rolled_back = synthesize_chapter.delay(str(job_id), 0)
        tx.rollback()
    assert conn.execute("SELECT count(*) FROM job_tasks WHERE task_id = %s",
                        (rolled_back.id,)).fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM jobs WHERE id = %s", (job_id,)).fetchone() == (0,)

    with psycopg.connect(database_url) as tx:
        (job_id,) = tx.execute("INSERT INTO jobs (user_id, params) VALUES (%s, %s) RETURNING id",
                               (OWNER, params)).fetchone()
        with enqueue_in(tx):
            committed = synthesize_chapter.delay(str(job_id), 0)
        # Not visible to anyone (so no worker can run it) until the commit.
        assert conn.execute("SELECT count(*) FROM job_tasks WHERE task_id = %s",
                            (committed.id,)).fetchone() == (0,)
        tx.commit()
    try:
        assert committed.get(timeout=60)["duration_seconds"] > 0
    except TimeoutError:
        pytest.fail(f"the committed task did not run; worker log:\n{worker.read_text()[-5000:]}")
    # The result is stored before the message is acked (acks late); sent
    # without a job's headers, it is a plain message, whose row leaves at its
    # ack. Its one delivery is the one result: a second run would have found
    # the row still there, held again.
    wait_for(
        lambda: conn.execute("SELECT count(*) FROM job_tasks WHERE task_id = %s",
                             (committed.id,)).fetchone() == (0,),
        30, lambda: f"the row of {committed.id} to leave at its ack")
    assert conn.execute("SELECT count(*) FROM job_artifacts WHERE job_id = %s",
                        (job_id,)).fetchone() == (1,)


def test_a_message_that_kills_its_worker_process_is_dead_after_max_deliveries(
    worker: Path, conn: psycopg.Connection
) -> None:
    from tasks import app

    result = app.send_task("tests.worker_app_tasks.kill_own_process", queue="default")
    deadline = time.monotonic() + 60
    while True:
        row = conn.execute("SELECT status, attempts, error FROM job_tasks WHERE task_id = %s",
                           (result.id,)).fetchone()
        if row and row[0] in ("dead", "failed", "completed"):
            break
        assert time.monotonic() < deadline, f"{row}\n{worker.read_text()[-3000:]}"
        time.sleep(0.2)
    assert row[:2] == ("dead", 3), worker.read_text()[-6000:]
    # The worker lived through it and still works.
    job_id = submit_package(conn, user_id=OWNER, title="after", chapters=_chapters(1))
    assert _finished(conn, job_id, worker).status == "completed"
