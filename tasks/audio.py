"""Audio tasks: a chapter of a package job, spoken and stored as an MP3
tagged with its chapter (ID3: title, album = the package's title, track n/N),
so that a player or a file manager says which chapter a file is."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mutagen.id3 import ID3, TALB, TIT2, TRCK

from tasks import app, speech
from tasks.lifecycle import connection, job_to_work_on
from tasks.package import AUDIO_TASK
from tasks.storage import get_storage, store_artifact


@app.task(name=AUDIO_TASK, bind=True)
def synthesize_chapter(self, job_id: str, chapter: int) -> dict[str, Any]:
    """Speak chapter ``chapter`` (0-based) of the job's package with the job's
    voice and speed, store it at ``{userId}/{jobId}/audio/{taskId}.mp3``."""
    job = job_to_work_on(job_id, self.request)
    if job is None:
        return {"skipped": True}
    spec = job.params["chapters"][chapter]
    voice = job.params.get("voice", speech.DEFAULT_VOICE)
    rate_wpm = job.params.get("rate_wpm", speech.DEFAULT_RATE_WPM)
    with tempfile.TemporaryDirectory(prefix="pg-broker-audio-") as scratch:
        mp3 = Path(scratch) / "chapter.mp3"
        with open(mp3, "wb") as out:
            spoken = speech.synthesize_mp3(spec["text"], out, voice=voice, rate_wpm=rate_wpm)
        tag_chapter(mp3, title=spec["title"], album=job.title or "",
                    track=chapter + 1, tracks=len(job.params["chapters"]))
        artifact = store_artifact(
            connection(), get_storage(),
            job_id=job.id, user_id=job.user_id, task_id=self.request.id, kind="audio",
            source=mp3, content_type=speech.CONTENT_TYPE,
            duration_seconds=round(spoken.duration_seconds, 3),
            metadata={"chapter": chapter + 1, "title": spec["title"], "voice": voice,
                      "rate_wpm": rate_wpm, "bit_rate_kbps": speech.BIT_RATE_KBPS},
        )
    return {"path": artifact.storage_path, "bytes": artifact.bytes,
            "duration_seconds": float(artifact.duration_seconds)}


def tag_chapter(mp3: Path, *, title: str, album: str, track: int, tracks: int) -> None:
    """Write the chapter's ID3v2 tag at the front of the MP3 (lameenc writes none)."""
    tag = ID3()
    tag.add(TIT2(encoding=3, text=title))
    tag.add(TALB(encoding=3, text=album))
    tag.add(TRCK(encoding=3, text=f"{track}/{tracks}"))
    tag.save(mp3)
