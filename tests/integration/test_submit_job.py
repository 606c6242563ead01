"""``submit_job()`` (migrations/supabase/106), called the way PostgREST and the HTTP
API call it: as the ``authenticated`` role with a user's JWT claims. The job
and every task message in one statement, the owner from ``auth.uid()``,
limits and idempotency enforced in the database; and the job events of
migrations/core/104 (version counter, NOTIFY)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors

from pg_broker.jobs import get_job, user_session

USER = uuid.UUID("00000000-0000-4000-8000-00000000f001")
OTHER = uuid.UUID("00000000-0000-4000-8000-00000000f002")
CHAPTERS = [{"title": "One", "text": "First words."}, {"title": "Two", "text": "Second words."}]


def _package(chapters: list[dict] = CHAPTERS, **params: object) -> str:
    return json.dumps({"chapters": chapters, "voice": "en-us", "rate_wpm": 175, **params})


def submit(conn: psycopg.Connection, user: uuid.UUID, params: str | None = None,
           key: str | None = None, job_type: str = "package") -> tuple[uuid.UUID, bool]:
    with user_session(conn, user):
        return conn.execute("SELECT * FROM submit_job(%s, 'A title', %s, %s)",
                            (job_type, params or _package(), key)).fetchone()


@pytest.fixture
def limits(db: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """Lets a test change job_limits; the defaults come back afterwards."""
    saved = db.execute("SELECT user_id, max_active_jobs, max_request_bytes FROM job_limits").fetchall()
    yield db
    db.execute("DELETE FROM job_limits")
    for row in saved:
        db.execute("INSERT INTO job_limits VALUES (%s, %s, %s)", row)


def test_submit_job_creates_the_job_and_its_task_messages_for_the_signed_in_user(
    db: psycopg.Connection,
) -> None:
    job_id, created = submit(db, USER)
    assert created
    rows = db.execute(
        "SELECT queue, task_type, user_id, status, payload -> 'headers' ->> 'argsrepr',"
        " payload -> 'headers' ->> 'user_id' FROM job_tasks WHERE job_id = %s ORDER BY sequence",
        (job_id,)).fetchall()
    assert rows == [
        ("audio", "tasks.audio.synthesize_chapter", USER, "pending", f'["{job_id}", 0]', str(USER)),
        ("audio", "tasks.audio.synthesize_chapter", USER, "pending", f'["{job_id}", 1]', str(USER)),
        ("documents", "tasks.documents.render_package_pdf", USER, "pending", f'["{job_id}"]',
         str(USER)),
    ]
    job = get_job(db, job_id)
    assert (job.user_id, job.status, job.total_tasks, job.title) == (USER, "pending", 3, "A title")
    assert job.params["chapters"] == CHAPTERS
    with user_session(db, USER):
        assert get_job(db, job_id) is not None
    with user_session(db, OTHER):
        assert get_job(db, job_id) is None


def test_without_a_signed_in_user_nothing_is_created(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.Error) as raised:
        with db.transaction():
            db.execute("SET LOCAL ROLE authenticated")
            db.execute("SELECT * FROM submit_job('package', 't', %s)", (_package(),))
    assert raised.value.sqlstate == "PB401"
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


@pytest.mark.parametrize(("job_type", "params", "field"), [
    ("nonsense", _package(), "job_type"),
    ("package", _package(chapters=[]), "chapters"),
    ("package", json.dumps({"voice": "en-us"}), "chapters"),
    ("package", json.dumps([1, 2]), "params"),
])
def test_invalid_submissions_name_the_field_and_queue_nothing(
    db: psycopg.Connection, job_type: str, params: str, field: str
) -> None:
    with pytest.raises(psycopg.Error) as raised:
        submit(db, USER, params, job_type=job_type)
    assert (raised.value.sqlstate, raised.value.diag.column_name) == ("PB422", field)
    assert raised.value.diag.message_primary.startswith(f"{field}: ")
    assert db.execute("SELECT (SELECT count(*) FROM jobs) + (SELECT count(*) FROM job_tasks)"
                      ).fetchone() == (0,)


def test_the_same_idempotency_key_returns_the_same_job_and_never_a_second(
    db: psycopg.Connection,
) -> None:
    first = submit(db, USER, key="order-17")
    again = submit(db, USER, key="order-17")
    assert first == (again[0], True) and again[1] is False
    # The key is the user's own: another user's same key is another job.
    theirs = submit(db, OTHER, key="order-17")
    assert theirs[1] and theirs[0] != first[0]
    with pytest.raises(psycopg.Error) as raised:
        submit(db, USER, _package(chapters=CHAPTERS[:1]), key="order-17")
    assert raised.value.sqlstate == "PB409"
    assert str(first[0]) in raised.value.diag.message_primary
    assert db.execute("SELECT user_id, count(*) FROM jobs GROUP BY 1 ORDER BY 1").fetchall() == [
        (USER, 1), (OTHER, 1)]
    assert db.execute("SELECT count(*) FROM job_tasks").fetchone() == (6,)


def test_racing_submissions_with_one_key_create_one_job(database_url: str, db: psycopg.Connection) -> None:
    racers = 8
    barrier = threading.Barrier(racers)
    results: list[tuple[uuid.UUID, bool]] = []
    failures: list[BaseException] = []

    def race() -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                barrier.wait(10)
                results.append(submit(conn, USER, key="double-click"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    assert len({job_id for job_id, _ in results}) == 1
    assert sorted(created for _, created in results) == [False] * (racers - 1) + [True]
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM job_tasks").fetchone() == (3,)


def test_the_active_job_limit_is_enforced_per_user_in_the_database(
    limits: psycopg.Connection,
) -> None:
    limits.execute("UPDATE job_limits SET max_active_jobs = 2 WHERE user_id IS NULL")
    limits.execute("INSERT INTO job_limits VALUES (%s, 3, 1048576)", (OTHER,))
    for _ in range(2):
        submit(limits, USER)
    with pytest.raises(psycopg.Error) as raised:
        submit(limits, USER)
    assert raised.value.sqlstate == "PB429"
    assert "2 pending or processing, the limit is 2" in raised.value.diag.message_primary
    for _ in range(3):  # OTHER has a row of their own
        submit(limits, OTHER)
    # A finished (or cancelled) job frees a place.
    limits.execute("UPDATE jobs SET status = 'cancelled' WHERE id = (SELECT id FROM jobs"
                   " WHERE user_id = %s LIMIT 1)", (USER,))
    assert submit(limits, USER)[1]
    assert limits.execute("SELECT count(*) FROM jobs WHERE user_id = %s", (USER,)).fetchone() == (3,)


def test_a_request_over_the_size_limit_is_refused_naming_the_biggest_field(
    limits: psycopg.Connection,
) -> None:
    big = [{"title": "Long", "text": "word " * 250_000}]  # 1.25 MB of text
    with pytest.raises(psycopg.Error) as raised:
        submit(limits, USER, _package(chapters=big))
    assert (raised.value.sqlstate, raised.value.diag.column_name) == ("PB413", "chapters")
    assert "limit is 1048576 bytes" in raised.value.diag.message_primary
    limits.execute("UPDATE job_limits SET max_request_bytes = 2000000")
    assert submit(limits, USER, _package(chapters=big))[1]


def test_users_may_call_submit_job_but_not_the_enqueue_functions(db: psycopg.Connection) -> None:
    for call in ("SELECT pg_broker_enqueue_task('tasks.maintenance.reclaim_stale_tasks')",
                 "SELECT pg_broker_wake('audio')",
                 "SELECT * FROM job_limits", "SELECT * FROM job_idempotency_keys"):
        with pytest.raises(errors.InsufficientPrivilege):
            with user_session(db, USER):
                db.execute(call)
    with pytest.raises(errors.InsufficientPrivilege):
        with db.transaction():
            db.execute("SET LOCAL ROLE anon")
            db.execute("SELECT * FROM submit_job('package', 't', %s)", (_package(),))


def test_a_watched_job_change_bumps_its_version_and_notifies_once(
    database_url: str, db: psycopg.Connection
) -> None:
    job_id, _ = submit(db, USER)
    unwatched, _ = submit(db, OTHER)
    (version,) = db.execute("SELECT version FROM jobs WHERE id = %s", (job_id,)).fetchone()
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN pgbroker_jobs")
        db.execute("INSERT INTO job_event_watchers (job_id, listener_pid) VALUES (%s, %s)",
                   (job_id, listener.info.backend_pid))
        db.execute("UPDATE jobs SET title = 'renamed' WHERE id = %s", (job_id,))  # not an event
        for job in (unwatched, job_id):  # nobody watches the first: no NOTIFY for it
            db.execute("UPDATE job_tasks SET status = 'cancelled' WHERE id = (SELECT min(id)"
                       " FROM job_tasks WHERE job_id = %s)", (job,))
        heard = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        heard += [n.payload for n in listener.notifies(timeout=0.3)]
    assert heard == [f"{job_id}:{version + 1}"]
    assert db.execute("SELECT version, cancelled_tasks FROM jobs WHERE id = %s",
                      (job_id,)).fetchone() == (version + 1, 1)
    assert db.execute("SELECT version FROM jobs WHERE id = %s", (unwatched,)).fetchone() == (
        version + 1,)
