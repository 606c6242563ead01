"""``pg-broker demo``: a real package job, end to end, on a fresh machine.

Starts ``celery -A tasks worker`` as a subprocess on the same database (the
embedded one unless PG_BROKER_URL is set), submits a 16-chapter package of
public-domain text, draws a progress bar from the job row while the worker
speaks the chapters to MP3 and renders the PDF, prints where the files are,
and stops the worker. :func:`start_worker` and :func:`wait_for_job` serve the
app's tests too.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

import platformdirs
import psycopg
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from pg_broker.database import connect, database_url, mask_url
from pg_broker.jobs import Job, get_job
from pg_broker.migrate import ensure_migrated
from pg_broker.processes import Supervised, worker_command
from pg_broker.states import JobStatus
from tasks.package import submit_package
from tasks.pdf import Chapter
from tasks.storage import artifact_url, get_storage

log = logging.getLogger(__name__)

DEMO_USER = uuid.UUID("00000000-0000-4000-8000-00000000d3e0")

# Public-domain openings (all published before 1900): work, author, year, text.
PASSAGES = (
    ("A Tale of Two Cities", "Charles Dickens", 1859, "It was the best of times, it was the worst of times, it was the "
     "age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch "
     "of incredulity, it was the season of Light, it was the season of Darkness, it was the "
     "spring of hope, it was the winter of despair, we had everything before us, we had nothing "
     "before us, we were all going direct to Heaven, we were all going direct the other way."),
    ("Moby-Dick", "Herman Melville", 1851, "Call me Ishmael. Some years ago, never mind how long precisely, having little "
     "or no money in my purse, and nothing particular to interest me on shore, I thought I would "
     "sail about a little and see the watery part of the world. It is a way I have of driving "
     "off the spleen and regulating the circulation."),
    ("Pride and Prejudice", "Jane Austen", 1813, "It is a truth universally acknowledged, that a single man in "
     "possession of a good fortune, must be in want of a wife. However little known the feelings "
     "or views of such a man may be on his first entering a neighbourhood, this truth is so well "
     "fixed in the minds of the surrounding families, that he is considered the rightful "
     "property of some one or other of their daughters."),
    ("Alice's Adventures in Wonderland", "Lewis Carroll", 1865, "Alice was beginning to get very tired of sitting by "
     "her sister on the bank, and of having nothing to do: once or twice she had peeped into the "
     "book her sister was reading, but it had no pictures or conversations in it, and what is "
     "the use of a book, thought Alice, without pictures or conversations?"),
    ("The Gettysburg Address", "Abraham Lincoln", 1863, "Four score and seven years ago our fathers brought forth on "
     "this continent, a new nation, conceived in Liberty, and dedicated to the proposition that "
     "all men are created equal. Now we are engaged in a great civil war, testing whether that "
     "nation, or any nation so conceived and so dedicated, can long endure."),
    ("Walden", "Henry David Thoreau", 1854, "I went to the woods because I wished to live deliberately, to front only the "
     "essential facts of life, and see if I could not learn what it had to teach, and not, when "
     "I came to die, discover that I had not lived."),
    ("Adventures of Huckleberry Finn", "Mark Twain", 1884, "You don't know about me without you have read a book by "
     "the name of The Adventures of Tom Sawyer; but that ain't no matter. That book was made by "
     "Mr. Mark Twain, and he told the truth, mainly. There was things which he stretched, but "
     "mainly he told the truth."),
    ("Frankenstein", "Mary Shelley", 1818, "You will rejoice to hear that no disaster has accompanied the "
     "commencement of an enterprise which you have regarded with such evil forebodings. I "
     "arrived here yesterday, and my first task is to assure my dear sister of my welfare and "
     "increasing confidence in the success of my undertaking."),
)


def demo_chapters(count: int = 16, passages_per_chapter: int = 4) -> list[Chapter]:
    """``count`` chapters of a few public-domain openings each (about 270
    words), each opening introduced by its work and author, the chapter
    titled by its authors: no two of the first 16 alike."""
    chapters = []
    for index in range(count):
        # The second round of eight steps through the openings in another order.
        stride = 3 if (index // len(PASSAGES)) % 2 == 0 else 5
        picked = [PASSAGES[(index + step * stride) % len(PASSAGES)]
                  for step in range(passages_per_chapter)]
        authors = [author.rsplit(" ", 1)[-1] for _, author, _, _ in picked]
        title = ", ".join(authors[:-1]) + " and " + authors[-1] if len(authors) > 1 else authors[0]
        text = "\n\n".join(f"From {work}, by {author} ({year}).\n\n{passage}"
                            for work, author, year, passage in picked)
        chapters.append(Chapter(title, text))
    return chapters


def start_worker(
    env: Mapping[str, str],
    hostname: str,
    *,
    pool: str = "prefork",
    concurrency: int | None = None,
    log_file: Path | None = None,
    extra_args: tuple[str, ...] = (),
) -> Supervised:
    """``celery -A tasks worker`` in a process group of its own, consuming every app queue."""
    command = worker_command(
        "tasks", hostname=hostname, pool=pool, concurrency=concurrency,
        extra_args=("--without-mingle", "--without-gossip", *extra_args),
    )
    return Supervised(command, env=env, log_file=log_file).start()


def wait_for_job(
    conn: psycopg.Connection,
    job_id: uuid.UUID,
    *,
    timeout: float,
    on_progress: Callable[[Job], None] | None = None,
    worker: Supervised | None = None,
    interval: float = 0.2,
) -> Job:
    """Poll the job row until it finished (then the whole job, its artifacts
    with their URLs); raise TimeoutError, or RuntimeError if the worker
    process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(conn, job_id, details=False)
        if on_progress:
            on_progress(job)
        if job.finished:
            return get_job(conn, job_id, artifact_url=artifact_url)
        if worker is not None and not worker.alive:
            raise RuntimeError(f"the worker exited with status {worker.returncode} before the job finished")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.status} after {timeout:.0f} s")
        time.sleep(interval)


