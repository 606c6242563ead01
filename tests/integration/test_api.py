"""The HTTP API (tasks/api) over real HTTP on real PostgreSQL: submitting,
idempotency, limits, bad input, auth (HS256 and a JWKS served over HTTP),
row-level security, cancel and retry, signed file URLs, and the
Server-Sent Events stream pushed by the database.

(Past ~400 lines on purpose: one running API and one database serve every
test; each section is one endpoint.)"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest
from api_support import SECRET, Jwks, bearer, running_api, token
from celery_workers import wait_for
from supabase_fake import KEY, serve_fake_supabase

import tasks.storage
from tasks.api.auth import JWKS_PATH, Verifier
from tasks.api.events import APPLICATION_NAME
from tasks.api.files import FileSigner

ALICE = uuid.UUID("00000000-0000-4000-8000-0000000a11ce")
BOB = uuid.UUID("00000000-0000-4000-8000-000000000b0b")
PACKAGE = {"title": "Two parts", "voice": "en-gb", "rate_wpm": 190,
           "chapters": [{"title": "One", "text": "First words."},
                        {"title": "Two", "text": "Second words."}]}


@pytest.fixture(scope="module")
def jwks() -> Iterator[tuple[Jwks, str]]:
    keys = Jwks()
    with keys.serve() as base:
        yield keys, base


@pytest.fixture(scope="module")
def storage_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Local artifact storage shared by the test and the API (same process)."""
    root = tmp_path_factory.mktemp("api-artifacts")
    saved = tasks.storage._stores.copy()
    tasks.storage._stores.clear()
    tasks.storage._stores["local"] = tasks.storage.LocalStorage(root)
    yield root
    tasks.storage._stores.clear()
    tasks.storage._stores.update(saved)


@pytest.fixture(scope="module")
def base_url(database_url: str, jwks: tuple[Jwks, str], storage_dir: Path) -> Iterator[str]:
    verifier = Verifier(secret=SECRET, jwks_url=jwks[1] + JWKS_PATH)
    with running_api(database_url, verifier, heartbeat=0.5) as url:
        yield url


@pytest.fixture
def client(base_url: str, db: psycopg.Connection) -> Iterator[httpx.Client]:
    """A client of the running API on an emptied database."""
    with httpx.Client(base_url=base_url, timeout=30) as http:
        yield http


def _queued(db: psycopg.Connection) -> tuple[int, int]:
    return db.execute("SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM job_tasks)"
                      ).fetchone()


def _submit(client: httpx.Client, user: uuid.UUID = ALICE, body: dict = PACKAGE,
            **headers: str) -> httpx.Response:
    return client.post("/v1/jobs", json=body, headers={**bearer(user), **headers})


def test_the_openapi_document_describes_the_versioned_endpoints(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/retry",
            "/v1/jobs/{job_id}/events"} <= set(document["paths"])
    assert set(document["paths"]["/v1/jobs/{job_id}"]) == {"get", "delete"}
    assert "PackageIn" in document["components"]["schemas"]


def test_a_submitted_package_is_201_with_the_job_and_its_tasks_queued(
    client: httpx.Client, db: psycopg.Connection
) -> None:
    response = _submit(client)
    assert response.status_code == 201, response.text
    job = response.json()
    assert (job["status"], job["total_tasks"], job["progress"]) == ("pending", 3, 0.0)
    assert (job["voice"], job["rate_wpm"], job["chapters"]) == ("en-gb", 190, ["One", "Two"])
    assert [t["task_type"] for t in job["tasks"]] == [
        "tasks.audio.synthesize_chapter"] * 2 + ["tasks.documents.render_package_pdf"]
    row = db.execute("SELECT user_id, params FROM jobs WHERE id = %s", (job["id"],)).fetchone()
    assert row == (ALICE, {"chapters": PACKAGE["chapters"], "voice": "en-gb", "rate_wpm": 190})
    assert db.execute("SELECT count(*) FROM job_tasks WHERE job_id = %s AND user_id = %s",
                      (job["id"], ALICE)).fetchone() == (3,)


