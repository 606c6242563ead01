"""The task life cycle as a state machine, driven by Hypothesis on real PostgreSQL.

(Past ~400 lines on purpose: one Hypothesis machine, whose rules and
invariants check one another and must be read together.)

Three simulated workers, each on a connection of its own, claim rows of two
queues (tasks of a few jobs, and plain messages), renew, start, complete,
fail and requeue them through the SQL functions of migrations/ and the
transport's statements of pg_broker/sql/queries.sql, while an operator
cancels jobs, runs the watchdog and retries dead letters, and time passes.
Each worker keeps acting on what it *believes* it holds, so a worker whose
lease expired goes on settling rows that moved on: the stale worker of every
at-least-once broker.

Time is simulated: leases are granted for real (60 s and more), and the rule
``time_passes`` moves every future timestamp of the table (lease expiries,
visibility after backoff, TTLs) into the past by a step. No step sleeps.

After every step:

- each call returned what the rows said before it (a fenced call succeeds
  exactly when its lease token held the row), and changed the rows it
  should, as it should, and no other row at all — so a stale worker's settle
  never touches a row another worker holds;
- a held row (claimed/processing) has a lease token, a lease expiry and a
  worker; a pending one has attempts left; no row is delivered more than its
  max_attempts;
- a row is completed at most once;
- nothing leaves a terminal state (completed, failed, dead, cancelled), except
  failed/dead rows through ``dead retry``;
- every job's counters, progress, status, started_at and completed_at are
  what its rows say.

CI runs a bounded search; a longer one:
``PG_BROKER_STATEFUL_EXAMPLES=5000 PG_BROKER_STATEFUL_STEPS=80 python -m pytest
--timeout 0 tests/integration/test_task_state_machine.py`` (about ten minutes; the suite's 300 s
per-test timeout would cut it short).
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pg_broker import jobs as job_api
from pg_broker.queries import queries

QUEUES = ("sm-a", "sm-b")
WORKERS = 3
MAX_ROWS = 14
HELD = ("claimed", "processing")
TERMINAL = ("completed", "failed", "dead", "cancelled")
# Leases, the retry backoff, the TTL and time steps in seconds: every moment
# that decides whether a row is ready or its lease expired lies a minute or
# more from the real time an example takes, so only time_passes crosses one.
LEASES = (60, 300, 1800)
TIME_STEPS = (25, 100, 700, 4000)
BACKOFF = timedelta(seconds=100)
TTL = timedelta(seconds=300)
CENT = Decimal("0.01")

# Worker operations on rows it believes it holds (methods of the machine).
SETTLES = ("start_task", "complete_task", "fail_task", "transport_fail", "transport_requeue",
           "cancel_held_task", "mark_task_processing", "record_task_error")
BATCH_SETTLES = ("transport_fail", "transport_requeue")

EXAMPLES = int(os.environ.get("PG_BROKER_STATEFUL_EXAMPLES", "60"))
STEPS = int(os.environ.get("PG_BROKER_STATEFUL_STEPS", "50"))

SNAPSHOT = """
SELECT t.*,
       t.status = 'pending' AND t.visible_at <= now()
           AND (t.expires_at IS NULL OR t.expires_at > now()) AS ready,
       coalesce(t.lease_expires_at < now(), false) AS lease_expired,
       coalesce(t.expires_at < now(), false) AS ttl_expired
  FROM job_tasks t ORDER BY t.id
