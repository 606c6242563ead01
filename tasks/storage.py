"""Where artifacts (MP3s, PDFs) live: one small interface, two backends.

- :class:`LocalStorage` (the default): files under ``PG_BROKER_STORAGE_DIR``,
  by default a per-user data directory. URLs are ``file://`` paths.
- :class:`SupabaseStorage`: Supabase Storage through the official ``storage3``
  client, in a private bucket (``job-artifacts``), handed out as signed URLs
  valid for one hour. Chosen when ``SUPABASE_URL`` and
  ``SUPABASE_SERVICE_ROLE_KEY`` are set.

Objects are named ``{userId}/{jobId}/{kind}/{taskId}.{ext}``. Uploads are
idempotent: a re-run task writes the same path (overwriting it) and
:func:`store_artifact` upserts its ``job_artifacts`` row on
``(storage_backend, storage_path)``, so one task leaves one row however many
times it ran. The database holds the path and checksum, never the bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import Any

import platformdirs
import psycopg

from pg_broker.jobs import Artifact, record_artifact

log = logging.getLogger(__name__)

STORAGE_DIR_VARIABLE = "PG_BROKER_STORAGE_DIR"
BUCKET_VARIABLE = "PG_BROKER_STORAGE_BUCKET"
DEFAULT_BUCKET = "job-artifacts"
SIGNED_URL_SECONDS = 3600
EXTENSIONS = {"audio": "mp3", "pdf": "pdf"}


class StorageError(RuntimeError):
    """An object could not be stored or fetched; the message says where."""


def artifact_path(user_id: str | uuid.UUID, job_id: str | uuid.UUID, kind: str, task_id: str) -> str:
    """``{userId}/{jobId}/{kind}/{taskId}.{ext}``: a task always gets the same path."""
    return f"{user_id}/{job_id}/{kind}/{task_id}.{EXTENSIONS.get(kind, 'bin')}"


def _checked(path: str) -> PurePosixPath:
    parts = PurePosixPath(path)
    if parts.is_absolute() or not parts.parts or any(p in ("", ".", "..") for p in parts.parts):
        raise ValueError(f"object path {path!r} must be relative, without . or .. segments")
    return parts


class Storage(ABC):
    """An object store: put, get, remove and a URL to hand to the user."""

    backend: str

    @abstractmethod
    def put(self, path: str, source: Path, content_type: str) -> None:
        """Store the file ``source`` at ``path``, replacing what is there."""

    @abstractmethod
    def get(self, path: str) -> bytes:
        """The object's bytes."""

    @abstractmethod
    def remove(self, paths: list[str]) -> None:
        """Delete the objects; missing ones are ignored."""

    @abstractmethod
    def url(self, path: str, expires_in: int = SIGNED_URL_SECONDS) -> str:
        """Where the user can fetch the object (signed when the store is private)."""


class LocalStorage(Storage):
    """Files in a directory; writes are atomic (temporary file, then rename)."""

    backend = "local"

    def __init__(self, root: Path | str | None = None) -> None:
        configured = os.environ.get(STORAGE_DIR_VARIABLE, "").strip()
        default = Path(platformdirs.user_data_dir("pg_broker")) / "artifacts"
        self.root = Path(root or configured or default).expanduser().resolve()

    def file(self, path: str) -> Path:
        return self.root.joinpath(*_checked(path).parts)

    def put(self, path: str, source: Path, content_type: str) -> None:
        target = self.file(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as data:
                while chunk := data.read(1 << 20):
                    out.write(chunk)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def get(self, path: str) -> bytes:
        try:
            return self.file(path).read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"no object {path!r} under {self.root}") from exc

    def remove(self, paths: list[str]) -> None:
        for path in paths:
            self.file(path).unlink(missing_ok=True)

    def url(self, path: str, expires_in: int = SIGNED_URL_SECONDS) -> str:
        return self.file(path).as_uri()