def test_an_idempotency_key_returns_the_same_job_201_then_200_with_the_same_body(
    client: httpx.Client, db: psycopg.Connection
) -> None:
    first = _submit(client, **{"Idempotency-Key": "k-1"})
    again = _submit(client, **{"Idempotency-Key": "k-1"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json() == again.json()
    reused = _submit(client, body={**PACKAGE, "title": "Other"}, **{"Idempotency-Key": "k-1"})
    assert reused.status_code == 409
    assert reused.json()["error"] == "idempotency_key_reused"
    assert _queued(db) == (1, 3)


def test_racing_requests_with_one_idempotency_key_create_one_job(
    base_url: str, db: psycopg.Connection
) -> None:
    racers = 8
    barrier = threading.Barrier(racers)
    statuses: list[tuple[int, str]] = []

    def race() -> None:
        with httpx.Client(base_url=base_url, timeout=60) as http:
            barrier.wait(10)
            response = _submit(http, **{"Idempotency-Key": "double-click"})
            statuses.append((response.status_code, response.json()["id"]))

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert sorted(s for s, _ in statuses) == [200] * (racers - 1) + [201]
    assert len({job_id for _, job_id in statuses}) == 1
    assert _queued(db) == (1, 3)


TEN_MB = "word " * (2 * 1024 * 1024)


@pytest.mark.parametrize(("body", "status", "field"), [
    ({**PACKAGE, "voice": "xx-nonexistent"}, 422, "voice"),
    ({**PACKAGE, "chapters": []}, 422, "chapters"),
    ({**PACKAGE, "chapters": [{"title": "Blank", "text": "   "}]}, 422, "chapters[0].text"),
    ({**PACKAGE, "chapters": [{"title": "Huge", "text": TEN_MB}]}, 413, "chapters"),
    ("{not json", 400, "body"),
    ({**PACKAGE, "rate_wpm": "fast"}, 422, "rate_wpm"),
    ({**PACKAGE, "rate_wpm": 5000}, 422, "rate_wpm"),
    ({**PACKAGE, "title": 17}, 422, "title"),
    ({**PACKAGE, "chapters": "one long string"}, 422, "chapters"),
    ({**PACKAGE, "chapters": [{"title": "No text"}]}, 422, "chapters[0].text"),
    ({**PACKAGE, "colour": "blue"}, 422, "colour"),
    ([PACKAGE], 422, "body"),
], ids=["unknown-voice", "empty-chapters", "blank-text", "10MB-text", "invalid-json",
        "rate-not-a-number", "rate-out-of-range", "title-not-text", "chapters-not-a-list",
        "chapter-without-text", "unknown-field", "not-an-object"])
def test_bad_input_is_4xx_naming_the_field_and_nothing_is_queued(
    client: httpx.Client, db: psycopg.Connection, body: object, status: int, field: str
) -> None:
    headers = {**bearer(ALICE), "Content-Type": "application/json"}
    if isinstance(body, str):
        response = client.post("/v1/jobs", content=body, headers=headers)
    else:
        response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["field"] == field
    assert field in error["message"]
    assert _queued(db) == (0, 0)


def test_the_active_job_limit_answers_429(client: httpx.Client, db: psycopg.Connection) -> None:
    db.execute("INSERT INTO job_limits VALUES (%s, 2, 1048576)", (ALICE,))
    try:
        assert [_submit(client).status_code for _ in range(3)] == [201, 201, 429]
        refused = _submit(client).json()
        assert refused["error"] == "too_many_active_jobs"
        assert "the limit is 2" in refused["message"]
        assert _submit(client, BOB).status_code == 201  # the default limit is 10
    finally:
        db.execute("DELETE FROM job_limits WHERE user_id = %s", (ALICE,))
    assert _queued(db) == (3, 9)


@pytest.mark.parametrize("credentials", ["none", "not-bearer", "garbage", "bad-signature",
                                         "expired", "wrong-audience", "not-a-uuid"])
def test_requests_without_a_valid_token_are_401(
    client: httpx.Client, credentials: str
) -> None:
    now = int(time.time())
    claims = {"sub": str(ALICE), "aud": "authenticated", "exp": now + 60}
    headers = {
        "none": {},
        "not-bearer": {"Authorization": f"Basic {token(ALICE)}"},
        "garbage": {"Authorization": "Bearer abc.def.ghi"},
        "bad-signature": bearer(ALICE, secret="some-other-secret-of-32-bytes-or-more!"),
        "expired": bearer(ALICE, expires_in=-30),
        "wrong-audience": {"Authorization": "Bearer " + jwt.encode(
            {**claims, "aud": "anon"}, SECRET, algorithm="HS256")},
        "not-a-uuid": {"Authorization": "Bearer " + jwt.encode(
            {**claims, "sub": "alice"}, SECRET, algorithm="HS256")},
    }[credentials]
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"),
                         ("GET", f"/v1/jobs/{uuid.uuid4()}/events")]:
        response = client.request(method, path, headers=headers,
                                  json=PACKAGE if method == "POST" else None)
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
    if credentials == "expired":
        assert "expired" in response.json()["message"]


def test_es256_tokens_are_checked_against_the_projects_jwks(
    client: httpx.Client, jwks: tuple[Jwks, str]
) -> None:
    keys, _ = jwks
    mine = client.get("/v1/jobs", headers={"Authorization": f"Bearer {keys.token(ALICE)}"})
    assert mine.status_code == 200, mine.text
    assert keys.requests >= 1
    for forged in (keys.token(ALICE, kid="unknown-key"), keys.token(ALICE, expires_in=-30),
                   Jwks().token(ALICE)):  # same kid, another key
        response = client.get("/v1/jobs", headers={"Authorization": f"Bearer {forged}"})
        assert response.status_code == 401, response.text


def test_another_users_job_is_404_everywhere_and_their_list_is_their_own(
    client: httpx.Client, db: psycopg.Connection
) -> None:
    job_id = _submit(client).json()["id"]
    _submit(client, BOB)
    for method, path in [("GET", f"/v1/jobs/{job_id}"), ("DELETE", f"/v1/jobs/{job_id}"),
                         ("POST", f"/v1/jobs/{job_id}/retry"),
                         ("GET", f"/v1/jobs/{job_id}/events")]:
        response = client.request(method, path, headers=bearer(BOB))
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"] == "not_found"
    assert [j["id"] for j in client.get("/v1/jobs", headers=bearer(ALICE)).json()["jobs"]] == [job_id]
    assert job_id not in {j["id"] for j in client.get("/v1/jobs", headers=bearer(BOB)).json()["jobs"]}
    assert db.execute("SELECT status FROM jobs WHERE id = %s", (job_id,)).fetchone() == ("pending",)


def test_the_list_pages_newest_first_and_filters_by_status(
    client: httpx.Client, db: psycopg.Connection
) -> None:
    ids = [_submit(client).json()["id"] for _ in range(5)]
    db.execute("UPDATE jobs SET status = 'failed' WHERE id = %s", (ids[1],))
    seen, cursor = [], None
    while True:
        page = client.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})},
                          headers=bearer(ALICE)).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    failed = client.get("/v1/jobs", params={"status": "failed"}, headers=bearer(ALICE)).json()
    assert [j["id"] for j in failed["jobs"]] == [ids[1]]
    bad = client.get("/v1/jobs", params={"cursor": "nonsense"}, headers=bearer(ALICE))
    assert (bad.status_code, bad.json()["field"]) == (422, "cursor")