class JobProgress:
    """A job's progress for a person watching: rich's progress bar on a
    terminal (redrawn in place, the line cleared each time), and anywhere else
    (a pipe, a log file, CI) one plain line each time the count or the status
    changes. Feed it with :meth:`update` (``wait_for_job``'s ``on_progress``)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._console = Console(file=out)
        self._bar: Progress | None = None
        self._shown: tuple[int, str] | None = None

    def __enter__(self) -> JobProgress:
        if self._console.is_terminal:
            self._bar = Progress(
                BarColumn(), MofNCompleteColumn(), TextColumn("tasks"), TaskProgressColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self._console)
            self._task = self._bar.add_task("job", total=None, status="pending")
            self._bar.start()
        return self

    def update(self, job: Job) -> None:
        done = job.completed_tasks + job.failed_tasks + job.cancelled_tasks
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=job.total_tasks, status=job.status)
        elif (done, job.status) != self._shown:
            self._shown = (done, job.status)
            self._out.write(f"{done}/{job.total_tasks} tasks {float(job.progress):.1f}% {job.status}\n")
            self._out.flush()

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def log_dir() -> Path:
    path = Path(platformdirs.user_data_dir("pg_broker")) / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_demo(
    *,
    chapters: int = 16,
    pool: str = "prefork",
    concurrency: int | None = None,
    timeout: float = 600.0,
    out=sys.stdout,
) -> int:
    """The whole demo; writes its report to ``out``. Returns an exit status."""
    def say(text: str = "") -> None:
        out.write(text + "\n")
        out.flush()

    url = database_url()
    ensure_migrated(url)
    concurrency = concurrency or (1 if pool == "solo" else max(os.cpu_count() or 1, 1))
    worker_log = log_dir() / "demo-worker.log"
    env = dict(os.environ, PG_BROKER_URL=url)
    say(f"database: {mask_url(url)}")
    say(f"starting worker: celery -A tasks worker --pool {pool} --concurrency {concurrency}"
        f"  (log: {worker_log})")
    worker = start_worker(env, f"demo-{os.getpid()}@%h", pool=pool, concurrency=concurrency,
                          log_file=worker_log)
    try:
        with connect(url, autocommit=True) as conn:
            started = time.monotonic()
            job_id = submit_package(conn, user_id=DEMO_USER, title="pg_broker demo: sixteen openings",
                                    chapters=demo_chapters(chapters))
            say(f"submitted job {job_id}: {chapters} chapters -> {chapters} MP3 tasks + 1 PDF task")
            with JobProgress(out) as progress:
                job = wait_for_job(conn, job_id, timeout=timeout, on_progress=progress.update,
                                   worker=worker)
            elapsed = time.monotonic() - started
    except (RuntimeError, TimeoutError) as exc:
        say(f"demo failed: {exc}; see {worker_log}")
        return 1
    finally:
        worker.stop()

    audio = [link for link in job.artifacts if link.artifact.kind == "audio"]
    pdfs = [link for link in job.artifacts if link.artifact.kind == "pdf"]
    spoken = sum(float(link.artifact.duration_seconds or 0) for link in audio)
    audio_tasks = [t for t in job.tasks if t.task_type and t.task_type.endswith("synthesize_chapter")
                   and t.started_at and t.completed_at]
    busy = sum((t.completed_at - t.started_at).total_seconds() for t in audio_tasks)
    say()
    say(f"job {job.id}: {job.status} {elapsed:.1f} s after submission, worker start-up included "
        f"({job.completed_tasks} completed, {job.failed_tasks} failed of {job.total_tasks})")
    if job.error:
        say(f"error: {job.error}")
    say(f"{len(audio)} MP3 files, {spoken / 60:.1f} minutes of speech, "
        f"{sum(link.artifact.bytes for link in audio) / 1e6:.1f} MB (128 kbps mono)")
    if busy:
        # From the first chapter started to the last one stored: the worker's pace.
        span = (max(t.completed_at for t in audio_tasks)
                - min(t.started_at for t in audio_tasks)).total_seconds()
        say(f"throughput: {len(audio_tasks) / span:.2f} MP3 chapters/s for this worker "
            f"({concurrency} pool process{'es' if concurrency > 1 else ''}), "
            f"{len(audio_tasks) / busy:.2f} chapters/s per process")
    storage = get_storage()
    where = getattr(storage, "root", None)
    if where and audio:
        say(f"MP3s: {where / Path(audio[0].artifact.storage_path).parent}/")
    # In chapter order, each named: the files are named by task id (the
    # seed's storage path), which says nothing to a listener.
    audio.sort(key=lambda link: link.artifact.metadata.get("chapter", 0))
    for link in audio[:3]:
        meta = link.artifact.metadata
        say(f"  {meta.get('chapter', '?'):>2}. {meta.get('title', '')}: {link.url}")
    if len(audio) > 3:
        say(f"  ... and {len(audio) - 3} more")
    for link in pdfs:
        say(f"PDF:  {link.url}")
    say(f"details: pg-broker job {job.id}")
    return 0 if job.status == JobStatus.COMPLETED else 1
