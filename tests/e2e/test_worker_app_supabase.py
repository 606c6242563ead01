"""A worker storing artifacts in Supabase Storage (a local stand-in speaking
its REST API): the files land in the private bucket, the rows name them, and
the job hands out signed URLs that fetch exactly those bytes."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from urllib.request import urlopen

import psycopg
import pytest
from supabase_fake import KEY, PREFIX, serve_fake_supabase

from tasks.demo import start_worker, wait_for_job
from tasks.package import submit_package
from tasks.pdf import Chapter

pytestmark = pytest.mark.slow

OWNER = uuid.UUID("00000000-0000-4000-8000-0000000000c3")


def test_a_worker_stores_artifacts_in_supabase_and_the_job_hands_out_signed_urls(
    db: psycopg.Connection, broker_env: dict[str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with serve_fake_supabase() as (url, state):
        supabase = {"SUPABASE_URL": url, "SUPABASE_SERVICE_ROLE_KEY": KEY}
        # This process submits and reads too: the same database and storage.
        for name, value in {**supabase, "PG_BROKER_URL": broker_env["PG_BROKER_URL"]}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr("tasks.storage._stores", {})
        log_file = tmp_path / "worker.log"
        worker = start_worker({**broker_env, **supabase}, f"supa-{uuid.uuid4().hex[:8]}@%h",
                              pool="solo", log_file=log_file)
        try:
            job_id = submit_package(db, user_id=OWNER, title="Stored remotely", chapters=[
                Chapter("One", "The first chapter, spoken."),
                Chapter("Two", "The second chapter, spoken as well."),
            ])
            job = wait_for_job(db, job_id, timeout=60, worker=worker)
        finally:
            worker.stop()
        assert job.status == "completed", log_file.read_text()[-3000:]

        assert state.buckets["job-artifacts"]["public"] is False
        assert sorted(a.artifact.kind for a in job.artifacts) == ["audio", "audio", "pdf"]
        for link in job.artifacts:
            artifact = link.artifact
            assert artifact.storage_backend == "supabase"
            stored, content_type = state.objects[("job-artifacts", artifact.storage_path)]
            assert content_type == artifact.content_type
            assert hashlib.sha256(stored).hexdigest() == artifact.sha256
            assert link.url.startswith(
                f"{url}{PREFIX}/object/sign/job-artifacts/{artifact.storage_path}?token=")
            with urlopen(link.url) as response:
                assert hashlib.sha256(response.read()).hexdigest() == artifact.sha256
        uploads = [r for r in state.requests
                   if r["method"] == "POST" and r["path"].startswith(f"{PREFIX}/object/job-artifacts/")]
        assert len(uploads) == 3
        assert all(r["headers"]["x-upsert"] == "true"
                   and r["headers"]["authorization"] == f"Bearer {KEY}" for r in uploads)
