"""The HTTP API: package jobs for signed-in Supabase users, and their page.

Every request carries ``Authorization: Bearer <Supabase access token>``
(:mod:`tasks.api.auth`); every read runs inside
:func:`pg_broker.jobs.user_session`, as that user under row-level security,
so the database decides what a user sees: another user's job is simply not
there (404). Submissions go through the SQL function ``submit_job`` in the
same session, where the per-user limits and the Idempotency-Key are enforced
(migrations/supabase/106). Cancel and retry act with the API's own rights, once the
user's session has shown the job is theirs.

``GET /v1/jobs/{id}/events`` streams the job as Server-Sent Events, pushed by
the database (:mod:`tasks.api.events`). ``/`` is a small page that uses all
of it; ``/openapi.json`` describes it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import anyio
import psycopg
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from pg_broker.database import database_url
from pg_broker.jobs import Job, cancel_job, get_job, user_session
from pg_broker.maintenance import retry_dead_tasks
from pg_broker.migrate import migrate
from pg_broker.states import DEAD_LETTER_STATES, FINAL_JOB_STATES, JobStatus
from tasks.api.auth import AuthError, Verifier
from tasks.api.events import JobEvents
from tasks.api.files import FileSigner, content_type
from tasks.api.models import ErrorOut, JobDetailOut, JobPageOut, PackageIn, TaskOut
from tasks.api.sql import statements
from tasks.storage import StorageError, get_storage

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
HEARTBEAT_SECONDS = 15.0
# Bodies past this are refused unread; the per-user limit (job_limits, in the
# database) is what normally answers 413.
MAX_BODY_BYTES = 32 * 1024 * 1024
# How long a request waits for a database connection before it is answered 503.
POOL_WAIT_SECONDS = 10.0
# SQLSTATEs submit_job raises (migrations/supabase/106) -> HTTP status and error code.
SQL_ERRORS = {
    "PB401": (401, "unauthenticated"),
    "PB409": (409, "idempotency_key_reused"),
    "PB413": (413, "request_too_large"),
    "PB422": (422, "invalid_request"),
    "PB429": (429, "too_many_active_jobs"),
}


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.field = status, error, message, field


# The application ------------------------------------------------------------


class Api:
    """What the routes share: the pool, the token verifier, the events hub."""

    def __init__(self, conninfo: str, verifier: Verifier, *, pool_size: int = 10,
                 heartbeat: float = HEARTBEAT_SECONDS, pool_wait: float = POOL_WAIT_SECONDS) -> None:
        self.conninfo = conninfo
        self.verifier = verifier
        self.heartbeat = heartbeat
        self.pool = ConnectionPool(conninfo, min_size=1, max_size=pool_size, open=False,
                                   timeout=pool_wait, check=ConnectionPool.check_connection,
                                   kwargs={"autocommit": True, "application_name": "pg_broker api"})
        self.events = JobEvents(conninfo)
        self.files = FileSigner(verifier.secret)

    @contextmanager
    def session(self, user: uuid.UUID) -> Iterator[psycopg.Connection]:
        """A transaction as ``user`` under row-level security."""
        with self.pool.connection() as conn, user_session(conn, user):
            yield conn

    @contextmanager
    def service(self) -> Iterator[psycopg.Connection]:
        """A connection with the API's own rights (after a user's session allowed it)."""
        with self.pool.connection() as conn:
            yield conn

    def summary(self, user: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any] | None:
        with self.session(user) as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(statements["job_summary"], {"job_id": job_id}).fetchone()

    def detail(self, user: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any] | None:
        with self.session(user) as conn, conn.cursor(row_factory=dict_row) as cur:
            summary = cur.execute(statements["job_summary"], {"job_id": job_id}).fetchone()
            job = get_job(conn, job_id) if summary else None
        if job is None:
            return None
        return {**_summary_out(summary), **self._contents(job)}

    def _contents(self, job: Job) -> dict[str, Any]:
        return {
            "voice": job.params.get("voice"),
            "rate_wpm": job.params.get("rate_wpm"),
            "chapters": [c.get("title", "") for c in job.params.get("chapters", [])],
            "tasks": [TaskOut.model_validate(t, from_attributes=True).model_dump()
                      for t in job.tasks],
            "artifacts": [{
                "kind": a.artifact.kind, "content_type": a.artifact.content_type,
                "bytes": a.artifact.bytes,
                "duration_seconds": (float(a.artifact.duration_seconds)
                                     if a.artifact.duration_seconds is not None else None),
                "chapter": a.artifact.metadata.get("chapter"),
                "title": a.artifact.metadata.get("title"),
                "url": self._url(a.artifact.storage_backend, a.artifact.storage_path),
            } for a in job.artifacts],
        }

    def _url(self, backend: str, path: str) -> str | None:
        if backend == "local":
            return self.files.url(path)
        try:
            return get_storage(backend).url(path)
        except StorageError as exc:
            log.warning("no signed URL for %s: %s", path, exc)
            return None


def _summary_out(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "progress": float(row["progress"])}


def _json(value: object) -> object:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def _error(exc: ApiError) -> JSONResponse:
    body = {"error": exc.error, "message": exc.message}
    if exc.field:
        body["field"] = exc.field
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if exc.status == 401 else None
    return JSONResponse(body, status_code=exc.status, headers=headers)


def _field(loc: tuple) -> str:
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def current_user(request: Request,
                 authorization: Annotated[str | None, Header()] = None) -> uuid.UUID:
    """The caller's user id, from a valid bearer token."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthenticated",
                       "send Authorization: Bearer <access token> (a Supabase user's JWT)")
    try:
        return request.app.state.api.verifier.user_id(token.strip())
    except AuthError as exc:
        raise ApiError(401, "invalid_token", str(exc)) from exc