class SupabaseStorage(Storage):
    """Supabase Storage: a private bucket, created on first use if missing."""

    backend = "supabase"

    def __init__(self, url: str, service_role_key: str, bucket: str | None = None) -> None:
        try:
            from storage3 import SyncStorageClient
        except ImportError as exc:
            raise StorageError(
                "SUPABASE_URL is set but the Supabase client is not installed; "
                "pip install -e '.[app,supabase]' in a pg_broker checkout "
                "(pip install 'pg_broker[app,supabase]' from a wheel or package index)"
            ) from exc
        self.bucket = bucket or os.environ.get(BUCKET_VARIABLE, "").strip() or DEFAULT_BUCKET
        self.client = SyncStorageClient(
            url.rstrip("/") + "/storage/v1/",
            {"apikey": service_role_key, "Authorization": f"Bearer {service_role_key}"},
        )
        self._bucket_ready = False

    def _objects(self):
        from storage3.exceptions import StorageApiError

        if not self._bucket_ready:
            try:
                self.client.get_bucket(self.bucket)
            except StorageApiError:
                log.info("creating private Supabase Storage bucket %s", self.bucket)
                try:
                    self.client.create_bucket(self.bucket, options={"public": False})
                except StorageApiError as exc:
                    if "exist" not in str(exc).lower() and "duplicate" not in str(exc).lower():
                        raise StorageError(f"cannot create bucket {self.bucket!r}: {exc}") from exc
            self._bucket_ready = True
        return self.client.from_(self.bucket)

    def put(self, path: str, source: Path, content_type: str) -> None:
        _checked(path)
        try:
            self._objects().upload(
                path, Path(source), {"content-type": content_type, "upsert": "true"}
            )
        except Exception as exc:
            raise StorageError(f"upload of {path!r} to bucket {self.bucket!r} failed: {exc}") from exc

    def get(self, path: str) -> bytes:
        try:
            return self._objects().download(path)
        except Exception as exc:
            raise StorageError(f"download of {path!r} from {self.bucket!r} failed: {exc}") from exc

    def remove(self, paths: list[str]) -> None:
        if paths:
            self._objects().remove(paths)

    def url(self, path: str, expires_in: int = SIGNED_URL_SECONDS) -> str:
        signed = self._objects().create_signed_url(path, expires_in)
        return signed["signedURL"]


_stores: dict[str, Storage] = {}


def get_storage(backend: str | None = None) -> Storage:
    """The configured store (or the named one), one per process.

    Supabase when ``SUPABASE_URL`` and ``SUPABASE_SERVICE_ROLE_KEY`` are set,
    local files otherwise.
    """
    supabase_url = os.environ.get("SUPABASE_URL", "").strip()
    supabase_key = os.environ.get("SUPABASE_SERVICE_ROLE_KEY", "").strip()
    if backend is None:
        backend = "supabase" if supabase_url and supabase_key else "local"
    if backend not in _stores:
        if backend == "local":
            _stores[backend] = LocalStorage()
        elif backend == "supabase":
            if not (supabase_url and supabase_key):
                raise StorageError(
                    "artifact is in Supabase Storage but SUPABASE_URL / "
                    "SUPABASE_SERVICE_ROLE_KEY are not set"
                )
            _stores[backend] = SupabaseStorage(supabase_url, supabase_key)
        else:
            raise StorageError(f"unknown storage backend {backend!r}")
    return _stores[backend]


def file_digest(source: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def store_artifact(
    conn: psycopg.Connection,
    storage: Storage,
    *,
    job_id: str | uuid.UUID,
    user_id: str | uuid.UUID | None,
    task_id: str,
    kind: str,
    source: Path,
    content_type: str,
    duration_seconds: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> Artifact:
    """Upload ``source`` to the task's path and upsert its ``job_artifacts`` row."""
    path = artifact_path(user_id, job_id, kind, task_id)
    size, sha256 = file_digest(source)
    storage.put(path, source, content_type)
    artifact = record_artifact(
        conn, job_id=job_id, task_id=task_id, user_id=user_id, kind=kind,
        storage_backend=storage.backend, storage_path=path, content_type=content_type,
        size=size, sha256=sha256, duration_seconds=duration_seconds, metadata=metadata,
    )
    log.info("stored %s artifact %s (%d bytes) in %s", kind, path, size, storage.backend)
    return artifact


def artifact_url(artifact: Artifact) -> str | None:
    """Where the artifact's owner can fetch it (a signed URL, or a file://
    path), or None when its store cannot say: the ``artifact_url`` of
    :func:`pg_broker.jobs.get_job`."""
    try:
        return get_storage(artifact.storage_backend).url(artifact.storage_path)
    except StorageError as exc:
        log.warning("no URL for %s: %s", artifact.storage_path, exc)
        return None
