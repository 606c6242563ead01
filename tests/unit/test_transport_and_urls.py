"""The transport's pure logic and the URL converters: delivery tags, option
parsing, what a pipelined publish refuses, how a kombu Connection names its
database, and a database's broker and result backend URLs."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import kombu
import pytest
from psycopg.conninfo import conninfo_to_dict

from pg_broker.transport.connections import conninfo
from pg_broker.transport.messages import (
    _JSON_NUL,
    TRANSIENT_TAG_PREFIX,
    delivery_tag,
    held_row,
    milliseconds,
)
from pg_broker.transport.options import flag
from pg_broker.transport.store import text_value
from pg_broker.urls import broker_url, libpq_url, masked_url, result_backend_url


def test_a_delivery_tag_names_its_row_and_lease_and_parses_back() -> None:
    token = uuid.uuid4()
    tag = delivery_tag(42, token)
    assert tag == f"42:{token.hex}"
    assert held_row(tag) == (42, token)


@pytest.mark.parametrize("tag", [
    f"{TRANSIENT_TAG_PREFIX}17",  # a transient message holds no row
    "17",
    "17:not-a-token",
    "x:" + uuid.uuid4().hex,
    17,
    None,
])
def test_tags_that_hold_no_row_parse_to_none(tag: object) -> None:
    assert held_row(tag) is None


@pytest.mark.parametrize(("value", "expected"), [
    (1500, timedelta(milliseconds=1500)),
    ("250", timedelta(milliseconds=250)),
    (0.5, timedelta(microseconds=500)),
    (None, None),
    ("", None),
    ("soon", None),
    ([1], None),
])
def test_ttl_arguments_in_milliseconds(value: object, expected: timedelta | None) -> None:
    assert milliseconds(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False), (0, False), (1, True),
    ("false", False), ("0", False), ("no", False), ("off", False), ("", False), (" False ", False),
    ("true", True), ("1", True), ("yes", True),
])
def test_boolean_options_from_urls_and_environment(value: object, expected: bool) -> None:
    assert flag(value) is expected


@pytest.mark.parametrize(("text", "refused"), [
    ("a\x00b", True),       # a NUL character
    ("\\u0000", False),      # a backslash, then the letters u0000
    ("\\\x00", True),        # a backslash, then a NUL
    ("plain", False),
])
def test_a_nul_character_is_found_in_the_json_and_an_escaped_backslash_is_not(
    text: str, refused: bool,
) -> None:
    encoded = json.dumps({"body": text})
    assert bool(_JSON_NUL.search(encoded)) is refused


def test_parameters_sent_as_text_include_arrays_of_ids_and_lease_tokens() -> None:
    # The claim's acks go through libpq as text: bigint[] and uuid[] literals.
    token = uuid.UUID("8d8ac610-566d-4ef0-9c22-186b2a5ed793")
    assert text_value([1, 22]) == b"{1,22}"
    assert text_value([token]) == b"{8d8ac610-566d-4ef0-9c22-186b2a5ed793}"
    assert text_value([]) == b"{}"
    assert text_value(timedelta(seconds=90)) == b"90.0 seconds"
    assert text_value(False) == b"false"


def test_a_pgbroker_url_is_the_same_libpq_url_with_every_parameter() -> None:
    url = "pgbroker://u:p%40ss@db.example:5433/jobs?sslmode=require&application_name=w"
    assert libpq_url(url) == "postgresql://u:p%40ss@db.example:5433/jobs?sslmode=require&application_name=w"


def test_a_bare_pgbroker_url_means_the_configured_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_BROKER_URL", "postgresql://broker@db.example/broker")
    assert libpq_url("pgbroker://") == "postgresql://broker@db.example/broker"


def test_a_broker_url_is_shown_under_its_scheme_without_the_password() -> None:
    assert masked_url("postgresql://u:secret@h:5432/db?sslmode=require") == (
        "pgbroker://u:**@h:5432/db?sslmode=require")
    with kombu.Connection("pgbroker://u:secret@h/db") as connection:
        assert connection.as_uri() == "pgbroker://u:**@h/db"
        assert "secret" in connection.as_uri(include_password=True)


def test_a_connection_given_as_fields_keeps_a_password_with_url_characters() -> None:
    with kombu.Connection(hostname="db.example", userid="app", password="p@ss:w/rd",
                          port=5433, virtual_host="/jobs", transport="pgbroker") as connection:
        params = conninfo_to_dict(conninfo(connection))
    assert params == {"host": "db.example", "port": "5433", "user": "app",
                      "password": "p@ss:w/rd", "dbname": "jobs"}


@pytest.mark.parametrize(("conninfo", "broker"), [
    ("postgresql://u:pw@h:5432/db?sslmode=require", "pgbroker://u:pw@h:5432/db?sslmode=require"),
    ("postgres:///db?host=/run/pg", "pgbroker:///db?host=/run/pg"),
    ("host=/run/pg user=app dbname=jobs options='-c search_path=broker'",
     "pgbroker://?user=app&dbname=jobs&host=%2Frun%2Fpg&options=-c%20search_path%3Dbroker"),
])
def test_a_database_in_either_libpq_form_has_a_broker_url_naming_the_same_database(
    conninfo: str, broker: str,
) -> None:
    assert broker_url(conninfo) == broker
    assert conninfo_to_dict(libpq_url(broker)) == conninfo_to_dict(conninfo)


def test_a_broker_url_without_a_host_keeps_its_socket_directory() -> None:
    assert libpq_url("pgbroker:///jobs?host=/run/pg") == "postgresql:///jobs?host=/run/pg"
    assert masked_url("postgresql:///jobs?host=/run/pg&password=pw") == (
        "pgbroker:///jobs?host=/run/pg&password=**")
    assert masked_url("pgbroker://") == "pgbroker://"


@pytest.mark.parametrize(("conninfo", "expected"), [
    ("postgresql://postgres:@/pg_broker?host=/srv/pgdata",
     "db+postgresql+psycopg://postgres@/pg_broker?host=%2Fsrv%2Fpgdata"),
    ("host=db user=app password=p@ss dbname=jobs port=5433 sslmode=require",
     "db+postgresql+psycopg://app:p%40ss@db:5433/jobs?sslmode=require"),
    ("postgres://app@h1:5432,h2:5432/jobs",
     "db+postgresql+psycopg://app@/jobs?host=h1%2Ch2&port=5432%2C5432"),
])
def test_the_result_backend_url_is_derived_from_any_libpq_conninfo(
    conninfo: str, expected: str,
) -> None:
    assert result_backend_url(conninfo) == expected
