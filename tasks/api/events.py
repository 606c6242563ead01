"""Job events for Server-Sent Events streams: one LISTEN per API process.

A trigger on ``jobs`` (migrations/010) notifies channel ``pgbroker_jobs``
with ``<job id>:<version>`` whenever a job's status or counters change. This
process keeps ONE connection listening on that channel for all its streams
(psycopg's ``AsyncConnection.notifies()``) and wakes the streams that watch
the job; each stream then re-reads the job as its own user, under row-level
security, so a notification never carries data to anyone. Notifications lost
while the connection was down are covered twice: every stream re-reads after
a reconnect, and at each heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator

import psycopg

log = logging.getLogger(__name__)

CHANNEL = "pgbroker_jobs"
APPLICATION_NAME = "pg_broker api events"
RECONNECT_DELAYS = (0.5, 1, 2, 5)


class JobEvents:
    """The process's LISTEN connection and the streams waiting on it."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._watchers: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task | None = None
        self.listening = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="job events listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever job ``job_id`` changes (or may have)."""
        changed = asyncio.Event()
        self._watchers[job_id].add(changed)
        try:
            yield changed
        finally:
            watchers = self._watchers[job_id]
            watchers.discard(changed)
            if not watchers:
                del self._watchers[job_id]

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
                    self.listening.set()
                    failures = 0
                    self._wake()  # whatever changed while we were not listening
                    async for notify in conn.notifies():
                        self._wake((notify.payload.partition(":")[0],))
            except psycopg.Error as exc:
                self.listening.clear()
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                log.warning("job events: lost the LISTEN connection (%s); reconnecting in %.1f s",
                            str(exc).strip().splitlines()[0] if str(exc).strip() else exc, delay)
                await asyncio.sleep(delay)
