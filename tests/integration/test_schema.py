"""The core schema (migrations/core/) as PostgreSQL enforces it: status machine,
constraints, cascades, updated_at, the claim index and the hot table's
storage settings."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import psycopg
import pytest
from psycopg import errors
from taskrows import add_job, add_tasks, claim, job, task

from pg_broker.migrate import migrate
from pg_broker.queries import queries
from pg_broker.states import JobStatus, TaskStatus


def _check_values(conn: psycopg.Connection, constraint: str) -> set[str]:
    (definition,) = conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = %s", (constraint,)
    ).fetchone()
    return set(re.findall(r"'(\w+)'::text", definition))


def test_the_python_enums_mirror_the_status_check_constraints(db: psycopg.Connection) -> None:
    assert _check_values(db, "job_tasks_status_check") == {s.value for s in TaskStatus}
    assert _check_values(db, "jobs_status_check") == {s.value for s in JobStatus}


@pytest.mark.parametrize("statement", [
    "INSERT INTO job_tasks (queue, payload, status) VALUES ('q', '{}', 'done')",
    "INSERT INTO jobs (status) VALUES ('running')",
    "INSERT INTO job_tasks (queue, payload, priority) VALUES ('q', '{}', 10)",
    "INSERT INTO job_tasks (queue, payload, priority) VALUES ('q', '{}', -1)",
    "INSERT INTO job_tasks (queue, payload, max_attempts) VALUES ('q', '{}', 0)",
    "INSERT INTO job_tasks (queue, payload) VALUES ('', '{}')",
    # A held row always has the lease token that fences it.
    "INSERT INTO job_tasks (queue, payload, status) VALUES ('q', '{}', 'claimed')",
    "INSERT INTO job_artifacts (job_id, task_id, kind, storage_backend, storage_path,"
    " content_type, bytes, sha256) VALUES (gen_random_uuid(), 't', 'audio', 'local', 'p',"
    " 'audio/mpeg', 1, 'not-a-digest')",
])
def test_invalid_rows_are_refused(db: psycopg.Connection, statement: str) -> None:
    with pytest.raises(errors.IntegrityError):
        db.execute(statement)


def test_deleting_a_job_deletes_its_tasks_and_artifacts(db: psycopg.Connection) -> None:
    doomed, kept = add_job(db), add_job(db)
    add_tasks(db, 3, job_id=doomed)
    add_tasks(db, 1, job_id=kept)
    for job_id in (doomed, kept):
        db.execute(
            "INSERT INTO job_artifacts (job_id, task_id, kind, storage_backend, storage_path,"
            " content_type, bytes, sha256) VALUES (%s, 't', 'pdf', 'local', %s,"
            " 'application/pdf', 1, repeat('a', 64))", (job_id, f"u/{job_id}/pdf/t.pdf"))

    db.execute("DELETE FROM jobs WHERE id = %s", (doomed,))

    assert db.execute("SELECT job_id::text, count(*) FROM job_tasks GROUP BY 1").fetchall() == [
        (kept, 1)]
    assert db.execute("SELECT job_id::text FROM job_artifacts").fetchall() == [(kept,)]


def test_an_artifact_path_is_stored_once(db: psycopg.Connection) -> None:
    job_id = add_job(db)
    upsert = (
        "INSERT INTO job_artifacts (job_id, task_id, kind, storage_backend, storage_path,"
        " content_type, bytes, sha256) VALUES (%s, 't', 'audio', 'local', 'u/j/audio/t.mp3',"
        " 'audio/mpeg', %s, repeat('b', 64))"
        " ON CONFLICT (storage_backend, storage_path) DO UPDATE SET bytes = EXCLUDED.bytes"
    )
    db.execute(upsert, (job_id, 100))
    db.execute(upsert, (job_id, 120))
    assert db.execute("SELECT count(*), max(bytes) FROM job_artifacts").fetchone() == (1, 120)


@pytest.mark.parametrize("table", ["jobs", "job_tasks", "job_artifacts"])
def test_updated_at_follows_every_update(db: psycopg.Connection, table: str) -> None:
    job_id = add_job(db)
    (task_id,) = add_tasks(db, job_id=job_id)
    db.execute(
        "INSERT INTO job_artifacts (job_id, task_id, kind, storage_backend, storage_path,"
        " content_type, bytes, sha256) VALUES (%s, 't', 'other', 'local', 'x', 'text/plain', 1,"
        " repeat('c', 64))", (job_id,))
    db.execute(f"UPDATE {table} SET updated_at = '2000-01-01', created_at = '2000-01-01'")
    db.execute(f"UPDATE {table} SET created_at = created_at")
    (updated,) = db.execute(f"SELECT updated_at > '2001-01-01' FROM {table}").fetchone()
    assert updated


def test_the_hot_table_carries_its_own_autovacuum_settings(db: psycopg.Connection) -> None:
    (options,) = db.execute(
        "SELECT reloptions FROM pg_class WHERE oid = 'job_tasks'::regclass").fetchone()
    assert {
        "fillfactor=80",
        "autovacuum_vacuum_scale_factor=0.01",
        "autovacuum_vacuum_threshold=1000",
        "autovacuum_vacuum_insert_scale_factor=0.05",
        "autovacuum_analyze_scale_factor=0.02",
        "autovacuum_vacuum_cost_delay=0",
    } <= set(options)


def test_transient_messages_skip_the_write_ahead_log(db: psycopg.Connection) -> None:
    assert db.execute(
        "SELECT relpersistence FROM pg_class WHERE oid = 'broker_transient_messages'::regclass"
    ).fetchone() == ("u",)


def _calls(conn: psycopg.Connection, function: str) -> int:
    """Calls of a plpgsql function in the open transaction (track_functions)."""
    (calls,) = conn.execute("SELECT coalesce(pg_stat_get_xact_function_calls(%s::regproc), 0)",
                            (function,)).fetchone()
    return calls


def test_plain_messages_call_no_job_trigger_function_and_job_rows_still_do(
    db: psycopg.Connection,
) -> None:
    # core 162: a statement of plain Celery messages (no job) calls neither the
    # job counters' statement trigger nor, when it sets updated_at itself, the
    # updated_at one; the first job row of a transaction brings them back.
    (older,) = add_tasks(db, queue="plain")  # updated_at before the transaction's now()
    with db.transaction():
        db.execute("SET LOCAL track_functions = 'pl'")
        ids = add_tasks(db, 3, queue="plain")
        db.execute("UPDATE job_tasks SET status = 'claimed', lease_token = gen_random_uuid(),"
                   " lease_expires_at = now() + interval '1 minute', updated_at = now()"
                   " WHERE id = ANY (%s)", (ids,))
        db.execute("DELETE FROM job_tasks WHERE id = %s", (ids[0],))
        assert _calls(db, "pg_broker_job_tasks_changed") == 0
        assert _calls(db, "pg_broker_touch_updated_at") == 0
        db.execute("UPDATE job_tasks SET error = 'x' WHERE id = %s", (older,))
        assert _calls(db, "pg_broker_touch_updated_at") == 1  # updated_at not set: set for it
        job_id = add_job(db)
        (task_id,) = add_tasks(db, queue="jobs", job_id=job_id)
        assert _calls(db, "pg_broker_job_tasks_changed") == 1
        assert job(db, job_id)["total_tasks"] == 1
        db.execute("UPDATE job_tasks SET status = 'cancelled', completed_at = now()"
                   " WHERE id = %s", (task_id,))
        assert _calls(db, "pg_broker_job_tasks_changed") == 2
        assert job(db, job_id)["cancelled_tasks"] == 1


@pytest.fixture
def explained(db: psycopg.Connection) -> Iterator[list[str]]:
    """Plans of every statement run on `db` from now on, functions' inner
    statements included (auto_explain, sent to the client as notices)."""
    plans: list[str] = []

    def collect(diagnostic: psycopg.errors.Diagnostic) -> None:
        if diagnostic.message_primary and "plan:" in diagnostic.message_primary:
            plans.append(diagnostic.message_primary)

    db.execute("LOAD 'auto_explain'")
    for setting, value in [("log_min_duration", "0"), ("log_nested_statements", "on"),
                           ("log_analyze", "on"), ("log_level", "notice")]:
        db.execute("SELECT set_config(%s, %s, false)", (f"auto_explain.{setting}", value))
    db.add_notice_handler(collect)
    yield plans
    db.remove_notice_handler(collect)
    db.execute("SET auto_explain.log_min_duration = -1")


def _plan_lines(plans: list[str], fragment: str) -> list[str]:
    return [line for plan in plans for line in plan.splitlines() if fragment in line]


def _rows_removed(plans: list[str]) -> list[int]:
    """How many rows each node of these plans read and threw away: a scan
    that finds its rows by key throws few away."""
    return [int(n) for n in re.findall(r"Rows Removed by (?:Join )?Filter: (\d+)", "\n".join(plans))]


def _actual_rows(line: str) -> float:
    if "(never executed)" in line:
        return 0
    return float(re.search(r"actual [^)]*rows=([\d.]+)", line).group(1))


@pytest.fixture
def big_table(db: psycopg.Connection) -> None:
    """50,000 finished rows, a backlog of 2,000 on two queues, statistics."""
    db.execute(
        "INSERT INTO job_tasks (queue, priority, payload, status, completed_at)"
        " SELECT 'audio', g % 10, '{}', 'completed', now() FROM generate_series(1, 50000) g")
    add_tasks(db, 1000, queue="audio", priority=3)
    add_tasks(db, 1000, queue="pdf", priority=7)
    db.execute("ANALYZE job_tasks")


def test_a_claim_reads_only_the_rows_it_takes_from_the_claim_index(
    db: psycopg.Connection, big_table: None, explained: list[str]
) -> None:
    for queues in (["audio"], ["audio", "pdf"]):
        explained.clear()
        assert len(claim(db, queues=queues, batch=10)) == 10
        scans = _plan_lines(explained, "job_tasks_claim_idx")
        assert scans and all("Index Scan using job_tasks_claim_idx" in s for s in scans), explained
        # Index order is claim order: no backlog read, no sort of the backlog.
        assert all(_actual_rows(s) <= 10 for s in scans), scans


@pytest.fixture
def backlog_200k(db: psycopg.Connection) -> None:
    """A backlog of 200,000 messages on one queue, 1,000 on another, statistics."""
    db.execute("INSERT INTO job_tasks (queue, priority, payload)"
               " SELECT 'audio', g % 3, '{}' FROM generate_series(1, 200000) g")
    add_tasks(db, 1000, queue="pdf", priority=7)
    db.execute("ANALYZE job_tasks")


def test_the_transports_claim_keeps_one_index_driven_plan_on_a_200k_backlog(
    db: psycopg.Connection, backlog_200k: None, explained: list[str]
) -> None:
    # pg_broker_claim runs with a generic plan (core 160): planned once per
    # session, for any queue and limit, so that plan must read only the rows it
    # acks and claims however long the backlog (its first form merge-joined
    # the whole primary key: 200,000 rows read per claim; its ack read every
    # held row through job_tasks_lease_idx).
    assert "plan_cache_mode=force_generic_plan" in db.execute(
        "SELECT proconfig FROM pg_proc WHERE proname = 'pg_broker_claim'").fetchone()[0]
    # Rows other consumers hold, more than the statistics know of: an ack must
    # find its own rows by primary key, not walk every held row.
    db.execute("UPDATE job_tasks SET status = 'claimed', worker_id = 'other',"
               " lease_token = gen_random_uuid(), lease_expires_at = now() + interval '1 hour'"
               " WHERE id IN (SELECT id FROM job_tasks WHERE queue = 'audio'"
               " ORDER BY id DESC LIMIT 5000)")
    held: list[tuple[int, str]] = []
    for queue in ("audio", "pdf", "audio"):
        explained.clear()
        token = uuid.uuid4()
        rows = db.execute(queries["transport_claim"], {
            "queue": queue, "limit": 10, "worker_id": "w", "lease_token": token,
            "lease": timedelta(minutes=1), "delete_acked": True,
            "ack_ids": [row_id for row_id, _ in held], "ack_tokens": [t for _, t in held],
        }).fetchall()
        assert [r[0] for r in rows].count(True) == 10
        assert [r[0] for r in rows].count(False) == len(held)
        held = [(r[1], token) for r in rows if r[0]]
        assert _plan_lines(explained, "Index Scan using job_tasks_claim_idx"), explained
        scans = [line for line in _plan_lines(explained, " on job_tasks") if "Scan" in line]
        assert scans and all(_actual_rows(s) <= 10 for s in scans), scans


@pytest.mark.parametrize("planned_on", [
    [],  # an empty table, never analyzed
    ["VACUUM ANALYZE job_tasks"],  # the statistics a vacuum of a drained queue leaves
    ["INSERT INTO job_tasks (queue, payload) SELECT 'audio', '{}' FROM generate_series(1, 20)",
     "ANALYZE job_tasks"],
    ["INSERT INTO job_tasks (queue, payload) SELECT 'audio', '{}' FROM generate_series(1, 200)",
     "DELETE FROM job_tasks", "VACUUM ANALYZE job_tasks"],
], ids=["empty", "empty-vacuumed", "small", "emptied-vacuumed"])
def test_a_claim_planned_on_a_small_table_stays_index_driven_behind_a_backlog(
    db: psycopg.Connection, database_url: str, explained: list[str], planned_on: list[str]
) -> None:
    # A session keeps pg_broker_claim's generic plan until the table's
    # statistics change (a vacuum, an analyze; never where autovacuum is off
    # and no worker vacuums). Planned on a table empty or small, where
    # reading it whole is the cheapest way to find a row by id, that plan
    # acked and claimed by reading the whole table on every claim (sequential
    # scans, core 213; with those off, the ack that completes rows walked the
    # whole primary key, core 230), however long the backlog grew behind it:
    # bench.listeners' collapsed steps, 20 ms per claim with 3,000 rows, and
    # the backlog figure's claim cost growing with the backlog.
    for statement in planned_on:
        db.execute(statement)
    held: list[tuple[int, uuid.UUID]] = []

    def ack_and_claim() -> list[tuple]:
        nonlocal held
        token = uuid.uuid4()
        rows = db.execute(queries["transport_claim"], {
            "queue": "audio", "limit": 4, "worker_id": "w", "lease_token": token,
            "lease": timedelta(minutes=1), "delete_acked": True,
            "ack_ids": [row_id for row_id, _ in held], "ack_tokens": [t for _, t in held],
        }).fetchall()
        held = [(r[1], token) for r in rows if r[0]]
        return rows

    ack_and_claim()  # planned here
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("INSERT INTO job_tasks (queue, payload)"
                      " SELECT 'audio', '{}' FROM generate_series(1, 3000)")
    ack_and_claim()
    ack_and_claim()
    explained.clear()
    rows = ack_and_claim()
    assert [r[0] for r in rows] == [True] * 4 + [False] * 4
    scans = [line for line in _plan_lines(explained, " on job_tasks") if "Scan" in line]
    assert scans and not any("Seq Scan" in s for s in scans), explained
    removed = sum(int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", "\n".join(explained)))
    assert removed <= 10, explained


@pytest.mark.parametrize("wait", [
    "SELECT pg_broker_wait('idle', gen_random_uuid(), NULL, NULL)",  # core 210's
    # core 220's, offering a hand-off, as the transport waits now
    "SELECT pg_broker_wait('idle', gen_random_uuid(), NULL, NULL, 'w', interval '1 minute',"
    " gen_random_uuid())",
])
def test_a_consumers_wait_planned_on_an_empty_table_reads_no_other_queues_backlog(
    db: psycopg.Connection, explained: list[str], wait: str
) -> None:
    # pg_broker_wait re-checks its queue before the consumer sleeps, from a
    # plan its session keeps (plpgsql): made on an empty table it was a
    # sequential scan, which then read every other queue's backlog on each
    # wait of an idle consumer.
    db.execute("VACUUM ANALYZE job_tasks")
    for _ in range(6):  # past plpgsql's custom plans: the generic one is kept
        assert db.execute(wait).fetchone() == (False,)
    db.execute("INSERT INTO job_tasks (queue, payload)"
               " SELECT 'busy', '{}' FROM generate_series(1, 3000)")
    explained.clear()
    assert db.execute(wait).fetchone() == (False,)
    scans = [line for line in _plan_lines(explained, " on job_tasks") if "Scan" in line]
    assert scans and all(_actual_rows(s) == 0 for s in scans), explained
    assert not [s for s in scans if "Seq Scan" in s], explained
    assert all(n <= 10 for n in _rows_removed(explained)), explained


def _hot_calls(db: psycopg.Connection, n: int) -> None:
    """One call of each per-message function of the transport and the result
    backend that finds its rows by key (their n-th: keys of their own)."""
    token = uuid.uuid4()
    db.execute("INSERT INTO job_tasks (queue, payload) VALUES ('held', '{}')")
    (row_id,) = [r[1] for r in db.execute(queries["transport_claim"], {
        "queue": "held", "limit": 1, "worker_id": "w", "lease_token": token,
        "lease": timedelta(minutes=1), "delete_acked": True, "ack_ids": [],
        "ack_tokens": []}).fetchall()]
    held = {"ids": [row_id], "tokens": [token]}
    db.execute(queries["mark_task_processing"], {"id": row_id, "lease_token": token})
    db.execute(queries["transport_renew_leases"], {**held, "lease": timedelta(minutes=1)})
    db.execute(queries["transport_fail"], {**held, "backoff": timedelta(0)})
    db.execute(queries["result_await"], {"keys": [f"awaited{n}"]})
    result = {"value": b"{}", "state": "SUCCESS", "expires": timedelta(days=1),
              "keep_success": True}
    db.execute(queries["result_set"], {"key": f"result{n}", **result})
    db.execute(queries["result_chord_part_stored"], {
        "key": f"part{n}", **result, "chord": f"chord{n}", "part": f"part{n}",
        "claimer": "w", "claim": timedelta(seconds=30), "chord_expires": timedelta(days=1)})
    db.execute(queries["result_chord_part_returned"], {
        "key": f"chord{n}", "part": f"other{n}", "size": 3, "claimer": "w",
        "claim": timedelta(seconds=30), "expires": timedelta(days=1)})


def test_per_message_functions_planned_on_empty_tables_read_no_table_when_they_grow(
    db: psycopg.Connection, explained: list[str]
) -> None:
    # What core 213 found in the claim holds for every function that keeps
    # its plans for the session (plpgsql; SQL functions too on PostgreSQL 18):
    # planned on empty tables, a lookup by key became a sequential scan, kept
    # as the table grew — a lease renewal read the backlog, a chord's part
    # read every chord counter, waiting for a result read every stored
    # result (results stay a day). Core 214.
    for table in ("job_tasks", "task_results", "task_result_chords", "task_result_waiters"):
        db.execute(f"VACUUM ANALYZE {table}")
    for n in range(7):  # past plpgsql's custom plans: the generic ones are kept
        _hot_calls(db, n)
    db.execute("INSERT INTO job_tasks (queue, payload)"
               " SELECT 'backlog', '{}' FROM generate_series(1, 3000)")
    db.execute("INSERT INTO task_results (key, value, state)"
               " SELECT 'stored' || g, '{}', 'SUCCESS' FROM generate_series(1, 3000) g")
    db.execute("INSERT INTO task_result_chords (key, parts)"
               " SELECT 'counted' || g, 1 FROM generate_series(1, 3000) g")
    explained.clear()
    _hot_calls(db, 100)
    scans = [line for line in _plan_lines(explained, "Scan ")
             if re.search(r"Scan (using \S+ )?on (job_tasks|task_results|task_result_chords)\b",
                          line)]
    assert scans and not [s for s in scans if "Seq Scan" in s], explained
    assert all(_actual_rows(s) <= 2 for s in scans), [s for s in scans if _actual_rows(s) > 2]
    assert all(n <= 10 for n in _rows_removed(explained)), explained


def test_the_watchdog_finds_expired_messages_without_reading_the_backlog(
    db: psycopg.Connection, big_table: None, explained: list[str]
) -> None:
    (expired,) = add_tasks(db, queue="audio")
    db.execute("UPDATE job_tasks SET expires_at = now() - interval '1 minute' WHERE id = %s",
               (expired,))
    db.execute("ANALYZE job_tasks")
    explained.clear()
    db.execute("SELECT reclaim_stale_tasks()")
    assert task(db, expired) is None
    assert _plan_lines(explained, "Index Scan using job_tasks_expiry_idx"), explained
    scans = [line for line in _plan_lines(explained, " on job_tasks") if "Scan" in line]
    assert scans and all(_actual_rows(s) <= 5 for s in scans), scans


def test_job_counters_cannot_go_negative(db: psycopg.Connection) -> None:
    job_id = add_job(db)
    with pytest.raises(errors.CheckViolation):
        db.execute("UPDATE jobs SET failed_tasks = -1 WHERE id = %s", (job_id,))
    assert job(db, job_id)["failed_tasks"] == 0


HEARTBEAT_COLUMNS = {"lease_expires_at", "last_heartbeat", "updated_at"}


def test_no_index_of_the_hot_table_holds_a_column_a_heartbeat_writes(
    db: psycopg.Connection,
) -> None:
    # Otherwise every lease renewal writes a new entry into every index.
    indexed = {
        name: set(re.findall(r"\w+", definition))
        for name, definition in db.execute(
            "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid)"
            " FROM pg_index WHERE indrelid = 'job_tasks'::regclass")
    }
    assert indexed
    assert {name: words & HEARTBEAT_COLUMNS for name, words in indexed.items()} == {
        name: set() for name in indexed}


def _update_counts(conn: psycopg.Connection, url: str, at_least: int) -> tuple[int, int]:
    """(updates, HOT updates) of job_tasks once the statistics show at least
    `at_least` updates (they reach the cumulative view asynchronously)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    with psycopg.connect(url, autocommit=True) as reader:
        for _ in range(500):
            reader.execute("SELECT pg_stat_clear_snapshot()")
            counts = reader.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                                    " WHERE relid = 'job_tasks'::regclass").fetchone()
            if counts[0] >= at_least:
                return counts
            time.sleep(0.02)
    raise AssertionError(f"statistics never showed {at_least} updates: {counts}")


