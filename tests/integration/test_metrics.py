"""Metrics: the autoscaling query and the Prometheus endpoint, scraped over
real HTTP, report what the rows of job_tasks hold."""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import psycopg
import pytest
from taskrows import add_tasks, claim

from pg_broker import metrics

SAMPLE = re.compile(r'^(\w+)\{queue="((?:[^"\\]|\\.)*)"\} (\S+)$')


@pytest.fixture
def metrics_server(database_url: str) -> Iterator[str]:
    """A metrics server on a free port; its /metrics URL."""
    server = metrics.MetricsServer(database_url, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def scrape(url: str) -> dict[tuple[str, str], float]:
    """GET the endpoint; {(metric, queue): value}, every line checked against the format."""
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert re.match(r"^# (HELP|TYPE) pg_broker_\w+ .+$", line), line
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, queue, value = match.groups()
        samples[(name, re.sub(r"\\(.)", _unescaped, queue))] = float(value)
    return samples


def _unescaped(match: re.Match) -> str:
    return "\n" if match.group(1) == "n" else match.group(1)


def _backlog(db: psycopg.Connection) -> None:
    """Queue "work": 3 ready (one waiting 2 minutes), 2 delayed, 1 expired,
    2 held (one renewed, one whose lease expired), 1 dead, 1 failed, 1 done."""
    add_tasks(db, 2, queue="work")
    db.execute("UPDATE job_tasks SET visible_at = now() - interval '2 minutes'"
               " WHERE id = (SELECT min(id) FROM job_tasks)")
    add_tasks(db, 2, queue="work", visible_at="2999-01-01T00:00:00Z")
    add_tasks(db, 1, queue="work", expires_at="2000-01-01T00:00:00Z")
    held = add_tasks(db, 3, queue="work", priority=9)
    claim(db, queues=["work"], batch=3)
    db.execute("UPDATE job_tasks SET last_heartbeat = claimed_at + interval '1 second'"
               " WHERE id = %s", (held[0],))
    db.execute("UPDATE job_tasks SET lease_expires_at = now() - interval '1 second'"
               " WHERE id = %s", (held[1],))
    db.execute("UPDATE job_tasks SET status = 'completed', completed_at = now(),"
               " lease_token = NULL WHERE id = %s", (held[2],))
    add_tasks(db, 1, queue="work", status="dead")
    add_tasks(db, 1, queue="work", status="failed")
    add_tasks(db, 1, queue='odd "name"\\')


def test_the_backlog_query_counts_ready_delayed_and_the_oldest_wait(
        db: psycopg.Connection) -> None:
    _backlog(db)

    ready, delayed, oldest = metrics.backlog(db, "work")

    assert (ready, delayed) == (2, 2)
    assert 119 < oldest < 600


def test_the_backlog_query_answers_one_row_of_zeros_for_an_unknown_queue(
        db: psycopg.Connection) -> None:
    assert metrics.backlog(db, "nobody-uses-this") == (0, 0, 0.0)


def test_a_scrape_reports_every_figure_of_every_queue(
        db: psycopg.Connection, metrics_server: str) -> None:
    _backlog(db)
    db.execute("INSERT INTO broker_queues (name, durable) VALUES ('declared-empty', true),"
               " ('transient-replies', false)")

    samples = scrape(metrics_server)

    work = {name: value for (name, queue), value in samples.items() if queue == "work"}
    assert work.pop("pg_broker_queue_oldest_ready_age_seconds") > 119
    assert work.pop("pg_broker_lease_renewal_age_seconds") >= 0
    assert work == {
        "pg_broker_queue_ready": 2, "pg_broker_queue_delayed": 2,
        "pg_broker_leases_held": 2, "pg_broker_leases_renewed": 1,
        "pg_broker_leases_expired": 1, "pg_broker_dead_letters": 2,
    }
    assert samples[("pg_broker_queue_ready", 'odd "name"\\')] == 1
    assert samples[("pg_broker_queue_ready", "declared-empty")] == 0
    assert not any(queue == "transient-replies" for _, queue in samples)


def test_a_scrape_follows_the_rows(db: psycopg.Connection, metrics_server: str) -> None:
    add_tasks(db, 4, queue="moving")
    assert scrape(metrics_server)[("pg_broker_queue_ready", "moving")] == 4

    claim(db, queues=["moving"], batch=3)

    samples = scrape(metrics_server)
    assert samples[("pg_broker_queue_ready", "moving")] == 1
    assert samples[("pg_broker_leases_held", "moving")] == 3


def test_other_paths_are_not_found(metrics_server: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(metrics_server.replace("/metrics", "/"), timeout=30)
    assert error.value.code == 404


def test_pg_broker_metrics_prints_the_same_exposition(
        db: psycopg.Connection, database_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    from pg_broker.cli import main

    add_tasks(db, 2, queue="printed")
    monkeypatch.setenv("PG_BROKER_URL", database_url)

    assert main(["metrics"]) == 0

    assert 'pg_broker_queue_ready{queue="printed"} 2\n' in capsys.readouterr().out