def test_cancel_stops_the_tasks_and_retry_requeues_failed_ones(
    client: httpx.Client, db: psycopg.Connection
) -> None:
    job_id = _submit(client).json()["id"]
    cancelled = client.delete(f"/v1/jobs/{job_id}", headers=bearer(ALICE))
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert {t["status"] for t in cancelled.json()["tasks"]} == {"cancelled"}
    assert client.delete(f"/v1/jobs/{job_id}", headers=bearer(ALICE)).status_code == 200
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=bearer(ALICE)).status_code == 409

    job_id = _submit(client).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=bearer(ALICE)).status_code == 409
    db.execute("UPDATE job_tasks SET status = 'failed', attempts = 3, error = 'boom',"
               " completed_at = now() WHERE job_id = %s AND queue = 'documents'", (job_id,))
    retried = client.post(f"/v1/jobs/{job_id}/retry", headers=bearer(ALICE))
    assert retried.status_code == 200, retried.text
    pdf = [t for t in retried.json()["tasks"] if t["task_type"].endswith("render_package_pdf")]
    assert [(t["status"], t["attempts"]) for t in pdf] == [("pending", 0)]
    assert retried.json()["failed_tasks"] == 0
    db.execute("UPDATE job_tasks SET status = 'completed', completed_at = now()"
               " WHERE job_id = %s", (job_id,))
    done = client.delete(f"/v1/jobs/{job_id}", headers=bearer(ALICE))
    assert (done.status_code, done.json()["error"]) == (409, "already_finished")
    assert "already completed" in done.json()["message"]


