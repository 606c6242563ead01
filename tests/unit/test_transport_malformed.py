"""``malformed()``: the check every claimed row passes before a consumer sees
it. It never raises, and what it lets through kombu can read."""

from __future__ import annotations

import kombu
import pytest
from hypothesis import given, settings
from poison_support import json_values, near_misses

from pg_broker.transport.messages import failure_reason, malformed


@pytest.fixture(scope="module")
def channel():
    """A kombu virtual channel with no broker behind it (the in-memory transport)."""
    with kombu.Connection("memory://") as conn:
        yield conn.default_channel


@settings(max_examples=300, deadline=None)
@given(payload=json_values | near_misses())
def test_any_json_is_judged_without_raising_and_what_passes_kombu_can_read(channel, payload):
    problem = malformed(payload)
    if problem is None:
        payload["properties"]["delivery_tag"] = "1:x"
        message = channel.Message(payload, channel=channel)  # VB Message.__init__
        assert message.delivery_tag == "1:x"
    else:
        # The reason names fields and JSON types, never what the payload holds.
        assert not [text for text in strings(payload) if text in problem], problem


# The words a reason may share with a payload: its field names and type names.
VOCABULARY = {"body", "content-type", "content-encoding", "headers", "properties",
              "body_encoding", "delivery_info", "utf-8", "base64", "object", "string",
              "number", "array", "boolean", "null", "payload"}


def strings(value) -> list[str]:
    """Every string of a JSON value (keys too) of 6 characters or more, but
    the envelope's own words."""
    if isinstance(value, str):
        return [value] if len(value) >= 6 and value not in VOCABULARY else []
    if isinstance(value, list):
        return [text for item in value for text in strings(item)]
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in strings(key) + strings(item)]
    return []


@pytest.mark.parametrize("body_encoding, body", [("base64", "@@@"), ("BASE64", "eA=="),
                                                  ("rot13", "x"), (5, "x")])
def test_a_body_kombu_cannot_decode_is_malformed(body_encoding, body):
    assert malformed({"properties": {"body_encoding": body_encoding}, "body": body})


def test_the_reason_of_a_chained_exception_names_each_and_is_bounded():
    try:
        try:
            raise SystemExit(3)
        except SystemExit:
            raise TypeError("cannot unpack\nDETAIL: Failing row contains (secret)") from None
    except TypeError as exc:
        assert failure_reason(exc) == "TypeError: cannot unpack"
    try:
        try:
            raise SystemExit(3)
        except SystemExit as inner:
            raise ValueError("x" * 1000) from inner
    except ValueError as exc:
        reason = failure_reason(exc)
    assert reason.endswith("…") and len(reason) == 500
