"""A mistyped database URL never shows its password: ``pg-broker`` run as a
user runs it, with each URL of tests/hostile_urls.py in PG_BROKER_URL, says
what is wrong in one line, without a traceback, and exits non-zero; the
transport's connection error and the URL Celery prints hold no password."""

from __future__ import annotations

import os
import shutil
import subprocess

import kombu
import pytest
from hostile_urls import HOSTILE, hidden

from pg_broker.masking import mask_url, url_problem


def pg_broker(command: str, url: str) -> subprocess.CompletedProcess:
    executable = shutil.which("pg-broker")
    assert executable, "the console script is installed (pip install -e .)"
    env = {**os.environ, "PG_BROKER_URL": url}
    env.pop("DATABASE_URL", None)
    return subprocess.run([executable, command], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("url", HOSTILE)
@pytest.mark.parametrize("command", ["migrate", "status", "reclaim"])
def test_a_command_on_a_hostile_url_fails_in_one_line_without_the_password(
    command: str, url: str
) -> None:
    result = pg_broker(command, url)
    assert hidden(result.stdout + result.stderr)
    assert "Traceback" not in result.stderr
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"pg-broker: no database reachable at {mask_url(url)}")


@pytest.mark.parametrize("url", HOSTILE)
def test_pg_broker_url_shows_a_hostile_url_masked_and_says_when_libpq_misreads_it(
    url: str,
) -> None:
    result = pg_broker("url", url)
    assert hidden(result.stdout + result.stderr)
    assert result.stdout == mask_url(url) + "\n"
    if url_problem(url):
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith("pg-broker url: the URL is malformed: ")
    else:
        assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("url", HOSTILE)
def test_the_transport_fails_to_connect_to_a_hostile_url_without_the_password(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_BROKER_URL", url)
    with kombu.Connection("pgbroker://") as connection:
        with pytest.raises(connection.connection_errors) as raised:
            connection.transport.establish_connection()  # what connect() retries
        assert hidden(str(raised.value)) and hidden(repr(connection))
        # What Celery logs: "Cannot connect to <as_uri()>: <error>".
        assert hidden(connection.as_uri())