def test_lease_renewals_are_hot_updates(new_database: Callable[..., str]) -> None:
    # A database of its own: a session of the shared test database (a worker an
    # earlier test left finishing, an open transaction) holds back pruning there,
    # and without pruning a page has no room for the next version — not HOT.
    database_url = new_database()
    migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as db:
        _renew_a_claimed_batch_ten_times(db, database_url)


def _renew_a_claimed_batch_ten_times(db: psycopg.Connection, database_url: str) -> None:
    add_tasks(db, 1000, payload={"body": "x" * 200})
    db.execute("VACUUM job_tasks")
    base, _ = _update_counts(db, database_url, 0)
    claim(db, worker="w", batch=100)
    # The claim's 100 updates must be in the baseline; counts of earlier
    # statements can still arrive late, so the renewals are "at least 1000".
    before, hot_before = _update_counts(db, database_url, base + 100)
    for _ in range(10):
        db.execute("SELECT heartbeat_task('w')")
    after, hot_after = _update_counts(db, database_url, before + 1000)
    assert after - before >= 1000
    assert hot_after - hot_before >= 800, "renewals are HOT while pages have room (fillfactor)"


def test_task_ids_are_indexed_for_the_dead_letters_alone(
    new_database: Callable[..., str],
) -> None:
    # A publish and a claim each wrote an entry into a task-id index of every
    # row; only dead-letter lookups (retry by Celery task id) read one.
    database_url = new_database()
    migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as db:
        add_tasks(db, 2000, task_id="celery-task-id")
        claim(db, worker="w", batch=1000)
        add_tasks(db, 1, task_id="dead-one", status="dead")
        db.execute("ANALYZE job_tasks")
        sizes = dict(db.execute(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid)"
            " FROM pg_index WHERE indrelid = 'job_tasks'::regclass"
            " AND pg_get_indexdef(indexrelid) LIKE '%%(task_id)%%'").fetchall())
        # The metapage and one leaf page holding the dead row's entry (an
        # index of every row took six pages here, deduplicated).
        assert sizes == {"job_tasks_dead_task_id_idx": 2 * 8192}
        with db.transaction():
            db.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(row[0] for row in db.execute(
                "EXPLAIN " + queries["not_dead_letters"].replace("%(ids)s", "ARRAY['dead-one']")))
        assert "job_tasks_dead_task_id_idx" in plan
        assert db.execute(queries["not_dead_letters"],
                          {"ids": ["dead-one", "celery-task-id"]}).fetchall() == [
            ("celery-task-id",)]