def _add_artifact(db: psycopg.Connection, storage_dir: Path, job_id: str) -> bytes:
    path = f"{ALICE}/{job_id}/audio/t1.mp3"
    data = b"\xff\xfb" + b"\x00" * 100
    (storage_dir / path).parent.mkdir(parents=True, exist_ok=True)
    (storage_dir / path).write_bytes(data)
    db.execute("INSERT INTO job_artifacts (job_id, task_id, user_id, kind, storage_backend,"
               " storage_path, content_type, bytes, sha256, metadata)"
               " VALUES (%s, 't1', %s, 'audio', 'local', %s, 'audio/mpeg', %s, %s,"
               " '{\"chapter\": 1, \"title\": \"One\"}')",
               (job_id, ALICE, path, len(data), hashlib.sha256(data).hexdigest()))
    return data


def test_local_artifacts_get_signed_urls_that_serve_the_file_and_refuse_tampering(
    client: httpx.Client, db: psycopg.Connection, storage_dir: Path
) -> None:
    job_id = _submit(client).json()["id"]
    data = _add_artifact(db, storage_dir, job_id)
    (artifact,) = client.get(f"/v1/jobs/{job_id}", headers=bearer(ALICE)).json()["artifacts"]
    assert (artifact["kind"], artifact["chapter"], artifact["title"]) == ("audio", 1, "One")
    fetched = client.get(artifact["url"])  # no token: the signature is the permission
    assert (fetched.status_code, fetched.headers["content-type"], fetched.content) == (
        200, "audio/mpeg", data)
    url = httpx.URL(artifact["url"])
    for tampered in (url.copy_merge_params({"signature": "0" * 64}),
                     url.copy_merge_params({"expires": str(int(time.time()) + 99999)}),
                     url.copy_with(path=url.path.replace("t1.mp3", "t2.mp3"))):
        assert client.get(str(tampered)).status_code == 403
    stale = FileSigner(SECRET).url(f"{ALICE}/{job_id}/audio/t1.mp3", expires_in=-1)
    refused = client.get(stale)
    assert refused.status_code == 403 and "expired" in refused.json()["message"]


def test_artifacts_in_supabase_storage_get_its_signed_urls(
    client: httpx.Client, db: psycopg.Connection, tmp_path: Path
) -> None:
    job_id = _submit(client).json()["id"]
    path = f"{ALICE}/{job_id}/pdf/t9.pdf"
    with serve_fake_supabase() as (url, state):
        store = tasks.storage.SupabaseStorage(url, KEY)
        source = tmp_path / "p.pdf"
        source.write_bytes(b"%PDF-1.7 bytes")
        store.put(path, source, "application/pdf")
        tasks.storage._stores["supabase"] = store
        try:
            db.execute("INSERT INTO job_artifacts (job_id, task_id, user_id, kind, storage_backend,"
                       " storage_path, content_type, bytes, sha256)"
                       " VALUES (%s, 't9', %s, 'pdf', 'supabase', %s, 'application/pdf', 14, %s)",
                       (job_id, ALICE, path, hashlib.sha256(b"%PDF-1.7 bytes").hexdigest()))
            (artifact,) = client.get(f"/v1/jobs/{job_id}", headers=bearer(ALICE)).json()["artifacts"]
            assert artifact["url"].startswith(f"{url}/storage/v1/object/sign/job-artifacts/{path}?token=")
            assert httpx.get(artifact["url"]).content == b"%PDF-1.7 bytes"
            sign = [r for r in state.requests if r["path"].startswith("/storage/v1/object/sign/")
                    and r["method"] == "POST"]
            assert json.loads(sign[-1]["body"]) == {"expiresIn": "3600"}
        finally:
            del tasks.storage._stores["supabase"]


