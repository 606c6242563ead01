"""The table of figures, as Markdown (the README's "Reliability" section)."""

from __future__ import annotations

from .harness import Figures


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def table(results: list[Figures], load, elapsed: float) -> str:
    lines = [
        f"{load.tasks} tasks per scenario at {load.rate:g}/s, {load.work_seconds * 1000:g} ms of "
        f"work each, lease (Redis: visibility timeout) {load.lease:g} s; "
        f"{elapsed / 60:.1f} minutes in all.",
        "",
        "| scenario | broker | enqueued | executed | lost | re-runs after a kill | other re-runs "
        "| publish errors | resumed after (s) | longest wait (s) | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for f in results:
        notes = "; ".join(
            f.notes + ([f"lost e.g. {f.lost_examples}"] if f.lost else [])
            + ([f"{f.undelivered} still in the broker, undelivered"] if f.undelivered else []))
        lines.append(
            f"| {f.scenario} | {f.broker} | {f.enqueued:,} | {f.executed:,} | **{f.lost}** "
            f"| {f.reruns_after_kill} | {f.reruns_other} | {f.publish_errors} "
            f"| {_seconds(f.resume_seconds)} | {_seconds(f.max_wait_seconds)} | {notes} |"
        )
    return "\n".join(lines)
