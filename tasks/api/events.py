"""Job events for Server-Sent Events streams: one LISTEN per API process.

A trigger on ``jobs`` (migrations/core/104) notifies channel ``pgbroker_jobs``
with ``<job id>:<version>`` when a job's status or counters change — only
for jobs some stream watches, since every NOTIFY wakes every listening
session of the database (workers too). This process keeps ONE connection
listening on that channel for all its streams (psycopg's
``AsyncConnection.notifies()``), records which jobs its streams watch in
``job_event_watchers`` (under that connection's backend pid, on a second,
idle-most-of-the-time connection: the listening one is busy waiting), and
wakes the streams of a job when it changes. Each stream then re-reads the
job as its own user, under row-level security, so a notification never
carries data to anyone. Notifications lost while the connection was down are
covered twice: every stream re-reads after a reconnect, and at each heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable

import anyio
import psycopg

from pg_broker.masking import first_line, redact
from tasks.api.sql import statements

log = logging.getLogger(__name__)

CHANNEL = "pgbroker_jobs"
APPLICATION_NAME = "pg_broker api events"  # the LISTEN session
CONTROL_NAME = "pg_broker api watchers"
RECONNECT_DELAYS = (0.5, 1, 2, 5)


class JobEvents:
    """The process's LISTEN connection and the streams waiting on it."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._watchers: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task | None = None
        self._control: psycopg.AsyncConnection | None = None
        self._control_lock = asyncio.Lock()
        self._pid: int | None = None  # the LISTEN session's backend pid
        self.listening = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="job events listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._control is not None:
            await self._control.close()

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever job ``job_id`` changes (or may have). The
        database knows the job is watched before this yields."""
        changed = asyncio.Event()
        first = not self._watchers.get(job_id)
        self._watchers[job_id].add(changed)
        try:
            if first:
                await self._control_statement("watch_jobs", job_ids=[job_id])
            yield changed
        finally:
            watchers = self._watchers[job_id]
            watchers.discard(changed)
            if not watchers:
                del self._watchers[job_id]
                # A stream ends by cancellation (its client left); the
                # database must still hear that nobody watches any more.
                with anyio.CancelScope(shield=True):
                    await self._control_statement("unwatch_job", job_id=job_id)

    async def _control_statement(self, name: str, **params: object) -> None:
        """Run a watcher statement for the current LISTEN session; failures are
        logged, never raised: the stream still has its heartbeat re-reads."""
        if self._pid is None:
            return  # not listening now; _listen registers every watched job on connect
        async with self._control_lock:
            try:
                if self._control is None or self._control.closed:
                    self._control = await psycopg.AsyncConnection.connect(
                        self._conninfo, autocommit=True, application_name=CONTROL_NAME)
                await self._control.execute(statements[name], {**params, "pid": self._pid})
            except psycopg.Error as exc:
                log.warning("job events: could not record watched jobs (%s)",
                            redact(first_line(exc), self._conninfo))

    def _wake(self, job_ids: Iterable[str] | None = None) -> None:
        for job_id in list(self._watchers) if job_ids is None else job_ids:
            for changed in self._watchers.get(job_id, ()):
                changed.set()

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, application_name=APPLICATION_NAME)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._pid = conn.info.backend_pid
                    await self._control_statement("watch_jobs", job_ids=list(self._watchers))
                    self.listening.set()
                    failures = 0
                    self._wake()  # whatever changed while we were not listening
                    async for notify in conn.notifies():
                        self._wake((notify.payload.partition(":")[0],))
            except psycopg.Error as exc:
                self.listening.clear()
                self._pid = None
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                log.warning("job events: lost the LISTEN connection (%s); reconnecting in %.1f s",
                            redact(first_line(exc), self._conninfo), delay)
                await asyncio.sleep(delay)