def _events(lines: Iterator[str]) -> Iterator[dict]:
    """Parsed SSE blocks: {'id', 'event', 'data'} or {'comment'}."""
    block: dict = {}
    for line in lines:
        if line == "":
            if block:
                yield block
            block = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(": ")
            block[name] = value


def _complete_one_task(db: psycopg.Connection, job_id: str) -> None:
    db.execute("UPDATE job_tasks SET status = 'completed', completed_at = now() WHERE id ="
               " (SELECT min(id) FROM job_tasks WHERE job_id = %s AND status = 'pending')",
               (job_id,))


def test_the_event_stream_pushes_each_change_beats_and_ends_with_the_final_state(
    client: httpx.Client, db: psycopg.Connection
) -> None:
    job_id = _submit(client).json()["id"]
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer(ALICE)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.iter_lines())
        first = next(e for e in events if "data" in e)
        assert (first["event"], json.loads(first["data"])["status"]) == ("job", "pending")
        assert next(events) == {"comment": "heartbeat"}  # every 0.5 s in this test
        versions = [int(first["id"])]
        for _ in range(3):
            _complete_one_task(db, job_id)
            update = next(e for e in events if "data" in e)
            versions.append(int(update["id"]))
            assert json.loads(update["data"])["version"] == versions[-1]
        assert versions == sorted(set(versions))
        final = json.loads(update["data"])
        assert (final["status"], final["progress"], final["completed_tasks"]) == ("completed", 100, 3)
        assert list(events) == []  # the stream ended after the final state


def test_a_stream_resumes_from_last_event_id(client: httpx.Client, db: psycopg.Connection) -> None:
    job_id = _submit(client).json()["id"]
    (version,) = db.execute("SELECT version FROM jobs WHERE id = %s", (job_id,)).fetchone()
    _complete_one_task(db, job_id)
    with client.stream("GET", f"/v1/jobs/{job_id}/events",
                       headers={**bearer(ALICE), "Last-Event-ID": str(version)}) as response:
        events = _events(response.iter_lines())
        assert int(next(e for e in events if "data" in e)["id"]) == version + 1  # at once
    with client.stream("GET", f"/v1/jobs/{job_id}/events",
                       headers={**bearer(ALICE), "Last-Event-ID": str(version + 1)}) as response:
        events = _events(response.iter_lines())
        assert next(e for e in events if e.get("comment") or "data" in e) == {"comment": "heartbeat"}
    bad = client.get(f"/v1/jobs/{job_id}/events", headers={**bearer(ALICE), "Last-Event-ID": "x"})
    assert (bad.status_code, bad.json()["field"]) == (422, "Last-Event-ID")


def test_all_streams_of_the_process_share_one_listen_connection(
    base_url: str, client: httpx.Client, db: psycopg.Connection
) -> None:
    job_ids = [_submit(client, user).json()["id"] for user in (ALICE, ALICE, BOB)]
    opened: list[httpx.Response] = []
    streams: list[Iterator[dict]] = []
    clients = [httpx.Client(base_url=base_url, timeout=30) for _ in job_ids]
    try:
        for http, job_id, user in zip(clients, job_ids, (ALICE, ALICE, BOB), strict=True):
            request = http.build_request("GET", f"/v1/jobs/{job_id}/events", headers=bearer(user))
            response = http.send(request, stream=True)
            opened.append(response)
            streams.append(_events(response.iter_lines()))
            assert next(e for e in streams[-1] if "data" in e)
        (listener,) = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s", (APPLICATION_NAME,)).fetchall()
        watched = db.execute("SELECT job_id::text, listener_pid FROM job_event_watchers"
                             ).fetchall()
        assert sorted(watched) == sorted({(j, listener[0]) for j in job_ids})
        _complete_one_task(db, job_ids[2])
        update = next(e for e in streams[2] if "data" in e)
        assert json.loads(update["data"])["completed_tasks"] == 1
    finally:
        for response in opened:
            response.close()
        for http in clients:
            http.close()
    # Closed streams: their jobs are no longer watched, so no longer notified.
    wait_for(lambda: db.execute("SELECT count(*) FROM job_event_watchers").fetchone() == (0,),
             30, "the closed streams' watcher rows to go")