def test_a_workers_maintenance_reads_no_backlog(
    db: psycopg.Connection, explained: list[str]
) -> None:
    # transport_maintain runs every maintenance_interval in every worker. Its
    # sweep of the messages of expired queues, written `queue IN (SELECT name
    # FROM expired)`, hashed the (empty) list and read all of job_tasks: a
    # sequential scan per worker per 10 s, whose snapshot, on a bloated
    # table, held vacuum back for as long as it ran (70 ms here at 80,000
    # dead rows; 97 s seen on a loaded machine).
    # The shape of a busy table: a backlog among many dead row versions.
    for queue in ("audio", "pdf", "text", "video"):
        db.execute("INSERT INTO job_tasks (queue, payload)"
                   " SELECT %s, '{}' FROM generate_series(1, 20000)", (queue,))
    db.execute("DELETE FROM job_tasks WHERE id % 10 <> 0")
    db.execute("ANALYZE job_tasks")
    explained.clear()
    assert db.execute(queries["transport_maintain"]).fetchone() == (0, 0)
    scans = _plan_lines(explained, "on job_tasks")
    assert scans and all(_actual_rows(s) <= 1 for s in scans), scans
    # Rows read and dropped by a filter: the old plan read all 20,000 here.
    removed = sum(int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", "\n".join(explained)))
    assert removed <= 10, explained


def test_the_safety_poll_of_an_idle_queue_reads_no_other_queues_backlog(
    db: psycopg.Connection, explained: list[str]
) -> None:
    # transport_probe runs every polling_interval in every worker for its idle
    # queues; as EXISTS it read every pending row of the other queues
    # (sequential scan: 20,000 here, 3.3 ms per idle queue). It is planned
    # once per session (core 231: as a statement, planning cost ten times
    # the execution), so the plan made on the empty table must hold.
    assert {"plan_cache_mode=force_generic_plan", "enable_seqscan=off"} <= set(db.execute(
        "SELECT proconfig FROM pg_proc WHERE proname = 'pg_broker_probe'").fetchone()[0])
    assert db.execute(queries["transport_probe"], {"queues": ["pdf"]}).fetchall() == []
    for queue in ("audio", "pdf", "text", "video"):
        db.execute("INSERT INTO job_tasks (queue, payload)"
                   " SELECT %s, '{}' FROM generate_series(1, 5000)", (queue,))
    for statistics in ("as planned on the empty table", "ANALYZE job_tasks"):
        if statistics.startswith("ANALYZE"):
            db.execute(statistics)  # and planned again
        explained.clear()
        ready = db.execute(queries["transport_probe"],
                           {"queues": ["idle.one", "idle.two@host.pidbox", "pdf"]}).fetchall()
        assert ready == [("pdf",)]
        scans = _plan_lines(explained, "on job_tasks")
        assert scans and all("Index Scan using job_tasks_claim_idx" in s for s in scans), explained
        assert all(_actual_rows(s) <= 1 for s in scans), scans
