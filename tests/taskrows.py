"""Test helpers that put job_tasks rows in place and move them through the SQL
functions of the core schema (migrations/core/), the way a worker would."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pg_broker.queries import queries


def add_tasks(conn: psycopg.Connection, count: int = 1, queue: str = "default",
              **columns: Any) -> list[int]:
    """Insert `count` pending rows of `queue`, any other column given by name
    (JSON-able values, the same for every row); return their ids in order."""
    columns = {"queue": queue, "payload": {}, **columns}
    query = sql.SQL(
        "INSERT INTO job_tasks ({names}) SELECT {fields} FROM generate_series(1, %s),"
        " jsonb_populate_record(NULL::job_tasks, %s) AS r ORDER BY generate_series RETURNING id"
    ).format(
        names=sql.SQL(", ").join(sql.Identifier(n) for n in columns),
        fields=sql.SQL(", ").join(sql.Identifier("r", n) for n in columns),
    )
    rows = conn.execute(query, (count, Jsonb(columns))).fetchall()
    return sorted(r[0] for r in rows)


def claim(conn: psycopg.Connection, worker: str = "worker-1",
          queues: Sequence[str] = ("default",), batch: int = 1,
          lease: str = "5 minutes") -> list[dict[str, Any]]:
    """claim_tasks() as a worker calls it; the claimed rows as dicts, in the
    order the function returns them."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT * FROM claim_tasks(%s, %s, %s, %s::interval)",
            (worker, list(queues), batch, lease),
        ).fetchall()


def ack_and_claim(conn: psycopg.Connection, acks: Sequence[tuple[int, uuid.UUID]],
                  queue: str = "", limit: int = 0, worker: str = "worker-1",
                  delete_acked: bool = True) -> tuple[list[int], list[int], uuid.UUID]:
    """The transport's statement (transport_claim): ack held (row id, lease
    token) pairs (an acked plain message deleted unless ``delete_acked`` is
    false, as the transport does by default) and claim up to `limit` rows of
    `queue`; returns (ids claimed, ids acked, the lease token of the claim)."""
    token = uuid.uuid4()
    rows = conn.execute(queries["transport_claim"], {
        "ack_ids": [i for i, _ in acks], "ack_tokens": [t for _, t in acks],
        "delete_acked": delete_acked,
        "worker_id": worker, "lease_token": token, "lease": "5 minutes",
        "queue": queue, "limit": limit,
    }).fetchall()
    return [r[1] for r in rows if r[0]], [r[1] for r in rows if not r[0]], token


def task(conn: psycopg.Connection, task_id: int) -> dict[str, Any]:
    """The row as it is now."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM job_tasks WHERE id = %s", (task_id,)).fetchone()


def add_job(conn: psycopg.Connection, user_id: str | None = None) -> str:
    """A new job row; its id as text."""
    (job_id,) = conn.execute(
        "INSERT INTO jobs (user_id) VALUES (%s) RETURNING id::text", (user_id,)
    ).fetchone()
    return job_id


def job(conn: psycopg.Connection, job_id: str) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
