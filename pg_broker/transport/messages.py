"""What a message is to the transport, without a database: the row a publish
stores (and what the database would refuse, checked first), the delivery tag
that names a held row and its lease, and whether a stored payload is a Kombu
message at all.

Pure functions, so that the unit tier tests them; the statements that store
and claim these rows are :mod:`.store`'s.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from datetime import timedelta
from functools import partial
from typing import NamedTuple

from kombu.exceptions import ChannelError
from kombu.utils import json as kombu_json

from pg_broker.masking import first_line

TRANSIENT_TAG_PREFIX = "transient:"
# The longest reason (characters) a row's error or a log line gets for an
# exception a consumer raised.
REASON_LENGTH = 500
# What job_tasks accepts (migrations/002): queue names of 1 to 1024
# characters, max_attempts a positive integer.
MAX_QUEUE_NAME = 1024
MAX_INT = 2**31 - 1
# A NUL character in a JSON string (escaped by the encoder): jsonb refuses it.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

# kombu's JSON (as its Redis transport stores messages): datetimes, UUIDs,
# decimals and bytes in headers survive the round trip through jsonb.
dumps = partial(kombu_json.dumps, separators=(",", ":"))


# Delivery tags -------------------------------------------------------------------


def delivery_tag(row_id: int, lease_token: uuid.UUID) -> str:
    return f"{row_id}:{lease_token.hex}"


def held_row(tag: object) -> tuple[int, uuid.UUID] | None:
    """(row id, lease token) of a durable delivery tag; None for others."""
    if not isinstance(tag, str) or tag.startswith(TRANSIENT_TAG_PREFIX):
        return None
    row_id, _, token = tag.partition(":")
    try:
        return int(row_id), uuid.UUID(token)
    except ValueError:
        return None


class HandOff(NamedTuple):
    """A row a publish inserted already claimed for a waiting consumer, as
    its notification names it (migrations/core/220)."""

    queue: str
    id: int
    token: uuid.UUID
    message: dict | None  # the Kombu message; None: too large for NOTIFY, read it by id


def hand_off(payload: str) -> HandOff | None:
    """The hand-off a notification's payload carries; None when it is none
    (a plain wake-up, or anything else a client sent on the channel)."""
    if not payload.startswith("{"):
        return None
    try:
        note = kombu_json.loads(payload)
        return HandOff(str(note["q"]), int(note["id"]), uuid.UUID(note["t"]), note.get("m"))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def label(tag: str) -> str:
    """A delivery tag as a log line names it: the row and its table."""
    if tag.startswith(TRANSIENT_TAG_PREFIX):
        return f"broker_transient_messages row {tag.removeprefix(TRANSIENT_TAG_PREFIX)}"
    return f"job_tasks row {tag.partition(':')[0]}"


# Stored payloads -----------------------------------------------------------------

# Envelope fields a consumer reads as text: (field, where), where is the
# payload itself or its properties.
_TEXT_FIELDS = (("content-type", "payload"), ("content-encoding", "payload"),
                ("body", "payload"), ("body_encoding", "properties"))


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages that must not quote it."""
    for kind, name in ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"),
                       (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def malformed(payload: object) -> str | None:
    """Why a stored payload is no Kombu message, or None if it is one.

    A row anyone inserted (SQL, another client, a bug) can hold any JSON;
    what kombu's ``Message`` and the consumers after it read must have the
    types kombu writes (VB ``Message.__init__``, ``Channel.decode_body``),
    or the consumer raises on it. Never raises; the reason names fields and
    JSON types, never values from the payload.
    """
    if not isinstance(payload, dict):
        return f"payload is a JSON {_json_type(payload)}, not a Kombu message"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "payload has no properties object"
    info = properties.get("delivery_info", {})
    if not isinstance(info, dict):
        return f"properties.delivery_info is a JSON {_json_type(info)}, not an object"
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return f"headers is a JSON {_json_type(headers)}, not an object"
    for field, where in _TEXT_FIELDS:
        value = (payload if where == "payload" else properties).get(field)
        if value is not None and not isinstance(value, str):
            name = field if where == "payload" else f"{where}.{field}"
            return f"{name} is a JSON {_json_type(value)}, not a string"
    body = payload.get("body")
    encoding = properties.get("body_encoding")
    if body and encoding and encoding.lower() != "utf-8":
        if encoding != "base64":
            return "properties.body_encoding is neither utf-8 nor base64"
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not valid base64"
    return None


def failure_reason(exc: BaseException) -> str:
    """An exception a consumer raised, for the row's error and the log: each
    exception of the chain as "Type: primary message", at most REASON_LENGTH
    characters."""
    parts = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = first_line(exc)
        name = type(exc).__name__
        parts.append(name if text == name else f"{name}: {text}")
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    text = ", raised while handling ".join(parts)
    return text if len(text) <= REASON_LENGTH else text[:REASON_LENGTH - 1] + "…"


# Publishing ----------------------------------------------------------------------


def publish_params(message: dict, exchange: str, routing_key: str, priority: int,
                   max_message_size: int) -> dict:
    """The parameters of ``transport_publish`` for one message; ChannelError
    for what the transport refuses before any database sees it."""
    data = dumps(message)
    if len(data) > max_message_size:
        raise ChannelError(
            f"message of {len(data)} bytes exceeds max_message_size "
            f"({max_message_size}); store large payloads elsewhere and send a reference"
        )
    headers = message.get("headers") or {}
    properties = message["properties"]
    if not exchange and len(routing_key) > MAX_QUEUE_NAME:
        raise ChannelError(f"message refused: a queue name has at most {MAX_QUEUE_NAME} "
                           f"characters, not {len(routing_key)}")
    return {
        "exchange": exchange,
        "routing_key": routing_key,
        "ttl": None if _revoked_by_worker(headers) else milliseconds(
            properties.get("expiration")),
        "priority": priority,
        "payload": data,
        "task_type": _text(headers.get("task")),
        "task_id": _text(headers.get("id")),
        "job_id": _uuid_header(headers, "job_id"),
        "user_id": _uuid_header(headers, "user_id"),
        "max_attempts": _max_attempts(headers),
        "synchronous_commit": None,
        "store": True,
        "notify": True,
        # A waiting consumer may get it claimed (migrations/core/220); not
        # in a caller's transaction (see .store.Store.publish_in).
        "hand_off": True,
    }


def refuse_unstorable(params: dict) -> None:
    """ChannelError for what the database would refuse in a payload, for a
    publish whose refusal would come too late for its caller (pipelined)."""
    payload = params["payload"]
    if "\\u0000" in payload and _JSON_NUL.search(payload):  # the regex only where it may match
        raise ChannelError("message refused: PostgreSQL's jsonb cannot store "
                           "the NUL character (\\u0000) it contains")


def milliseconds(value: object) -> timedelta | None:
    if value in (None, ""):
        return None
    try:
        return timedelta(milliseconds=float(value))
    except (TypeError, ValueError):
        return None


def _revoked_by_worker(headers: dict) -> bool:
    """Whether the broker must deliver this message even past its TTL.

    Celery turns ``apply_async(expires=...)`` into both the ``expires`` header
    and the ``expiration`` property. A worker that receives an expired task
    revokes it (``Request.revoked()``), which stores REVOKED in the result
    backend, whichever it is: a caller waiting on the result hears that the
    task expired, as with Redis as broker. Dropped by the broker instead, the
    task's result would stay PENDING forever. So a Celery task message with
    that header is stored without a TTL (a queue's ``x-message-ttl`` still
    applies). A job's task keeps its TTL: the job model marks it dead when it
    expires (reclaim_stale_tasks()), and that is its job's outcome.
    """
    return (headers.get("expires") is not None and headers.get("task") is not None
            and headers.get("id") is not None and not headers.get("job_id"))


def _uuid_header(headers: dict, key: str) -> str | None:
    """A header stored in a uuid column, checked as the database would."""
    value = headers.get(key)
    if value is None:
        return None
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ChannelError(
            f"message refused: header {key} is not a UUID: {str(value)[:40]!r}"
        ) from None


def _max_attempts(headers: dict) -> int | None:
    """The ``max_attempts`` header: a whole number of deliveries, at least 1."""
    value = headers.get("max_attempts")
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INT:
        raise ChannelError(
            f"message refused: header max_attempts must be a whole number from 1 to "
            f"{MAX_INT}, not {str(value)[:40]!r}"
        )
    return value


def _text(value: object) -> str | None:
    return None if value is None else str(value)
