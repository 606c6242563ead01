"""The Supabase Storage backend, against a local server speaking the Storage
REST API the official client calls: the requests it sends are asserted."""

from __future__ import annotations

import email.parser
import json
import secrets
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from urllib.request import urlopen

import psycopg
import pytest

from pg_broker.storage import SupabaseStorage, get_storage, store_artifact

KEY = "service-role-key-for-tests"
PREFIX = "/storage/v1"
USER = uuid.UUID("00000000-0000-4000-8000-000000000002")


class FakeStorage:
    """The state of the fake Storage API, and every request it received."""

    def __init__(self) -> None:
        self.buckets: dict[str, dict] = {}
        self.objects: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.tokens: dict[str, tuple[str, str]] = {}
        self.requests: list[dict] = []


def _handler(state: FakeStorage) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _reply(self, status: int, body: object, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, error: str) -> None:
            self._reply(400 if status == 404 else status,
                        {"statusCode": str(status), "error": error, "message": error})

        def _handle(self) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.requests.append({
                "method": self.command, "path": path, "query": parse_qs(url.query),
                "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
            })
            assert path.startswith(PREFIX + "/")
            parts = path[len(PREFIX) + 1:].split("/")
            signed = parts[:2] == ["object", "sign"] and self.command == "GET"
            if not signed and (self.headers.get("Authorization") != f"Bearer {KEY}"
                               or self.headers.get("apikey") != KEY):
                return self._error(403, "Unauthorized")
            if parts[0] == "bucket":
                return self._bucket(parts[1:], body)
            if signed:
                token = parse_qs(url.query).get("token", [""])[0]
                if state.tokens.get(token) != (parts[2], "/".join(parts[3:])):
                    return self._error(403, "InvalidSignature")
                data, content_type = state.objects[(parts[2], "/".join(parts[3:]))]
                return self._reply(200, data, content_type)
            if parts[:2] == ["object", "sign"]:
                bucket, name = parts[2], "/".join(parts[3:])
                if (bucket, name) not in state.objects:
                    return self._error(404, "not_found")
                token = secrets.token_hex(8)
                state.tokens[token] = (bucket, name)
                return self._reply(200, {"signedURL": f"/object/sign/{bucket}/{name}?token={token}"})
            if parts[0] == "object" and self.command == "POST":
                return self._upload(parts[1], "/".join(parts[2:]), body)
            if parts[0] == "object" and self.command == "GET":
                found = state.objects.get((parts[1], "/".join(parts[2:])))
                return self._reply(200, found[0], found[1]) if found else self._error(404, "not_found")
            if parts[0] == "object" and self.command == "DELETE":
                removed = [p for p in json.loads(body)["prefixes"]
                           if state.objects.pop((parts[1], p), None) is not None]
                return self._reply(200, [{"name": p} for p in removed])
            return self._error(404, "no such endpoint")

        def _bucket(self, parts: list[str], body: bytes) -> None:
            if self.command == "GET" and parts:
                found = state.buckets.get(parts[0])
                return self._reply(200, found) if found else self._error(404, "Bucket not found")
            if self.command == "POST" and not parts:
                spec = json.loads(body)
                state.buckets[spec["id"]] = spec
                return self._reply(200, {"name": spec["id"]})
            return self._error(404, "no such endpoint")

        def _upload(self, bucket: str, name: str, body: bytes) -> None:
            if bucket not in state.buckets:
                return self._error(404, "Bucket not found")
            if (bucket, name) in state.objects and self.headers.get("x-upsert") != "true":
                return self._error(409, "Duplicate")
            message = email.parser.BytesParser().parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body
            )
            file_part = next(p for p in message.get_payload() if p.get_filename())
            state.objects[(bucket, name)] = (file_part.get_payload(decode=True),
                                             file_part.get_content_type())
            return self._reply(200, {"Key": f"{bucket}/{name}", "Id": str(uuid.uuid4())})

        do_GET = do_POST = do_PUT = do_DELETE = _handle

    return Handler


@pytest.fixture
def fake_supabase() -> Iterator[tuple[str, FakeStorage]]:
    state = FakeStorage()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


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
    monkeypatch.setattr("pg_broker.storage._stores", {})
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
