"""Rows of any shape for the poison-message tests (tests/integration/
test_transport_poison.py, tests/e2e/test_celery_poison.py): written straight
into the message tables, as any SQL client could, and the Hypothesis
strategies that make them."""

from __future__ import annotations

import json
import uuid

import psycopg
from hypothesis import strategies as st
from psycopg.types.json import Jsonb


def insert_row(db: psycopg.Connection, table: str, queue: str, payload) -> int:
    """A row written straight into a message table, as any SQL client could."""
    query = {
        "job_tasks": "INSERT INTO job_tasks (queue, payload) VALUES (%s, %s) RETURNING id",
        "broker_transient_messages":
            "INSERT INTO broker_transient_messages (queue, payload) VALUES (%s, %s) RETURNING id",
    }[table]
    return db.execute(query, (queue, Jsonb(payload))).fetchone()[0]


def envelope(body: str, queue: str = "") -> dict:
    """A Kombu message as the transport stores it: a JSON string body, utf-8."""
    return {
        "body": json.dumps(body), "content-encoding": "utf-8",
        "content-type": "application/json", "headers": {},
        "properties": {"body_encoding": "utf-8", "delivery_mode": 2, "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": queue},
                       "delivery_tag": str(uuid.uuid4())},
    }


# Any JSON PostgreSQL's jsonb stores (no NUL, no lone surrogate), huge strings included.
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=20)
huge = st.integers(1_000, 1_000_000).map(lambda n: "A" * n)
scalars = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
           | st.floats(allow_nan=False, allow_infinity=False) | text | huge)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
