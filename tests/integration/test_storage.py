"""Local artifact storage and the idempotent artifact rows."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import psycopg
import pytest

from tasks.storage import LocalStorage, artifact_path, get_storage, store_artifact

USER = uuid.UUID("00000000-0000-4000-8000-000000000001")


@pytest.fixture
def job_id(db: psycopg.Connection) -> uuid.UUID:
    (job,) = db.execute("INSERT INTO jobs (user_id, title) VALUES (%s, 't') RETURNING id", (USER,)).fetchone()
    return job


def _file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / f"upload-{hashlib.md5(content).hexdigest()}"
    path.write_bytes(content)
    return path


def test_paths_are_user_job_kind_task(job_id: uuid.UUID) -> None:
    assert artifact_path(USER, job_id, "audio", "t-1") == f"{USER}/{job_id}/audio/t-1.mp3"
    assert artifact_path(USER, job_id, "pdf", "t-2") == f"{USER}/{job_id}/pdf/t-2.pdf"


def test_local_storage_round_trips_and_refuses_paths_outside_its_root(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "root")
    store.put("u/j/audio/t.mp3", _file(tmp_path, b"ID3 data"), "audio/mpeg")
    assert store.get("u/j/audio/t.mp3") == b"ID3 data"
    assert store.url("u/j/audio/t.mp3") == (tmp_path / "root/u/j/audio/t.mp3").as_uri()
    store.put("u/j/audio/t.mp3", _file(tmp_path, b"replaced"), "audio/mpeg")
    assert store.get("u/j/audio/t.mp3") == b"replaced"
    store.remove(["u/j/audio/t.mp3", "u/j/audio/missing.mp3"])
    assert not (tmp_path / "root/u/j/audio/t.mp3").exists()
    for bad in ("../escape", "/etc/passwd", "u/../../x", ""):
        with pytest.raises(ValueError):
            store.put(bad, _file(tmp_path, b"x"), "text/plain")


def test_the_storage_directory_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_BROKER_STORAGE_DIR", str(tmp_path / "configured"))
    monkeypatch.delenv("SUPABASE_URL", raising=False)
    assert LocalStorage().root == (tmp_path / "configured").resolve()
    assert get_storage().backend == "local"


def test_rerunning_a_task_overwrites_its_object_and_keeps_one_artifact_row(
    db: psycopg.Connection, job_id: uuid.UUID, tmp_path: Path
) -> None:
    store = LocalStorage(tmp_path / "root")
    first = store_artifact(
        db, store, job_id=job_id, user_id=USER, task_id="task-1", kind="audio",
        source=_file(tmp_path, b"first run"), content_type="audio/mpeg", duration_seconds=1.5,
    )
    again = store_artifact(
        db, store, job_id=job_id, user_id=USER, task_id="task-1", kind="audio",
        source=_file(tmp_path, b"second run!"), content_type="audio/mpeg", duration_seconds=1.75,
    )
    assert again.id == first.id
    assert again.storage_path == f"{USER}/{job_id}/audio/task-1.mp3"
    rows = db.execute("SELECT bytes, sha256, duration_seconds FROM job_artifacts").fetchall()
    assert rows == [(11, hashlib.sha256(b"second run!").hexdigest(), pytest.approx(1.75))]
    assert store.get(again.storage_path) == b"second run!"