User = Annotated[uuid.UUID, Depends(current_user)]


def create_app(api: Api | None = None, *, dev: bool = False) -> FastAPI:
    """The ASGI application; ``api`` defaults to one built from the environment."""
    if api is None:
        verifier = Verifier.from_environment(dev=dev)  # before the database: fails faster
        url = database_url()
        # Users are served under row-level security: the API needs the Supabase layer.
        migrate(url, supabase=True)
        api = Api(url, verifier)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        api.pool.open(wait=True, timeout=30)
        await api.events.start()
        try:
            yield
        finally:
            await api.events.stop()
            api.pool.close()

    app = FastAPI(title="pg_broker jobs API", version="1", lifespan=lifespan,
                  description="Package jobs (chapters of text to MP3s and a PDF) for signed-in "
                              "Supabase users. Authorization: Bearer <access token>.",
                  responses={401: {"model": ErrorOut}, 422: {"model": ErrorOut}})
    app.state.api = api

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(psycopg.OperationalError)
    async def _database_down(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        log.error("database unavailable for %s %s: %s", request.method, request.url.path,
                  str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        response = _error(ApiError(503, "database_unavailable",
                                   "the database is not reachable just now; try again shortly"))
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            detail = next(e for e in errors if e["type"] == "json_invalid")
            reason = detail.get("ctx", {}).get("error", "not JSON")
            return _error(ApiError(400, "invalid_json", f"body: invalid JSON ({reason})", "body"))
        fields = [{"field": _field(e["loc"]), "message": e["msg"].removeprefix("Value error, ")}
                  for e in errors]
        message = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return JSONResponse({"error": "invalid_request", "message": message,
                             "field": fields[0]["field"], "fields": fields}, status_code=422)

    @app.middleware("http")
    async def _body_cap(request: Request, call_next):  # noqa: ANN202 - Starlette's signature
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(ApiError(413, "request_too_large",
                                   f"body: {int(length)} bytes; at most {MAX_BODY_BYTES}", "body"))
        return await call_next(request)

    def not_found(job_id: uuid.UUID) -> ApiError:
        return ApiError(404, "not_found", f"no job {job_id} of yours")

    @app.post("/v1/jobs", status_code=201, response_model=JobDetailOut,
              responses={200: {"model": JobDetailOut,
                               "description": "the job an earlier request with this key created"},
                         409: {"model": ErrorOut}, 413: {"model": ErrorOut},
                         429: {"model": ErrorOut}})
    def submit(package: PackageIn, user: User, response: Response,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> dict:
        """Submit a package: one audio task per chapter and a PDF, queued in one statement.

        With an ``Idempotency-Key`` header, the same key returns the same job
        (200) instead of creating another; a key reused for a different body is 409.
        """
        params = {"chapters": [c.model_dump() for c in package.chapters],
                  "voice": package.voice, "rate_wpm": package.rate_wpm}
        try:
            with api.session(user) as conn:
                job_id, created = conn.execute(statements["submit_job"], {
                    "job_type": "package", "title": package.title, "params": Jsonb(params),
                    "idempotency_key": idempotency_key,
                }).fetchone()
        except psycopg.Error as exc:
            if exc.sqlstate in SQL_ERRORS:
                status, code = SQL_ERRORS[exc.sqlstate]
                raise ApiError(status, code, exc.diag.message_primary or str(exc),
                               exc.diag.column_name) from exc
            raise
        if not created:
            response.status_code = 200
        log.info("user %s %s job %s", user, "submitted" if created else "re-sent", job_id)
        return api.detail(user, job_id)

    @app.get("/v1/jobs", response_model=JobPageOut)
    def list_jobs(user: User,
                  status: Annotated[JobStatus | None, Query()] = None,
                  limit: Annotated[int, Query(ge=1, le=100)] = 20,
                  cursor: Annotated[str | None, Query()] = None) -> dict:
        """Your jobs, newest first; ``next_cursor`` fetches the next page."""
        after_created = after_id = None
        if cursor:
            try:
                after_created, after_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
                uuid.UUID(after_id)
                datetime.fromisoformat(after_created)
            except ValueError as exc:
                raise ApiError(422, "invalid_request", "cursor: not a cursor this API returned",
                               "cursor") from exc
        with api.session(user) as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(statements["jobs_page"], {
                "status": status, "after_created": after_created, "after_id": after_id,
                "limit": limit + 1}).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = None
        if more:
            last = rows[-1]
            next_cursor = base64.urlsafe_b64encode(
                f"{last['created_at'].isoformat()}|{last['id']}".encode()).decode()
        return {"jobs": [_summary_out(r) for r in rows], "next_cursor": next_cursor}

    @app.get("/v1/jobs/{job_id}", response_model=JobDetailOut, responses={404: {"model": ErrorOut}})
    def read_job(job_id: uuid.UUID, user: User) -> dict:
        """A job: status, progress, tasks, and artifacts with signed URLs."""
        detail = api.detail(user, job_id)
        if detail is None:
            raise not_found(job_id)
        return detail

    @app.delete("/v1/jobs/{job_id}", response_model=JobDetailOut,
                responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}})
    def cancel(job_id: uuid.UUID, user: User) -> dict:
        """Cancel a job: tasks not started yet never run; a running one finishes."""
        summary = api.summary(user, job_id)
        if summary is None:
            raise not_found(job_id)
        with api.service() as conn:
            if cancel_job(conn, job_id) is None:
                raise ApiError(409, "already_finished",
                               f"job {job_id} already {summary['status']}; nothing to cancel")
        return api.detail(user, job_id)

    @app.post("/v1/jobs/{job_id}/retry", response_model=JobDetailOut,
              responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}})
    def retry(job_id: uuid.UUID, user: User) -> dict:
        """Run a job's failed and dead tasks again, with fresh attempts."""
        with api.session(user) as conn:
            job = get_job(conn, job_id)
        if job is None:
            raise not_found(job_id)
        if job.status == JobStatus.CANCELLED:
            raise ApiError(409, "cancelled", f"job {job_id} was cancelled; submit it again")
        failed = [t.task_id for t in job.tasks if t.status in DEAD_LETTER_STATES and t.task_id]
        if not failed:
            raise ApiError(409, "nothing_to_retry", f"job {job_id} has no failed or dead tasks")
        with api.service() as conn:
            retry_dead_tasks(conn, failed)
        return api.detail(user, job_id)

    @app.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "`event: job` with the job (as in the list) "
                                             "whenever it changes; id = its version"},
                        404: {"model": ErrorOut}})
    async def events(job_id: uuid.UUID, user: User,
                     last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
        """Server-Sent Events: the job now, then at every change, until it finishes.

        Resume with ``Last-Event-ID``: the current state comes at once if it
        moved past that version. A comment line every 15 s keeps proxies open.
        """
        try:
            seen = int(last_event_id) if last_event_id else None
        except ValueError as exc:
            raise ApiError(422, "invalid_request", "Last-Event-ID: not an event id of this stream",
                           "Last-Event-ID") from exc
        if await anyio.to_thread.run_sync(api.summary, user, job_id) is None:
            raise not_found(job_id)
        return StreamingResponse(_stream(api, user, job_id, seen),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/files/{path:path}", include_in_schema=False)
    def file(path: str, expires: int, signature: str) -> FileResponse:
        if not api.files.valid(path, expires, signature):
            raise ApiError(403, "invalid_signature", "this link is not valid or has expired; "
                           "fetch the job again for a fresh one")
        try:
            location = get_storage("local").file(path)
        except ValueError as exc:
            raise ApiError(404, "not_found", "no such file") from exc
        if not location.is_file():
            raise ApiError(404, "not_found", "no such file")
        return FileResponse(location, media_type=content_type(path))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _stream(api: Api, user: uuid.UUID, job_id: uuid.UUID,
                  seen: int | None) -> AsyncIterator[str]:
    """The events of one stream. The watch is set up before each read, so a
    change that lands while reading wakes the next wait at once."""
    yield "retry: 2000\n\n"
    async with api.events.watch(str(job_id)) as changed:
        while True:
            changed.clear()
            state = await anyio.to_thread.run_sync(api.summary, user, job_id)
            if state is None:  # deleted meanwhile
                return
            if seen is None or state["version"] > seen:
                seen = state["version"]
                data = json.dumps(_summary_out(state), default=_json, separators=(",", ":"))
                yield f"id: {seen}\nevent: job\ndata: {data}\n\n"
            if state["status"] in FINAL_JOB_STATES:
                return
            try:
                await asyncio.wait_for(changed.wait(), api.heartbeat)
            except TimeoutError:
                yield ": heartbeat\n\n"
