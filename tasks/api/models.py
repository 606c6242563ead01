"""The HTTP API's bodies: what a request may send (``…In``, extra fields
refused) and what it is answered (``…Out``, which ``/openapi.json`` shows)."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pg_broker.states import JobStatus
from tasks.speech import (
    DEFAULT_RATE_WPM,
    DEFAULT_VOICE,
    MAX_RATE_WPM,
    MIN_RATE_WPM,
    check_voice,
)


class ChapterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=500)
    text: str = Field(min_length=1, description="the chapter's text, spoken as one MP3")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("the text is empty")
        return text


class PackageIn(BaseModel):
    """A package job: one MP3 per chapter and one PDF of them all."""

    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=500)
    chapters: list[ChapterIn] = Field(min_length=1, max_length=1000)
    voice: str = Field(DEFAULT_VOICE, description="an eSpeak NG voice: en-us, en-gb, de, fr …")
    rate_wpm: int = Field(DEFAULT_RATE_WPM, ge=MIN_RATE_WPM, le=MAX_RATE_WPM,
                          description="speed in words per minute")

    @field_validator("voice")
    @classmethod
    def _known_voice(cls, voice: str) -> str:
        check_voice(voice)  # ValueError names the voice and some that exist
        return voice


class JobOut(BaseModel):
    id: uuid.UUID
    job_type: str
    title: str | None
    status: JobStatus
    progress: float = Field(description="percent of the job's tasks finished")
    total_tasks: int
    completed_tasks: int
    failed_tasks: int
    cancelled_tasks: int
    error: str | None
    version: int = Field(description="grows with every change; the event id of the stream")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class TaskOut(BaseModel):
    task_id: str | None
    task_type: str | None
    status: str
    attempts: int
    max_attempts: int
    error: str | None
    started_at: datetime | None
    completed_at: datetime | None


class ArtifactOut(BaseModel):
    kind: str
    content_type: str
    bytes: int
    duration_seconds: float | None
    chapter: int | None
    title: str | None
    url: str | None = Field(description="signed: valid for one hour, needs no token")


class JobDetailOut(JobOut):
    voice: str | None
    rate_wpm: int | None
    chapters: list[str] = Field(description="the chapter titles")
    tasks: list[TaskOut]
    artifacts: list[ArtifactOut]


class JobPageOut(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")


class ErrorOut(BaseModel):
    error: str
    message: str
    field: str | None = None
    fields: list[dict[str, str]] | None = None
