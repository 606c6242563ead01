"""The Supabase Storage backend, against a local server speaking the Storage
REST API the official client calls: the requests it sends are asserted."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.request import urlopen

import psycopg
import pytest
from supabase_fake import KEY, PREFIX, FakeStorage, serve_fake_supabase

from tasks.storage import SupabaseStorage, get_storage, store_artifact

USER = uuid.UUID("00000000-0000-4000-8000-000000000002")


@pytest.fixture
def fake_supabase() -> Iterator[tuple[str, FakeStorage]]:
    with serve_fake_supabase() as served:
        yield served


def test_upload_creates_the_private_bucket_and_upserts_with_the_service_key(
    fake_supabase: tuple[str, FakeStorage], tmp_path: Path
) -> None:
    url, state = fake_supabase
    store = SupabaseStorage(url, KEY)
    source = tmp_path / "a.mp3"
    source.write_bytes(b"\xff\xfbMP3 frames")
    store.put("u/j/audio/t.mp3", source, "audio/mpeg")
    store.put("u/j/audio/t.mp3", source, "audio/mpeg")  # a re-run overwrites

    assert state.buckets["job-artifacts"]["public"] is False
    uploads = [r for r in state.requests if r["method"] == "POST"
               and r["path"] == f"{PREFIX}/object/job-artifacts/u/j/audio/t.mp3"]
    assert len(uploads) == 2
    for request in uploads:
        assert request["headers"]["authorization"] == f"Bearer {KEY}"
        assert request["headers"]["x-upsert"] == "true"
        assert request["headers"]["content-type"].startswith("multipart/form-data")
    assert state.objects[("job-artifacts", "u/j/audio/t.mp3")] == (b"\xff\xfbMP3 frames", "audio/mpeg")
    assert sum(r["path"] == f"{PREFIX}/bucket" for r in state.requests) == 1


def test_signed_url_download_and_remove(fake_supabase: tuple[str, FakeStorage], tmp_path: Path) -> None:
    url, state = fake_supabase
    store = SupabaseStorage(url, KEY)
    source = tmp_path / "doc.pdf"
    source.write_bytes(b"%PDF-1.7 body")
    store.put("u/j/pdf/t.pdf", source, "application/pdf")

    signed = store.url("u/j/pdf/t.pdf")
    sign_request = next(r for r in state.requests if r["path"].startswith(f"{PREFIX}/object/sign/"))
    assert sign_request["method"] == "POST"
    assert json.loads(sign_request["body"]) == {"expiresIn": "3600"}
    assert signed.startswith(f"{url}{PREFIX}/object/sign/job-artifacts/u/j/pdf/t.pdf?token=")
    with urlopen(signed) as response:  # no credentials: the token is the permission
        assert response.read() == b"%PDF-1.7 body"

    assert store.get("u/j/pdf/t.pdf") == b"%PDF-1.7 body"
    store.remove(["u/j/pdf/t.pdf"])
    delete = state.requests[-1]
    assert (delete["method"], delete["path"]) == ("DELETE", f"{PREFIX}/object/job-artifacts")
    assert json.loads(delete["body"]) == {"prefixes": ["u/j/pdf/t.pdf"]}
    assert ("job-artifacts", "u/j/pdf/t.pdf") not in state.objects


def test_supabase_is_chosen_by_environment_and_artifact_rows_name_it(
    fake_supabase: tuple[str, FakeStorage], db: psycopg.Connection, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, state = fake_supabase
    monkeypatch.setenv("SUPABASE_URL", url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", KEY)
    monkeypatch.setattr("tasks.storage._stores", {})
    store = get_storage()
    assert isinstance(store, SupabaseStorage)
    (job_id,) = db.execute("INSERT INTO jobs (user_id) VALUES (%s) RETURNING id", (USER,)).fetchone()
    source = tmp_path / "a.mp3"
    source.write_bytes(b"audio")
    for _ in range(2):
        artifact = store_artifact(db, store, job_id=job_id, user_id=USER, task_id="t1",
                                  kind="audio", source=source, content_type="audio/mpeg")
    assert artifact.storage_backend == "supabase"
    assert db.execute("SELECT count(*) FROM job_artifacts").fetchone() == (1,)
    assert state.objects[("job-artifacts", f"{USER}/{job_id}/audio/t1.mp3")][0] == b"audio"
