"""A task or artifact of a job belongs to the job's owner, whatever a
producer's headers or a later update say (migrations/core/102): what row-level
security shows a user depends on it."""

from __future__ import annotations

import uuid

import kombu
import psycopg
import pytest
from kombu.exceptions import ChannelError
from psycopg import errors
from taskrows import add_job, add_tasks, job
from transport_support import open_connection, publish, queue_named

from pg_broker.jobs import user_session

OWNER = str(uuid.uuid4())
STRANGER = str(uuid.uuid4())


@pytest.fixture
def connection(database_url: str, db: psycopg.Connection) -> kombu.Connection:
    yield from open_connection(database_url)


def _tasks_seen_by(db: psycopg.Connection, user: str) -> list[tuple]:
    with user_session(db, user):
        return db.execute("SELECT queue, user_id::text FROM job_tasks").fetchall()


def test_a_publish_naming_another_user_for_a_job_is_refused_and_the_job_does_not_count_it(
    connection: kombu.Connection, db: psycopg.Connection
) -> None:
    job_id = add_job(db, OWNER)
    queue = queue_named("owned")
    with pytest.raises(ChannelError, match="belongs to its job's owner"):
        publish(connection, queue, "steal", headers={"job_id": job_id, "user_id": STRANGER})
    assert db.execute("SELECT count(*) FROM job_tasks").fetchone() == (0,)
    assert job(db, job_id)["total_tasks"] == 0
    assert _tasks_seen_by(db, STRANGER) == []


def test_a_publish_for_a_job_without_a_user_takes_the_jobs_owner(
    connection: kombu.Connection, db: psycopg.Connection
) -> None:
    job_id = add_job(db, OWNER)
    queue = queue_named("owned")
    publish(connection, queue, "no user header", headers={"job_id": job_id})
    publish(connection, queue, "the owner", headers={"job_id": job_id, "user_id": OWNER})
    assert _tasks_seen_by(db, OWNER) == [(queue.name, OWNER)] * 2
    assert _tasks_seen_by(db, STRANGER) == []
    assert job(db, job_id)["total_tasks"] == 2


def test_plain_messages_keep_whatever_user_they_name(
    connection: kombu.Connection, db: psycopg.Connection
) -> None:
    queue = queue_named("plain")
    publish(connection, queue, "plain", headers={"user_id": STRANGER})
    assert _tasks_seen_by(db, STRANGER) == [(queue.name, STRANGER)]


def test_a_job_without_an_owner_takes_no_task_of_a_user(db: psycopg.Connection) -> None:
    job_id = add_job(db, None)
    with pytest.raises(errors.InvalidParameterValue, match="belongs to its job's owner"):
        add_tasks(db, job_id=job_id, user_id=STRANGER)
    add_tasks(db, job_id=job_id)
    assert db.execute("SELECT user_id FROM job_tasks").fetchall() == [(None,)]


@pytest.mark.parametrize(("change", "refusal"), [
    ("user_id = %(stranger)s", "belongs to its job's owner"),
    ("job_id = %(other_job)s", "job_id of a task never changes"),
    ("job_id = NULL", "job_id of a task never changes"),
])
def test_a_task_cannot_be_moved_to_another_user_or_job_later(
    db: psycopg.Connection, change: str, refusal: str
) -> None:
    job_id = add_job(db, OWNER)
    other_job = add_job(db, STRANGER)
    (task_id,) = add_tasks(db, job_id=job_id)
    with pytest.raises(errors.InvalidParameterValue, match=refusal):
        db.execute(f"UPDATE job_tasks SET {change} WHERE id = %(id)s",
                   {"stranger": STRANGER, "other_job": other_job, "id": task_id})
    db.execute("UPDATE job_tasks SET user_id = NULL WHERE id = %s", (task_id,))
    assert db.execute("SELECT job_id::text, user_id::text FROM job_tasks").fetchall() == [
        (job_id, OWNER)]
    assert (job(db, job_id)["total_tasks"], job(db, other_job)["total_tasks"]) == (1, 0)


def test_a_plain_message_cannot_be_attached_to_a_job_later(db: psycopg.Connection) -> None:
    job_id = add_job(db, OWNER)
    (task_id,) = add_tasks(db, user_id=STRANGER)
    with pytest.raises(errors.InvalidParameterValue, match="job_id of a task never changes"):
        db.execute("UPDATE job_tasks SET job_id = %s WHERE id = %s", (job_id, task_id))


def test_a_jobs_owner_never_changes(db: psycopg.Connection) -> None:
    job_id = add_job(db, OWNER)
    add_tasks(db, job_id=job_id)
    with pytest.raises(errors.InvalidParameterValue, match="owner of a job never changes"):
        db.execute("UPDATE jobs SET user_id = %s WHERE id = %s", (STRANGER, job_id))
    assert _tasks_seen_by(db, STRANGER) == []


def test_an_artifact_of_a_job_belongs_to_the_jobs_owner(db: psycopg.Connection) -> None:
    job_id = add_job(db, OWNER)
    insert = ("INSERT INTO job_artifacts (job_id, task_id, user_id, kind, storage_backend,"
              " storage_path, content_type, bytes, sha256)"
              " VALUES (%s, 't', %s, 'pdf', 'local', %s, 'application/pdf', 1, repeat('a', 64))")
    with pytest.raises(errors.InvalidParameterValue, match="belongs to its job's owner"):
        db.execute(insert, (job_id, STRANGER, "stolen.pdf"))
    db.execute(insert, (job_id, None, "mine.pdf"))
    with user_session(db, OWNER):
        assert db.execute("SELECT storage_path FROM job_artifacts").fetchall() == [("mine.pdf",)]
    with user_session(db, STRANGER):
        assert db.execute("SELECT count(*) FROM job_artifacts").fetchone() == (0,)
