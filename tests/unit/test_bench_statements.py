"""The bench names each statement pg_stat_statements reports by its queries.sql
name, and turns two readings into per-task costs (no database: the texts are
as pg_stat_statements normalises them)."""

from __future__ import annotations

import re

from bench.brokers import statement_costs
from pg_broker.queries import queries

CLAIM = ("WITH ready AS MATERIALIZED ( SELECT id FROM job_tasks WHERE status = $9 AND "
         "queue = $1 AND visible_at <= now()")


def _reading(calls: int, exec_ms: float, plan_ms: float, query: str) -> dict:
    return {"query": query, "calls": calls, "exec_ms": exec_ms, "plan_ms": plan_ms}


def test_statement_costs_are_per_task_and_named_from_queries_sql() -> None:
    # pg_stat_statements replaces parameters and constants by $n.
    claim = re.sub(r"%\(\w+\)s", "$1", queries["transport_claim"]).replace("'pending'", "$9")
    before = {1: _reading(10, 5.0, 2.0, claim), 2: _reading(3, 1.0, 0.0, "SELECT 1")}
    after = {1: _reading(60, 30.0, 12.0, claim), 2: _reading(3, 1.0, 0.0, "SELECT 1"),
             3: _reading(100, 50.0, 1.0, "SELECT something else")}
    costs = statement_costs(before, after, tasks=100)
    assert [c["statement"] for c in costs] == ["SELECT something else", "transport_claim"]
    claimed = costs[1]
    assert claimed["calls_per_task"] == 0.5
    assert claimed["exec_ms_per_task"] == 0.25 and claimed["plan_ms_per_task"] == 0.1
    assert claimed["exec_ms_per_call"] == 0.5 and claimed["plan_ms_per_call"] == 0.2


def test_unknown_statements_keep_their_first_words() -> None:
    costs = statement_costs({}, {7: _reading(1, 1.0, 0.0, CLAIM + " something new")}, tasks=1)
    assert costs[0]["statement"] == " ".join(CLAIM.split())[:60].replace("$9", "?").replace(
        "$1", "?")
