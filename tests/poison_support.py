"""Rows of any shape for the poison-message tests (tests/integration/
test_transport_poison.py, tests/e2e/test_celery_poison.py): written straight
into the message tables, as any SQL client could, and the Hypothesis
strategies that make them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence

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
# Paths into a Kombu envelope a near miss breaks.
ENVELOPE_FIELDS = (("body",), ("content-type",), ("content-encoding",), ("headers",),
                   ("properties",), ("properties", "body_encoding"),
                   ("properties", "delivery_info"), ("properties", "priority"),
                   ("properties", "delivery_tag"), ("headers", "compression"))


@st.composite
def near_misses(draw, template: Callable[[], dict] = lambda: envelope("near miss"),
                fields: Sequence[tuple[str, ...]] = ENVELOPE_FIELDS) -> dict:
    """A good message (``template()``) with one field of the wrong type, or gone."""
    payload = template()
    path = draw(st.sampled_from(fields))
    target = payload
    for key in path[:-1]:
        target = target[key]
    if draw(st.booleans()) and draw(st.booleans()):
        target.pop(path[-1], None)
    else:
        target[path[-1]] = draw(json_values)
    return payload
