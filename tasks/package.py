"""The package job: N chapters of text become N MP3 files and one PDF.

One ``tasks.audio.synthesize_chapter`` task per chapter and one
``tasks.documents.render_package_pdf`` task, submitted with the library's
:func:`pg_broker.jobs.submit_job` in one transaction. The text lives once, in
``jobs.params``; each message names its chapter by index.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from celery import Celery

from pg_broker.jobs import Job, submit_job
from tasks import app as worker_app
from tasks.pdf import Chapter
from tasks.speech import DEFAULT_RATE_WPM, DEFAULT_VOICE, MAX_RATE_WPM, MIN_RATE_WPM, check_voice

AUDIO_TASK = "tasks.audio.synthesize_chapter"
PDF_TASK = "tasks.documents.render_package_pdf"
PACKAGE = "package"


def submit_package(
    conn: psycopg.Connection,
    *,
    user_id: uuid.UUID | str,
    title: str,
    chapters: Sequence[Chapter],
    voice: str = DEFAULT_VOICE,
    rate_wpm: int = DEFAULT_RATE_WPM,
    app: Celery | None = None,
) -> uuid.UUID:
    """A package job: one audio task per chapter and one PDF of the whole
    package, sent by ``app`` (the worker app, ``tasks.app``, by default).
    Refused before anything is written if a chapter is empty, the voice
    unknown or the speed out of range."""
    if not chapters:
        raise ValueError("a package needs at least one chapter")
    for number, chapter in enumerate(chapters, start=1):
        if not chapter.text.strip():
            raise ValueError(f"chapter {number} ({chapter.title!r}) has no text")
    if not MIN_RATE_WPM <= rate_wpm <= MAX_RATE_WPM:
        raise ValueError(f"speed {rate_wpm} wpm is outside {MIN_RATE_WPM}–{MAX_RATE_WPM}")
    check_voice(voice)
    params = {
        "voice": voice,
        "rate_wpm": rate_wpm,
        "chapters": [{"title": c.title, "text": c.text} for c in chapters],
    }
    tasks = [(AUDIO_TASK, (index,)) for index in range(len(chapters))] + [(PDF_TASK, ())]
    return submit_job(conn, user_id=user_id, job_type=PACKAGE, title=title, params=params,
                      tasks=tasks, app=app or worker_app)


def package_chapters(params: dict[str, Any]) -> list[Chapter]:
    """The chapters of a package job, from its ``params``."""
    return [Chapter(c["title"], c["text"]) for c in params["chapters"]]


def task_labels(job: Job) -> dict[str, str]:
    """Task id → what the task makes, for a person reading a package job:
    ``3 Chapter 3: Walden`` for a chapter, ``PDF`` for the package. A
    chapter's number comes from its MP3's row when it has one; otherwise
    from the order of the audio tasks, which both submit_package and the
    SQL submit_job() write in chapter order (and ``get_job`` lists so), as
    long as every one of them is still listed."""
    titles = [c["title"] for c in job.params.get("chapters", [])]
    audio = [t.task_id for t in job.tasks if t.task_type == AUDIO_TASK]
    numbers = ({task_id: n for n, task_id in enumerate(audio, start=1)}
               if len(audio) == len(titles) else {})
    numbers.update({link.artifact.task_id: link.artifact.metadata["chapter"]
                    for link in job.artifacts if "chapter" in link.artifact.metadata})
    labels = {task_id: f"{n} {titles[n - 1]}" for task_id, n in numbers.items()
              if 1 <= n <= len(titles)}
    labels.update({t.task_id: "PDF" for t in job.tasks if t.task_type == PDF_TASK})
    return labels
