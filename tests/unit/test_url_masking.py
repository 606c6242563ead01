"""Passwords never leave in what pg_broker shows of a database URL, however
malformed the URL: the masked URL, the broker URL kombu and Celery print,
and the messages of libpq that quote a URL or a piece of it."""

from __future__ import annotations

import kombu
import psycopg
import pytest
from hostile_urls import HOSTILE, hidden
from psycopg.conninfo import conninfo_to_dict

from pg_broker.masking import mask_url, redact, redacting, url_problem
from pg_broker.urls import libpq_url, masked_url


@pytest.mark.parametrize("url", HOSTILE)
def test_a_hostile_url_is_masked_whole_and_never_raises(url: str) -> None:
    assert hidden(mask_url(url))
    assert hidden(masked_url(url))
    assert "127.0.0.1" in mask_url(url) or "[::1" in mask_url(url)


@pytest.mark.parametrize("url", HOSTILE)
def test_what_libpq_says_of_a_hostile_url_is_redacted(url: str) -> None:
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        assert hidden(redact(str(exc), url))
    assert hidden(redact(f"could not connect to {url}: failed", url))


@pytest.mark.parametrize("url", [u for u in HOSTILE if "://" in u])
def test_kombu_and_celery_show_a_hostile_broker_url_masked(url: str) -> None:
    broker_url = "pgbroker://" + url.split("://", 1)[1]
    assert libpq_url(broker_url) == url
    try:
        connection = kombu.Connection(broker_url)
    except ValueError as exc:  # kombu's own urlparse: an unclosed [ of an IPv6 host
        assert hidden(str(exc))
        return
    with connection:
        assert hidden(connection.as_uri())
        assert hidden(repr(connection))


@pytest.mark.parametrize("url", [
    "postgresql://root:SeKrit%zzPaSS99@127.0.0.1:1/x",
    "postgresql://root:SeKrit/PaSS99@127.0.0.1:1/x",
    "postgresql://root:SeKritPaSS99@[::1/x",
    "postgresql://root:SeKrit@PaSS99@127.0.0.1:1/x",
    "host=127.0.0.1 password='SeKrit PaSS99",
])
def test_a_url_libpq_cannot_read_as_written_is_named_a_problem(url: str) -> None:
    problem = url_problem(url)
    assert problem and hidden(problem)
    if "://" in url:
        assert "percent-encode" in problem


@pytest.mark.parametrize("url", [
    "postgresql://u:p%40ss%2Fw@h1:1,h2:2/db?sslmode=require",
    "postgresql://u:pw@h:5432/db?application_name=celery@worker-1",
    "postgresql://root:pw?with#these[chars@h/db",  # libpq reads them as written
    "postgresql://postgres:@/pg_broker?host=/tmp/x",
    "postgresql://u@h/db",
    "host=h user=u password='p w' dbname=d",
])
def test_a_well_formed_url_has_no_problem(url: str) -> None:
    assert url_problem(url) is None


@pytest.mark.parametrize(("url", "masked"), [
    ("postgresql://u:pw@h:5432/db?password=x&sslpassword=y&sslmode=require",
     "postgresql://u:***@h:5432/db?password=***&sslpassword=***&sslmode=require"),
    ("postgresql://root:a/b@h/db", "postgresql://root:***@h/db"),
    ("postgresql://u:pw@h:5432/db?application_name=celery@w1",
     "postgresql://u:***@h:5432/db?application_name=celery@w1"),
    ("postgresql://h:5432/db?application_name=celery@w1",
     "postgresql://h:5432/db?application_name=celery@w1"),
    ("postgresql://root:a@b@h/db", "postgresql://root:***@h/db"),
    ("host=h password=a b dbname=d", "host=h password=*** dbname=d"),
    ("host=h password='a b", "host=h password=***"),
])
def test_mask_url_masks_everything_a_password_could_be(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_a_psycopg_error_raised_inside_redacting_keeps_its_type_and_loses_the_password() -> None:
    url = "postgresql://root:SeKrit@PaSS99@127.0.0.1:1/x"
    with pytest.raises(psycopg.OperationalError) as raised:
        with redacting(url):
            psycopg.connect(url, connect_timeout=2)  # libpq resolves host 'PaSS99@127.0.0.1'
    assert hidden(str(raised.value))
    assert raised.value.__suppress_context__, "the original message is not chained"
