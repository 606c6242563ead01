"""The progress a person sees while a job runs (``pg-broker demo``,
``pg-broker submit --wait``): a bar redrawn in place on a terminal, plain
lines anywhere else."""

from __future__ import annotations

import io
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal

from pg_broker.jobs import Job
from tasks.demo import JobProgress


def _job(done: int, status: str, total: int = 17) -> Job:
    now = datetime.now(UTC)
    return Job(id=uuid.uuid4(), user_id=None, job_type="package", title="t", params={},
               status=status, total_tasks=total, completed_tasks=done, failed_tasks=0,
               cancelled_tasks=0, progress=Decimal(100 * done / total).quantize(Decimal("0.01")),
               error=None, created_at=now, updated_at=now, started_at=now, completed_at=None)


RUN = [_job(0, "pending"), _job(0, "processing"), _job(0, "processing"), _job(9, "processing"),
       _job(9, "processing"), _job(17, "completed")]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_outside_a_terminal_each_change_is_one_plain_line() -> None:
    out = io.StringIO()
    with JobProgress(out) as progress:
        for job in RUN:
            progress.update(job)
    assert out.getvalue().splitlines() == [
        "0/17 tasks 0.0% pending", "0/17 tasks 0.0% processing", "9/17 tasks 52.9% processing",
        "17/17 tasks 100.0% completed"]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_ends_on_the_final_state() -> None:
    out = _Terminal()
    with JobProgress(out) as progress:
        for job in RUN:
            progress.update(job)
    screen = out.getvalue()
    assert "\x1b[" in screen  # drawn with terminal control sequences, not bare '\r'
    # What remains on screen: each redraw erases the line it replaces, so the
    # last frame is the final state, with nothing left of a longer earlier one.
    frames = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frame).strip()
              for frame in re.split(r"\r|\x1b\[2K", screen)]
    last = [frame for frame in frames if frame][-1]
    assert re.fullmatch(r"\S+ 17/17 tasks 100% completed \d:\d\d:\d\d", last), last
    # The cursor leaves the bar's line: what is printed next starts a line of its own.
    assert re.search(r"completed \d:\d\d:\d\d\n\Z", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen))