"""
# Columns computed against the clock, not stored: left out of "unchanged".
COMPUTED = ("ready", "lease_expired", "ttl_expired")


@dataclass(eq=False)
class Worker:
    name: str
    conn: psycopg.Connection
    # What the worker believes it holds: row id -> lease token. Stale entries
    # stay until the worker settles them, as in a worker whose lease expired.
    held: dict[int, uuid.UUID] = field(default_factory=dict)


def stored(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in COMPUTED}


def claim_order(row: dict[str, Any]) -> tuple:
    return (-row["priority"], row["sequence"])


class TaskLifeCycle(RuleBasedStateMachine):
    """One example: fresh tables, a few jobs and plain messages, three workers."""

    def __init__(self, admin: psycopg.Connection, worker_conns: list[psycopg.Connection]):
        super().__init__()
        self.admin = admin
        self.workers = [Worker(f"sm-worker-{i}", conn) for i, conn in enumerate(worker_conns)]
        admin.execute("TRUNCATE job_tasks, jobs RESTART IDENTITY CASCADE")
        self.jobs: dict[str, str] = {}  # job id -> owner (user id)
        self.cancelled_jobs: set[str] = set()
        self.started_jobs: set[str] = set()
        self.completions: Counter[int] = Counter()
        self.rows = self.snapshot()

    # Reading the table ---------------------------------------------------

    def snapshot(self) -> dict[int, dict[str, Any]]:
        with self.admin.cursor(row_factory=dict_row) as cur:
            return {row["id"]: row for row in cur.execute(SNAPSHOT)}

    def step(self, action: str, changed: dict[int, Any], *, gone: set[int] = frozenset(),
             retried: set[int] = frozenset()) -> dict[int, dict[str, Any]]:
        """After an action: ``changed`` maps each row it should have changed to
        a check of the row's new state (a function of before and after);
        every other row must be untouched, rows in ``gone`` deleted. Counts
        completions and refuses any move out of a terminal state except for
        the rows ``dead retry`` re-queued."""
        before, after = self.rows, self.snapshot()
        for row_id, old in before.items():
            new = after.get(row_id)
            if row_id in gone:
                assert new is None, f"{action}: row {row_id} should have been deleted"
                continue
            assert new is not None, f"{action}: row {row_id} vanished: {old}"
            if row_id in changed:
                changed[row_id](old, new)
            else:
                assert stored(new) == stored(old), (
                    f"{action}: row {row_id} changed although the action had no business "
                    f"with it:\n before {stored(old)}\n after  {stored(new)}"
                )
            if old["status"] in TERMINAL and new["status"] != old["status"]:
                assert row_id in retried and old["status"] in ("failed", "dead") \
                    and new["status"] == "pending", (
                        f"{action}: row {row_id} left terminal state {old['status']} "
                        f"for {new['status']}")
            if new["status"] == "completed" and old["status"] != "completed":
                self.completions[row_id] += 1
        self.rows = after
        return after

    def ready_rows(self, queues: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
        return sorted((r for r in self.rows.values() if r["ready"] and r["queue"] in queues),
                      key=claim_order)

    def holds(self, row_id: int, token: uuid.UUID, states: tuple[str, ...] = HELD) -> bool:
        row = self.rows.get(row_id)
        return row is not None and row["lease_token"] == token and row["status"] in states

    # Set-up and publishing -----------------------------------------------------

    @initialize(jobs=st.lists(st.integers(1, 3), min_size=1, max_size=2),
                plain=st.integers(0, 3), data=st.data())
    def fill(self, jobs: list[int], plain: int, data: st.DataObject) -> None:
        for tasks in jobs:
            owner = str(uuid.uuid4())
            (job_id,) = self.admin.execute(
                queries["insert_job"],
                {"user_id": owner, "job_type": "package", "title": None, "params": Jsonb({})},
            ).fetchone()
            self.jobs[str(job_id)] = owner
            for _ in range(tasks):
                self.publish_one(data, str(job_id))
        for _ in range(plain):
            self.publish_one(data, None)

    def publish_one(self, data: st.DataObject, job_id: str | None) -> None:
        ttl = data.draw(st.sampled_from((None, None, TTL)), label="ttl")
        self.admin.execute(queries["transport_publish"], {
            "exchange": "", "routing_key": data.draw(st.sampled_from(QUEUES), label="queue"),
            "ttl": ttl, "priority": data.draw(st.sampled_from((0, 0, 5, 9)), label="priority"),
            "payload": "{}", "task_type": "sm.task", "task_id": str(uuid.uuid4()),
            "job_id": job_id, "user_id": self.jobs.get(job_id) if job_id else None,
            "max_attempts": data.draw(st.sampled_from((1, 2, 3)), label="max_attempts"),
            "synchronous_commit": None, "store": True, "notify": False, "hand_off": True,
        })
        before = set(self.rows)
        after = self.step("publish", {})
        assert len(set(after) - before) == 1, "one publish stores one row"

    @precondition(lambda self: len(self.rows) < MAX_ROWS)
    @rule(data=st.data(), of_job=st.booleans())
    def publish(self, data: st.DataObject, of_job: bool) -> None:
        job_id = data.draw(st.sampled_from(list(self.jobs))) if of_job else None
        self.publish_one(data, job_id)

    # Workers: claiming -----------------------------------------------------

    def expect_claimed(self, worker: Worker, token: uuid.UUID, lease: int) -> Any:
        def check(old: dict, new: dict) -> None:
            assert old["ready"], f"claimed row {old['id']} was not ready: {old}"
            assert new["status"] == "claimed" and new["lease_token"] == token
            assert new["worker_id"] == worker.name
            assert new["attempts"] == old["attempts"] + 1
            assert new["lease_expires_at"] is not None
            assert new["lease_expires_at"] - new["claimed_at"] == timedelta(seconds=lease)
        return check

    def took(self, worker: Worker, row_ids: list[int], token: uuid.UUID) -> None:
        for row_id in row_ids:
            worker.held[row_id] = token
            job_id = self.rows[row_id]["job_id"]
            if job_id is not None:
                self.started_jobs.add(str(job_id))

    @rule(w=st.integers(0, WORKERS - 1),
          queues=st.lists(st.sampled_from(QUEUES), min_size=1, max_size=2, unique=True),
          batch=st.integers(1, 3), lease=st.sampled_from(LEASES))
    def claim_tasks(self, w: int, queues: list[str], batch: int, lease: int) -> None:
        worker = self.workers[w]
        expected = [r["id"] for r in self.ready_rows(queues)[:batch]]
        rows = worker.conn.execute(
            "SELECT id, lease_token FROM claim_tasks(%s, %s, %s, %s)",
            (worker.name, queues, batch, timedelta(seconds=lease)),
        ).fetchall()
        assert [r[0] for r in rows] == expected, "claim_tasks: not the best ready rows, in order"
        tokens = {r[1] for r in rows}
        assert len(tokens) <= 1, "one lease token per claimed batch"
        token = tokens.pop() if tokens else None
        self.step("claim_tasks", {i: self.expect_claimed(worker, token, lease) for i in expected})
        self.took(worker, expected, token)

    @rule(w=st.integers(0, WORKERS - 1), data=st.data(), queue=st.sampled_from(QUEUES),
          limit=st.integers(0, 3), lease=st.sampled_from(LEASES), delete_acked=st.booleans())
    def transport_claim(self, w: int, data: st.DataObject, queue: str, limit: int,
                        lease: int, delete_acked: bool) -> None:
        """The transport's claim, carrying acks of rows the worker believes it
        holds; with ``delete_acked`` (completed_retention 0) an acked plain
        message's row is deleted, a job's row completed."""
        worker = self.workers[w]
        acks = data.draw(st.lists(st.sampled_from(sorted(worker.held)), unique=True)
                         if worker.held else st.just([]), label="acks")
        tokens = [worker.held[i] for i in acks]
        acked = {i for i, t in zip(acks, tokens, strict=True)
                 if self.holds(i, t, HELD + ("cancelled",))}
        expected = [r["id"] for r in self.ready_rows([queue])[:limit]]
        token = uuid.uuid4()
        rows = worker.conn.execute(queries["transport_claim"], {
            "ack_ids": acks, "ack_tokens": tokens, "worker_id": worker.name,
            "lease_token": token, "lease": timedelta(seconds=lease), "queue": queue,
            "limit": limit, "delete_acked": delete_acked,
        }).fetchall()
        assert sorted(r[1] for r in rows if r[0]) == sorted(expected), "transport_claim: claimed"
        assert {r[1] for r in rows if not r[0]} == acked, "transport_claim: acked"

        def check_ack(old: dict, new: dict) -> None:
            assert new["status"] == ("cancelled" if old["status"] == "cancelled" else "completed")
            assert new["lease_token"] is None and new["lease_expires_at"] is None

        gone = {i for i in acked if delete_acked and self.rows[i]["job_id"] is None
                and self.rows[i]["status"] != "cancelled"}
        changed = {i: check_ack for i in acked - gone}
        changed.update({i: self.expect_claimed(worker, token, lease) for i in expected})
        self.step("transport_claim", changed, gone=gone)
        for row_id in acks:
            del worker.held[row_id]
        self.took(worker, expected, token)

    # Workers: leases --------------------------------------------------------------

    def extended(self, lease: int) -> Any:
        def check(old: dict, new: dict) -> None:
            assert new["status"] == old["status"] and new["lease_token"] == old["lease_token"]
            assert new["lease_expires_at"] - new["last_heartbeat"] == timedelta(seconds=lease)
        return check

    @rule(w=st.integers(0, WORKERS - 1), data=st.data(), by=st.sampled_from(("all", "token", "row")),
          lease=st.sampled_from(LEASES))
    def heartbeat_task(self, w: int, data: st.DataObject, by: str, lease: int) -> None:
        worker = self.workers[w]
        token = row_id = None
        if by != "all" and worker.held:
            row_id = data.draw(st.sampled_from(sorted(worker.held)), label="row")
            if by == "token":
                token, row_id = worker.held[row_id], None
        expected = {i for i, r in self.rows.items()
                    if r["status"] in HELD and r["worker_id"] == worker.name
                    and (token is None or r["lease_token"] == token)
                    and (row_id is None or i == row_id)}
        (count,) = worker.conn.execute(
            "SELECT heartbeat_task(%s, %s, %s, %s)",
            (worker.name, token, row_id, timedelta(seconds=lease)),
        ).fetchone()
        assert count == len(expected), "heartbeat_task: leases extended"
        self.step("heartbeat_task", {i: self.extended(lease) for i in expected})

    @rule(w=st.integers(0, WORKERS - 1), data=st.data(), lease=st.sampled_from(LEASES))
    def transport_renew_leases(self, w: int, data: st.DataObject, lease: int) -> None:
        worker = self.workers[w]
        ids = data.draw(st.lists(st.sampled_from(sorted(worker.held)), unique=True)
                        if worker.held else st.just([]), label="rows")
        tokens = [worker.held[i] for i in ids]
        expected = {i for i, t in zip(ids, tokens, strict=True)
                    if self.holds(i, t, HELD + ("cancelled",))}
        rows = worker.conn.execute(queries["transport_renew_leases"], {
            "ids": ids, "tokens": tokens, "lease": timedelta(seconds=lease),
        }).fetchall()
        assert {r[0] for r in rows} == expected, "transport_renew_leases: renewed"
        self.step("transport_renew_leases", {i: self.extended(lease) for i in expected})

    # Workers: running and settling ---------------------------------------------------
    # A worker settles rows it believes it holds: `settle` picks any belief,
    # `stale_settle` only beliefs the table no longer backs (the lease moved
    # on), so that fencing is tried in most examples, not by luck.

    def beliefs(self, which: str) -> dict[Worker, list[int]]:
        """Per worker, the rows it believes it holds: all of them (``any``),
        those whose lease it still holds (``current``), or the others (``stale``)."""
        found = {}
        for worker in self.workers:
            rows = sorted(i for i, token in worker.held.items()
                          if which == "any" or self.holds(i, token) == (which == "current"))
            if rows:
                found[worker] = rows
        return found

    def pick(self, data: st.DataObject, which: str, batch: bool
             ) -> tuple[Worker, list[tuple[int, uuid.UUID]]]:
        found = self.beliefs(which)
        worker = data.draw(st.sampled_from(list(found)), label="worker")
        rows = data.draw(st.lists(st.sampled_from(found[worker]), min_size=1,
                                  max_size=3 if batch else 1, unique=True), label="rows")
        return worker, [(i, worker.held[i]) for i in rows]

    @precondition(lambda self: self.beliefs("any"))
    @rule(data=st.data(), op=st.sampled_from(SETTLES))
    def settle(self, data: st.DataObject, op: str) -> None:
        worker, picks = self.pick(data, "any", batch=op in BATCH_SETTLES)
        getattr(self, op)(worker, picks, data)

    @precondition(lambda self: self.beliefs("stale"))
    @rule(data=st.data(), op=st.sampled_from(SETTLES))
    def stale_settle(self, data: st.DataObject, op: str) -> None:
        worker, picks = self.pick(data, "stale", batch=op in BATCH_SETTLES)
        getattr(self, op)(worker, picks, data)

    def start_task(self, worker: Worker, picks: list, data: st.DataObject) -> None:
        [(row_id, token)] = picks
        expected = self.holds(row_id, token)
        (started,) = worker.conn.execute(
            "SELECT start_task(%s, %s)", (row_id, token)).fetchone()
        assert started == expected, f"start_task({row_id}) returned {started}"

        def check(old: dict, new: dict) -> None:
            assert new["status"] == "processing" and new["lease_token"] == token
            assert new["started_at"] is not None
        self.step("start_task", {row_id: check} if expected else {})

    def complete_task(self, worker: Worker, picks: list, data: st.DataObject) -> None:
        [(row_id, token)] = picks
        expected = self.holds(row_id, token)
        (done,) = worker.conn.execute(
            "SELECT complete_task(%s, %s, %s)", (row_id, token, Jsonb({"ok": True}))).fetchone()
        assert done == expected, f"complete_task({row_id}) returned {done}"

        def check(old: dict, new: dict) -> None:
            assert new["status"] == "completed" and new["completed_at"] is not None
            assert new["lease_token"] is None and new["lease_expires_at"] is None
        self.step("complete_task", {row_id: check} if expected else {})
        del worker.held[row_id]

    def failed(self, retry: bool, error: str | None) -> Any:
        def check(old: dict, new: dict) -> None:
            again = retry and old["attempts"] < old["max_attempts"]
            assert new["status"] == ("pending" if again else "failed"), (old, new)
            assert new["lease_token"] is None and new["lease_expires_at"] is None
            assert new["worker_id"] is None
            assert new["error"] == (error if error is not None else old["error"])
            if again:
                backoff = BACKOFF * 2 ** (old["attempts"] - 1)
                assert new["visible_at"] - new["updated_at"] == backoff
                assert new["completed_at"] is None
            else:
                assert new["completed_at"] is not None
        return check

    def fail_task(self, worker: Worker, picks: list, data: st.DataObject) -> None:
        [(row_id, token)] = picks
        retry = data.draw(st.booleans(), label="retry")
        error = data.draw(st.sampled_from((None, "boom")), label="error")
        expected = self.holds(row_id, token)
        (status,) = worker.conn.execute(
            "SELECT fail_task(%s, %s, %s, %s, %s)", (row_id, token, error, retry, BACKOFF),
        ).fetchone()
        assert (status is not None) == expected, f"fail_task({row_id}) returned {status}"
        self.step("fail_task", {row_id: self.failed(retry, error)} if expected else {})
        del worker.held[row_id]

    def transport_fail(self, worker: Worker, picks: list, data: st.DataObject) -> None:
        ids, tokens = [i for i, _ in picks], [t for _, t in picks]
        expected = {i for i, t in picks if self.holds(i, t)}
        rows = worker.conn.execute(queries["transport_fail"], {
            "ids": ids, "tokens": tokens, "backoff": BACKOFF,
        }).fetchall()
        assert {r[0] for r in rows if r[1] is not None} == expected, "transport_fail: settled"
        self.step("transport_fail", {i: self.failed(True, None) for i in expected})
        for row_id in ids:
            del worker.held[row_id]

    def transport_requeue(self, worker: Worker, picks: list, data: st.DataObject) -> None:
        refund = data.draw(st.sampled_from((0, 1)), label="refund")
        reason = data.draw(st.sampled_from((None, "the consumer raised ValueError")),
                           label="reason")
        ids, tokens = [i for i, _ in picks], [t for _, t in picks]
        expected = {i for i, t in picks if self.holds(i, t)}
        rows = worker.conn.execute(queries["transport_requeue"], {
            "ids": ids, "tokens": tokens, "refund": refund, "error": reason,
        }).fetchall()
        assert {r[0] for r in rows} == expected, "transport_requeue: requeued"

        def check(old: dict, new: dict) -> None:
            again = old["attempts"] - refund < old["max_attempts"]
            assert new["status"] == ("pending" if again else "dead"), (old, new)
            assert new["attempts"] == max(old["attempts"] - refund, 0)
            assert new["lease_token"] is None and new["worker_id"] is None
            if reason is not None:  # the reason stays on the row, dead or not
                assert reason in new["error"], (old, new)
            if not again:
                assert new["error"].startswith("requeued after"), (old, new)
        self.step("transport_requeue", {i: check for i in expected})
        for row_id in ids:
            del worker.held[row_id]

    # The worker app's bookkeeping (tasks.lifecycle), fenced by lease token ----------

    def cancel_held_task(self, worker: Worker, picks: list, data: st.DataObject) -> None:
        """The worker skips a task of a cancelled job and ends it cancelled."""
        [(row_id, token)] = picks
        expected = (self.holds(row_id, token) and self.rows[row_id]["job_id"] is not None
                    and str(self.rows[row_id]["job_id"]) in self.cancelled_jobs)
        done = job_api.cancel_held_task(worker.conn, (row_id, token))
        assert done == expected, f"cancel_held_task({row_id}) returned {done}"

        def check(old: dict, new: dict) -> None:
            assert new["status"] == "cancelled" and new["lease_token"] == token
        self.step("cancel_held_task", {row_id: check} if expected else {})

    def mark_task_processing(self, worker: Worker, picks: list, data: st.DataObject) -> None:
        [(row_id, token)] = picks
        self.bookkeeping(worker, row_id, token, "mark_task_processing", {},
                         lambda old, new: new["status"] == "processing")

    def record_task_error(self, worker: Worker, picks: list, data: st.DataObject) -> None:
        [(row_id, token)] = picks
        self.bookkeeping(worker, row_id, token, "record_task_error", {"error": "raised"},
                         lambda old, new: new["status"] == old["status"]
                         and new["error"] == "raised")

    def bookkeeping(self, worker: Worker, row_id: int, token: uuid.UUID, query: str,
                    params: dict, expect: Any) -> None:
        expected = self.holds(row_id, token)
        changed = worker.conn.execute(
            queries[query], {"id": row_id, "lease_token": token, **params}).rowcount
        assert changed == int(expected), f"{query}({row_id}) changed {changed} rows"

        def check(old: dict, new: dict) -> None:
            assert expect(old, new) and new["lease_token"] == token, (query, old, new)
        self.step(query, {row_id: check} if expected else {})

    # The operator -------------------------------------------------------------

    @rule(data=st.data())
    def cancel_job(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(list(self.jobs)), label="job")
        (status,) = self.admin.execute(
            "SELECT status FROM jobs WHERE id = %s", (job_id,)).fetchone()
        expected = {i for i, r in self.rows.items()
                    if str(r["job_id"]) == job_id and r["status"] == "pending"}
        cancellable = status in ("pending", "processing", "cancelled")
        cancelled = job_api.cancel_job(self.admin, job_id)
        if not cancellable:
            assert cancelled is None, f"cancel_job of a {status} job cancelled {cancelled} tasks"
            expected = set()
        else:
            assert cancelled == len(expected), "cancel_job: pending tasks cancelled"
            self.cancelled_jobs.add(job_id)

        def check(old: dict, new: dict) -> None:
            assert new["status"] == "cancelled" and new["completed_at"] is not None
        self.step("cancel_job", {i: check for i in expected})

    @rule()
    def reclaim_stale_tasks(self) -> None:
        stale = {i for i, r in self.rows.items() if r["status"] in HELD and r["lease_expired"]}
        expired = {i for i, r in self.rows.items()
                   if r["status"] == "pending" and r["ttl_expired"]}
        gone = {i for i in stale | expired
                if self.rows[i]["job_id"] is None and self.rows[i]["ttl_expired"]
                and self.rows[i]["attempts"] < self.rows[i]["max_attempts"]}
        (count,) = self.admin.execute("SELECT reclaim_stale_tasks()").fetchone()
        assert count == len(stale), "reclaim_stale_tasks: leases reclaimed"

        def check(old: dict, new: dict) -> None:
            assert new["lease_token"] is None and new["worker_id"] is None
            if old["status"] == "pending":
                assert new["status"] == "dead", "a job task past its TTL is dead"
            elif old["attempts"] >= old["max_attempts"]:
                assert new["status"] == "dead", "a lease lost on the last delivery is dead"
            elif old["job_id"] is not None and old["ttl_expired"]:
                assert new["status"] == "dead", "a job task past its TTL is dead"
            else:
                assert new["status"] == "pending" and new["completed_at"] is None
        self.step("reclaim_stale_tasks",
                  {i: check for i in (stale | expired) - gone}, gone=gone)

    @rule(data=st.data(), everything=st.booleans(), by_task_id=st.booleans())
    def retry_dead_tasks(self, data: st.DataObject, everything: bool, by_task_id: bool) -> None:
        dead = sorted(i for i, r in self.rows.items() if r["status"] in ("failed", "dead"))
        chosen = dead if everything else data.draw(
            st.lists(st.sampled_from(dead), unique=True) if dead else st.just([]), label="rows")
        ids = None if everything else [
            self.rows[i]["task_id"] if by_task_id else str(i) for i in chosen]
        with self.admin.transaction():
            rows = self.admin.execute(queries["retry_dead_tasks"], {"ids": ids}).fetchall()
        assert {r[0] for r in rows} == set(chosen), "dead retry: re-queued"

        def check(old: dict, new: dict) -> None:
            assert new["status"] == "pending" and new["attempts"] == 0
            assert new["error"] is None and new["completed_at"] is None
            assert new["lease_token"] is None
        self.step("retry_dead_tasks", {i: check for i in chosen}, retried=set(chosen))

    @rule(seconds=st.sampled_from(TIME_STEPS))
    def time_passes(self, seconds: int) -> None:
        """Every future moment of the table comes ``seconds`` nearer."""
        self.admin.execute(
            "UPDATE job_tasks SET lease_expires_at = lease_expires_at - %(step)s,"
            " visible_at = visible_at - %(step)s, expires_at = expires_at - %(step)s",
            {"step": timedelta(seconds=seconds)},
        )
        self.rows = self.snapshot()

    @rule(w=st.integers(0, WORKERS - 1))
    def worker_stalls(self, w: int) -> None:
        """One worker stops renewing (a long pause) while the others renew
        theirs: its leases expire and the watchdog of a live worker reclaims
        them. The worker itself still believes it holds them."""
        self.admin.execute(
            "UPDATE job_tasks SET lease_expires_at = now() - interval '1 second'"
            " WHERE worker_id = %s AND status IN ('claimed', 'processing')",
            (self.workers[w].name,),
        )
        self.rows = self.snapshot()
        self.reclaim_stale_tasks()

    # Invariants ------------------------------------------------------------------------

    @invariant()
    def held_rows_have_a_lease(self) -> None:
        for row in self.rows.values():
            if row["status"] in HELD:
                assert row["lease_token"] is not None and row["lease_expires_at"] is not None \
                    and row["worker_id"] is not None, f"held without a lease: {row}"
            assert row["attempts"] <= row["max_attempts"], f"delivered too often: {row}"
            if row["status"] == "pending":
                assert row["attempts"] < row["max_attempts"], f"pending, no attempt left: {row}"
                assert row["lease_token"] is None, f"pending with a lease: {row}"

    @invariant()
    def completed_at_most_once(self) -> None:
        twice = {i: n for i, n in self.completions.items() if n > 1}
        assert not twice, f"rows completed more than once: {twice}"

    @invariant()
    def jobs_match_their_rows(self) -> None:
        with self.admin.cursor(row_factory=dict_row) as cur:
            jobs = {str(j["id"]): j for j in cur.execute("SELECT * FROM jobs")}
        for job_id, job in jobs.items():
            rows = [r for r in self.rows.values() if str(r["job_id"]) == job_id]
            total = len(rows)
            completed = sum(r["status"] == "completed" for r in rows)
            failed = sum(r["status"] in ("failed", "dead") for r in rows)
            cancelled = sum(r["status"] == "cancelled" for r in rows)
            finished = completed + failed + cancelled
            if job_id in self.cancelled_jobs:
                status = "cancelled"
            elif completed == total:
                status = "completed"
            elif finished == total:
                status = "failed" if failed else "cancelled"
            else:
                status = "processing" if job_id in self.started_jobs else "pending"
            expected = {
                "total_tasks": total, "completed_tasks": completed, "failed_tasks": failed,
                "cancelled_tasks": cancelled, "status": status,
                "progress": (Decimal(100 * finished) / total).quantize(CENT, ROUND_HALF_UP),
                "started": job_id in self.started_jobs,
                "finished": status in ("completed", "failed", "cancelled"),
            }
            actual = {key: job[key] for key in expected if key in job}
            actual["started"] = job["started_at"] is not None
            actual["finished"] = job["completed_at"] is not None
            assert actual == expected, f"job {job_id} disagrees with its rows"


@pytest.fixture
def machine_connections(database_url: str):
    conns = [psycopg.connect(database_url, autocommit=True) for _ in range(WORKERS + 1)]
    try:
        yield conns
    finally:
        for conn in conns:
            conn.close()


def test_task_life_cycle_state_machine(machine_connections):
    admin, *workers = machine_connections
    run_state_machine_as_test(
        lambda: TaskLifeCycle(admin, workers),
        settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
