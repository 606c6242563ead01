"""The ``pgbroker://`` result backend on real PostgreSQL, without workers:
states, serializers, expiry, forget, chords counted in SQL, and waiting that
is pushed (LISTEN/NOTIFY on one connection per process), reconnect included.

A worker's writes are played by the backend API itself or, where the test is
about the wake-up, by another session running the backend's own statement
(``result_set``), as a worker process would.

(Past ~400 lines on purpose: one suite of one backend, whose fixtures every
test shares; a reader looking for "does the backend do X" finds it here.)
"""

from __future__ import annotations

import json
import os
import pickle
import site
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import psycopg
import pytest
from celery import Celery, states
from celery.app.task import Context
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult, GroupResult, ResultSet
from celery_workers import REPO_ROOT, pgbroker_url, wait_for
from psycopg import sql

from pg_broker.maintenance import ResultExpiry
from pg_broker.queries import queries
from pg_broker.results import PgBrokerBackend
from pg_broker.results.store import shared_store
from pg_broker.results.waiting import CHANNEL_PREFIX, channel_name, listener_of

RESULTS_APP = "pg_broker results"


class Boom(Exception):
    """Raised by a 'task' so that its failure can be stored."""


class Payload:
    """A result only pickle can carry."""

    def __init__(self, value: int) -> None:
        self.value = value


def make_app(database_url: str, **conf) -> Celery:
    app = Celery(f"results-{uuid.uuid4().hex[:6]}")
    app.conf.update(
        broker_url=pgbroker_url(database_url),
        result_backend=pgbroker_url(database_url),
        result_extended=True,
        **conf,
    )
    return app


@pytest.fixture
def app(database_url: str, db: psycopg.Connection) -> Iterator[Celery]:
    app = make_app(database_url)
    yield app
    app.close()


def results_sessions(db: psycopg.Connection) -> list[int]:
    """Backend pids of this database's result-backend sessions (writes and reads)."""
    return [row[0] for row in db.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s", (RESULTS_APP,),
    )]


def listen_session(app: Celery) -> int:
    """Backend pid of the LISTEN session this process's result waiters use
    (the one its transports share), once a waiter joined it."""
    session = listener_of(app.backend.store).session
    with session.lock:
        return session.conn.info.backend_pid if session.connected else 0


def waiting_sessions(db: psycopg.Connection, keys: list[str]) -> set[int]:
    """The sessions that recorded these keys as awaited."""
    return {row[0] for row in db.execute(
        "SELECT DISTINCT session FROM task_result_waiters WHERE key = ANY (%s)", (keys,))}


def write_from_elsewhere(database_url: str, backend: PgBrokerBackend, task_id: str,
                         result, state: str = states.SUCCESS) -> None:
    """What a worker process does: the backend's statement on a session of its own."""
    meta = backend._get_result_meta(result=backend.encode_result(result, state),
                                    state=state, traceback=None, request=None)
    meta["task_id"] = task_id
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(queries["result_set"], {
            "key": backend.task_key(task_id), "value": backend.encode(meta).encode(),
            "state": state, "expires": None, "keep_success": True,
        })


def in_thread(target: Callable[[], object]) -> tuple[threading.Thread, list]:
    """Run ``target`` in a daemon thread; its return value (or exception) lands in the list."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(target())
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# States, meta and serializers --------------------------------------------------


def test_states_from_pending_to_success_with_extended_meta(app):
    backend = app.backend
    task_id = str(uuid.uuid4())
    result = AsyncResult(task_id, app=app)
    assert result.state == states.PENDING

    backend.mark_as_started(task_id, pid=123, hostname="w1@host")
    assert result.state == states.STARTED
    assert result.info == {"pid": 123, "hostname": "w1@host"}

    request = Context(id=task_id, task="app.add", args=[2, 3], kwargs={"z": 1},
                      hostname="w1@host", retries=2, delivery_info={"routing_key": "q1"})
    backend.mark_as_done(task_id, 5, request=request)
    result = AsyncResult(task_id, app=app)
    assert (result.state, result.get(timeout=10)) == (states.SUCCESS, 5)
    assert (result.name, result.args, result.kwargs) == ("app.add", [2, 3], {"z": 1})
    assert (result.worker, result.retries, result.queue) == ("w1@host", 2, "q1")
    assert result.date_done is not None


def test_failure_keeps_exception_and_traceback_and_retry_and_revoked_states(app):
    backend = app.backend
    failed, retried, revoked = (str(uuid.uuid4()) for _ in range(3))

    backend.mark_as_failure(failed, Boom("it broke"), traceback="Traceback: line 1")
    backend.mark_as_retry(retried, Boom("again"))
    backend.mark_as_revoked(revoked, reason="revoked by a test")

    result = AsyncResult(failed, app=app)
    with pytest.raises(Boom, match="it broke"):
        result.get(timeout=10)
    assert (result.state, result.traceback) == (states.FAILURE, "Traceback: line 1")
    assert AsyncResult(retried, app=app).state == states.RETRY
    with pytest.raises(TaskRevokedError):
        AsyncResult(revoked, app=app).get(timeout=10)


def test_a_late_copy_of_a_task_never_overwrites_its_success(app, db):
    backend = app.backend
    task_id = str(uuid.uuid4())
    backend.mark_as_done(task_id, "first")

    backend.mark_as_failure(task_id, Boom("a redelivered copy failed"))
    backend.mark_as_started(task_id)

    assert AsyncResult(task_id, app=app).get(timeout=10) == "first"
    assert db.execute("SELECT state FROM task_results WHERE key = %s",
                      (backend.task_key(task_id),)).fetchone() == (states.SUCCESS,)


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_json_and_pickle_results_survive_storing_and_waiting(database_url, db, serializer):
    app = make_app(database_url, result_serializer=serializer,
                   accept_content=["json", "pickle"], result_accept_content=["json", "pickle"])
    value = Payload(7) if serializer == "pickle" else {"nested": [1, "two", None]}
    stored, waited = str(uuid.uuid4()), str(uuid.uuid4())
    app.backend.mark_as_done(stored, value)

    waiter, outcome = in_thread(lambda: AsyncResult(waited, app=app).get(timeout=30))
    wait_for(lambda: waited in str(listener_of(app.backend.store).waiting_for()), 10,
             "the waiter to register")
    app.backend.mark_as_done(waited, value)
    waiter.join(30)

    for got in (AsyncResult(stored, app=app).get(timeout=10), outcome[0]):
        if serializer == "pickle":
            assert isinstance(got, Payload) and got.value == 7
        else:
            assert got == value
    raw = db.execute("SELECT value FROM task_results WHERE key = %s",
                     (app.backend.task_key(stored),)).fetchone()[0]
    if serializer == "pickle":
        assert pickle.loads(raw)["status"] == states.SUCCESS
    else:
        assert json.loads(raw)["status"] == states.SUCCESS


def test_forget_deletes_the_result(app, db):
    task_id = str(uuid.uuid4())
    app.backend.mark_as_done(task_id, 1)
    result = AsyncResult(task_id, app=app)
    assert result.get(timeout=10) == 1

    result.forget()

    assert AsyncResult(task_id, app=app).state == states.PENDING
    assert db.execute("SELECT count(*) FROM task_results").fetchone() == (0,)


def test_expired_results_read_as_pending_and_cleanup_deletes_them(database_url, db):
    app = make_app(database_url, result_expires=timedelta(seconds=1))
    old, kept = str(uuid.uuid4()), str(uuid.uuid4())
    app.backend.mark_as_done(old, "old")
    forever = make_app(database_url, result_expires=None)
    forever.backend.mark_as_done(kept, "kept")
    assert AsyncResult(old, app=app).get(timeout=10) == "old"

    wait_for(lambda: AsyncResult(old, app=app).state == states.PENDING, 10,
             "the result to expire")
    assert db.execute("SELECT count(*) FROM task_results").fetchone() == (2,)
    app.backend.cleanup()  # what Celery's celery.backend_cleanup task calls

    assert db.execute("SELECT key FROM task_results").fetchall() == [
        (forever.backend.task_key(kept),)]
    app.backend.mark_as_done(old, "old again")
    db.execute("UPDATE task_results SET expires_at = now() - interval '1 second'")
    assert ResultExpiry(batch_size=1).run(db) == 2  # retention, in batches
    assert AsyncResult(kept, app=app).state == states.PENDING


def test_beat_cleans_expired_results_through_celery_and_through_the_app_retention(
        database_url, db, broker_env, tmp_path):
    """result_expires honoured under beat: Celery's own schedule gets
    celery.backend_cleanup for this backend (it does not expire by itself),
    and that task, like the tasks app's retention entry, deletes what expired."""
    from celery import beat

    app = make_app(database_url, result_expires=timedelta(hours=1))
    forever = make_app(database_url, result_expires=None)
    kept = str(uuid.uuid4())
    forever.backend.mark_as_done(kept, "kept")
    # `celery beat`'s default scheduler, as it starts
    scheduler = beat.PersistentScheduler(app, schedule_filename=str(tmp_path / "beat"),
                                         lazy=True)
    scheduler.setup_schedule()
    assert scheduler.schedule["celery.backend_cleanup"].task == "celery.backend_cleanup"

    def expired_one() -> str:
        task_id = str(uuid.uuid4())
        app.backend.mark_as_done(task_id, "old")
        db.execute("UPDATE task_results SET expires_at = now() - interval '1 second'"
                   " WHERE key = %s", (app.backend.task_key(task_id),))
        return app.backend.task_key(task_id)

    def keys() -> set[str]:
        return {key for (key,) in db.execute("SELECT key FROM task_results")}

    old = expired_one()
    app.tasks["celery.backend_cleanup"].apply()
    assert keys() == {forever.backend.task_key(kept)}

    old = expired_one()
    entry = "tasks.maintenance.delete_finished_tasks"
    ran = subprocess.run(
        [sys.executable, "-c", "import celeryconfig, tasks.maintenance as m\n"
         f"assert celeryconfig.beat_schedule['retention']['task'] == {entry!r}\n"
         "print(m.delete_finished_tasks())"],
        env=broker_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert int(ran.stdout.strip().splitlines()[-1]) >= 1
    assert old not in keys() and keys() == {forever.backend.task_key(kept)}
    app.close()
    forever.close()


def test_failures_expire_after_result_failure_expires(database_url, db):
    app = make_app(database_url, result_expires=3600, result_failure_expires=60)
    ok, failed = str(uuid.uuid4()), str(uuid.uuid4())
    app.backend.mark_as_done(ok, 1)
    app.backend.mark_as_failure(failed, Boom("x"))

    lifetimes = dict(db.execute(
        "SELECT state, round(extract(epoch FROM expires_at - updated_at)) FROM task_results"))
    assert lifetimes == {states.SUCCESS: 3600, states.FAILURE: 60}


# Pushed waiting -------------------------------------------------------------------


def counted_reads(store, monkeypatch) -> list[int]:
    """One entry per read of the table by ``store`` from now on (alone, or
    pipelined behind LISTENs)."""
    reads: list[int] = []
    mget, listen_and_read = store.mget, store.listen_and_read

    def counted_listen_and_read(conn, listen, unlisten, keys, isolate=False):
        keys = list(keys)
        if keys or listen:
            reads.append(1)
        return listen_and_read(conn, listen, unlisten, keys, isolate)

    monkeypatch.setattr(store, "mget", lambda keys: reads.append(1) or mget(keys))
    monkeypatch.setattr(store, "listen_and_read", counted_listen_and_read)
    return reads


def waiting_after_its_read(app, reads: list[int], task_id: str) -> tuple[threading.Thread, list]:
    """A thread waiting for ``task_id``, once it read the table (in the round
    trip of its LISTEN); then it waits: Celery's drainer calls
    drain_events(timeout=1) again and again, none of which may read."""
    store = app.backend.store
    waiter, outcome = in_thread(lambda: AsyncResult(task_id, app=app).get(timeout=60))
    wait_for(lambda: app.backend.task_key(task_id) in listener_of(store).waiting_for(), 10,
             "the waiter to register")
    wait_for(lambda: len(reads) == 1, 10, "the waiter's read")
    time.sleep(2.5)
    assert len(reads) == 1, "the waiter read the table while waiting: polling"
    return waiter, outcome


def test_a_waiter_takes_its_result_from_the_notification_without_reading(
        app, database_url, monkeypatch):
    reads = counted_reads(app.backend.store, monkeypatch)
    task_id = str(uuid.uuid4())
    waiter, outcome = waiting_after_its_read(app, reads, task_id)

    write_from_elsewhere(database_url, app.backend, task_id, "pushed")
    waiter.join(30)

    assert outcome == ["pushed"]
    assert len(reads) == 1  # the value came in the notification


def test_a_result_too_large_for_a_notification_is_read_from_its_row(
        app, database_url, monkeypatch):
    reads = counted_reads(app.backend.store, monkeypatch)
    task_id = str(uuid.uuid4())
    waiter, outcome = waiting_after_its_read(app, reads, task_id)
    large = "x" * 20_000  # over NOTIFY's 8,000-byte payload, base64 or not

    write_from_elsewhere(database_url, app.backend, task_id, large)
    waiter.join(30)

    assert outcome == [large]
    assert len(reads) == 2  # the one read its empty notification asked for


def test_values_notified_by_a_session_that_wrote_no_row_are_taken_unless_distrusted(
        database_url, db, monkeypatch):
    """Any session can NOTIFY: a value notified without a row is taken by
    default (the round trip saved), and never with notified_values=False,
    which reads the row (here: none, so the waiter still waits)."""
    import base64

    def forge(app, task_id: str) -> None:
        meta = {"status": states.SUCCESS, "result": "forged", "traceback": None,
                "children": [], "date_done": None, "task_id": task_id}
        payload = base64.b64encode(json.dumps(meta).encode()).decode()
        db.execute("SELECT pg_notify(%s, %s)",
                   (channel_name(app.backend.task_key(task_id)), payload))

    trusting = make_app(database_url)
    try:
        task_id = str(uuid.uuid4())
        waiter, outcome = waiting_after_its_read(
            trusting, counted_reads(trusting.backend.store, monkeypatch), task_id)
        forge(trusting, task_id)
        waiter.join(30)
        assert outcome == ["forged"]
    finally:
        trusting.close()

    # A store of its own (another conninfo): distrust sticks to a process's store.
    distrusting = make_app(database_url,
                           result_backend_transport_options={"notified_values": "false"})
    url = pgbroker_url(database_url)
    distrusting.conf.result_backend = f"{url}{'&' if '?' in url else '?'}connect_timeout=17"
    try:
        task_id = str(uuid.uuid4())
        reads = counted_reads(distrusting.backend.store, monkeypatch)
        waiter, outcome = waiting_after_its_read(distrusting, reads, task_id)
        forge(distrusting, task_id)
        wait_for(lambda: len(reads) == 2, 10, "the read the notification asked for")
        assert outcome == [] and waiter.is_alive()
        write_from_elsewhere(database_url, distrusting.backend, task_id, "written")
        waiter.join(30)
        assert outcome == ["written"]
    finally:
        distrusting.backend.store.close()
        distrusting.close()


def test_a_thousand_waiters_in_twenty_threads_share_one_connection(app, database_url, db):
    ids = [[str(uuid.uuid4()) for _ in range(50)] for _ in range(20)]

    def join(batch: list[str]):
        return ResultSet([AsyncResult(i, app=app) for i in batch]).join_native(timeout=120)

    waiters = [in_thread(lambda batch=batch: join(batch)) for batch in ids]
    listener = listener_of(app.backend.store)
    keys = [app.backend.task_key(i) for batch in ids for i in batch]
    wait_for(lambda: len(listener.waiting_for()) == 1000, 60,
             lambda: f"1000 waiters; {len(listener.waiting_for())} registered")
    wait_for(lambda: db.execute("SELECT count(*) FROM task_result_waiters WHERE key = ANY (%s)",
                                (keys,)).fetchone()[0] == 1000, 60, "1000 records")
    assert waiting_sessions(db, keys) == {listen_session(app)}  # one session LISTENs and records
    with psycopg.connect(database_url, autocommit=True) as worker:
        for n, batch in enumerate(ids):
            for m, task_id in enumerate(batch):
                meta = {"status": "SUCCESS", "result": n * 100 + m, "traceback": None,
                        "children": [], "date_done": None, "task_id": task_id}
                worker.execute(queries["result_set"], {
                    "key": app.backend.task_key(task_id), "value": app.backend.encode(meta).encode(),
                    "state": "SUCCESS", "expires": None, "keep_success": True,
                })
    for n, (thread, outcome) in enumerate(waiters):
        thread.join(120)
        assert outcome == [[n * 100 + m for m in range(50)]]
    assert listener.waiting_for() == set()


def _result_set_params(backend: PgBrokerBackend, task_id: str, result) -> dict:
    meta = {"status": states.SUCCESS, "result": result, "traceback": None, "children": [],
            "date_done": None, "task_id": task_id}
    return {"key": backend.task_key(task_id), "value": backend.encode(meta).encode(),
            "state": states.SUCCESS, "expires": None, "keep_success": True}


def _waiting_for_an_awaited_key(db: psycopg.Connection, pids: list[int] | None = None) -> bool:
    """Whether a session of this database (of ``pids``) waits for the lock of
    an awaited key (migrations/core/200: 1885823602)."""
    return bool(db.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        " WHERE l.locktype = 'advisory' AND l.classid = 1885823602 AND NOT l.granted"
        " AND d.datname = current_database() AND (%(pids)s::int[] IS NULL"
        " OR l.pid = ANY (%(pids)s::int[])))", {"pids": pids}).fetchone()[0])


def test_a_result_no_session_awaits_is_written_without_a_notification(app, database_url):
    # Every NOTIFY signals every LISTENing session of the database: a result
    # nobody awaits (a stream of tasks, a chord's parts) sends none.
    backend = app.backend
    unawaited, awaited = str(uuid.uuid4()), str(uuid.uuid4())
    channels = {i: channel_name(backend.task_key(i)) for i in (unawaited, awaited)}
    with psycopg.connect(database_url, autocommit=True) as listener:
        for channel in channels.values():  # LISTENs on both, records one
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        listener.execute(queries["result_await"], {"keys": [backend.task_key(awaited)]})
        write_from_elsewhere(database_url, backend, unawaited, "unheard")
        write_from_elsewhere(database_url, backend, awaited, "heard")

        heard = [n.channel for n in listener.notifies(timeout=2, stop_after=2)]

    assert heard == [channels[awaited]]
    assert AsyncResult(unawaited, app=app).get(timeout=10) == "unheard"  # stored all the same


# The write of the next test, in a process of its own: it holds its transaction
# open until it sees the waiter wait for its key's lock, then commits. (In a
# thread of the test's process the commit could wait for the interpreter lock
# while the waiter's thread waits for the database inside libpq.)
_WRITE_AND_HOLD = """
import sys, time, psycopg
url, key, value, query = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), sys.argv[4]
with psycopg.connect(url) as writer, psycopg.connect(url, autocommit=True) as watcher:
    writer.execute(query, {"key": key, "value": value, "state": "SUCCESS", "expires": None,
                           "keep_success": True})
    print("written", flush=True)
    deadline = time.monotonic() + 20
    while not watcher.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.classid = 1885823602 AND NOT l.granted"
            " AND a.datname = current_database())").fetchone()[0]:
        if time.monotonic() > deadline:
            sys.exit(3)  # the waiter never waited for this write's commit
        time.sleep(0.05)
    writer.commit()
"""


def test_a_waiter_recording_itself_while_a_write_commits_reads_that_write(app, database_url):
    """The write came first (no record yet, so no notification) and has not
    committed: the waiter's record waits for that commit (the key's lock),
    and its read, after it, sees the result."""
    task_id = str(uuid.uuid4())
    params = _result_set_params(app.backend, task_id, "raced")
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITE_AND_HOLD, database_url, params["key"],
         params["value"].hex(), queries["result_set"]],
        stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "written"
        outcome = AsyncResult(task_id, app=app).get(timeout=15)
        assert writer.wait(30) == 0  # it saw the waiter wait for its commit
    finally:
        writer.kill()
        writer.wait()

    assert outcome == "raced"


def test_a_write_while_a_waiter_records_itself_notifies_it(app, database_url, db):
    """The waiter recorded its key and has not committed: the write waits for
    that commit (the key's lock), then finds the record and notifies."""
    backend = app.backend
    task_id = str(uuid.uuid4())
    channel = channel_name(backend.task_key(task_id))
    with psycopg.connect(database_url, autocommit=True) as waiter:
        waiter.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        waiter.execute("BEGIN")
        waiter.execute(queries["result_await"], {"keys": [backend.task_key(task_id)]})
        writer, outcome = in_thread(
            lambda: write_from_elsewhere(database_url, backend, task_id, "heard"))
        wait_for(lambda: _waiting_for_an_awaited_key(db), 10,
                 "the write to wait for the waiter's commit")
        waiter.execute("COMMIT")
        writer.join(30)

        heard = [n.channel for n in waiter.notifies(timeout=5, stop_after=1)]

    assert outcome == [None] and heard == [channel]


def test_a_join_hands_out_its_results_without_a_yield_per_result(app, monkeypatch):
    # Celery's consumer ends each result with sleep(0), for greenlet
    # drainers; with threads it gives the CPU away once per result (a
    # chord's join of 100: 100 times).
    import celery.backends.asynchronous

    ids = [str(uuid.uuid4()) for _ in range(100)]
    for n, task_id in enumerate(ids):
        app.backend.mark_as_done(task_id, n)
    sleeps: list[float] = []
    monkeypatch.setattr(celery.backends.asynchronous, "sleep", sleeps.append)

    values = ResultSet([AsyncResult(i, app=app) for i in ids]).join_native(timeout=30)

    assert values == list(range(100))
    assert sleeps == []


def test_a_result_ready_before_its_wait_is_read_without_a_record(app, db):
    # A chord's last part joins a header of finished results: no records,
    # no locks for them.
    ready, started = str(uuid.uuid4()), str(uuid.uuid4())
    app.backend.mark_as_done(ready, "ready")
    app.backend.store_result(started, None, states.STARTED)
    listener = listener_of(app.backend.store)
    consumer = app.backend.result_consumer

    keys = [app.backend.task_key(i) for i in (ready, started)]

    listener.check(consumer, keys)
    for key in keys:  # the process's store is shared with the next tests
        listener.cancel(consumer, key)

    assert [row[0] for row in db.execute(
        "SELECT key FROM task_result_waiters WHERE key = ANY (%s)", (keys,))] == [keys[1]]
    assert AsyncResult(ready, app=app).get(timeout=10) == "ready"


def test_records_of_ended_waiting_sessions_leave_with_the_retention(app, database_url, db):
    backend = app.backend
    task_id = str(uuid.uuid4())
    with psycopg.connect(database_url, autocommit=True) as waiter:
        waiter.execute(queries["result_await"], {"keys": [backend.task_key(task_id)]})
        ResultExpiry().run(db)
        assert db.execute("SELECT count(*) FROM task_result_waiters WHERE key = %s",
                          (backend.task_key(task_id),)).fetchone()[0] == 1
        pid = waiter.info.backend_pid
    wait_for(lambda: not db.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                    (pid,)).fetchone(), 10, "the waiting session to end")
    ResultExpiry().run(db)

    assert db.execute("SELECT count(*) FROM task_result_waiters WHERE key = %s",
                      (backend.task_key(task_id),)).fetchone()[0] == 0


def _listening(store) -> set[str]:
    """The result channels the process's LISTEN session listens on."""
    session = listener_of(store).session
    with session.lock:
        if not session.connected:
            return set()
        return {row[0] for row in session.conn.execute("SELECT pg_listening_channels()")
                if row[0].startswith(CHANNEL_PREFIX)}


def test_a_result_got_or_forgotten_is_unlistened_with_the_next_batch(app, database_url):
    # Celery's own suite checks this of Redis's pub/sub (test_asyncresult_get_
    # cancels_subscription, ..._forget_...); it skips them on other backends.
    backend, store = app.backend, app.backend.store
    got, forgotten, third = (str(uuid.uuid4()) for _ in range(3))
    waiter, outcome = in_thread(lambda: AsyncResult(got, app=app).get(timeout=60))
    wait_for(lambda: channel_name(backend.task_key(got)) in _listening(store), 10,
             "the waiter to LISTEN")
    write_from_elsewhere(database_url, backend, got, "got")
    waiter.join(30)
    assert outcome == ["got"]

    result = AsyncResult(forgotten, app=app)
    result.then(lambda r: None)  # waits for it (a callback), without a get()
    backend.listener.drain(0)  # that wait's LISTEN goes out with the next batch
    assert channel_name(backend.task_key(forgotten)) in _listening(store)
    result.forget()
    waiter, outcome = in_thread(lambda: AsyncResult(third, app=app).get(timeout=60))
    wait_for(lambda: channel_name(backend.task_key(third)) in _listening(store), 10,
             "the third waiter to LISTEN")

    listening = _listening(store)
    assert listening == {channel_name(backend.task_key(third))}, (len(listening), listening)
    write_from_elsewhere(database_url, backend, third, "third")
    waiter.join(30)
    assert outcome == ["third"]


def test_a_result_written_while_the_connection_was_down_still_wakes_its_waiter(
    app, database_url, db,
):
    backend = app.backend
    task_id = str(uuid.uuid4())
    waiter, outcome = in_thread(lambda: AsyncResult(task_id, app=app).get(timeout=60))
    key = backend.task_key(task_id)
    wait_for(lambda: waiting_sessions(db, [key]), 10, "the waiter to LISTEN")
    (session,) = waiting_sessions(db, [key])
    assert session == listen_session(app)

    db.execute("SELECT pg_terminate_backend(%s)", (session,))
    # Nobody LISTENs now: this notification is lost; only the re-read after
    # reconnecting can find the result.
    write_from_elsewhere(database_url, backend, task_id, "after the outage")
    waiter.join(60)

    assert outcome == ["after the outage"]
    assert listen_session(app) not in (0, session)


def test_a_store_whose_session_was_ended_stores_on_a_new_one(app, db):
    # A worker idle through a database restart: its first result after it
    # must be stored, not fail the task.
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    app.backend.mark_as_done(first, 1)
    (session,) = results_sessions(db)
    db.execute("SELECT pg_terminate_backend(%s)", (session,))
    wait_for(lambda: session not in results_sessions(db), 10, "the session to end")

    app.backend.mark_as_done(second, 2)

    assert AsyncResult(second, app=app).get(timeout=10) == 2
    assert results_sessions(db) not in ([], [session])


def test_revocation_written_by_a_worker_wakes_the_waiter(app, database_url):
    task_id = str(uuid.uuid4())
    waiter, outcome = in_thread(lambda: AsyncResult(task_id, app=app).get(timeout=60))
    wait_for(lambda: app.backend.task_key(task_id) in listener_of(app.backend.store).waiting_for(),
             10, "the waiter to register")

    write_from_elsewhere(database_url, app.backend, task_id, TaskRevokedError("revoked"),
                         states.REVOKED)
    waiter.join(30)

    assert len(outcome) == 1 and isinstance(outcome[0], TaskRevokedError)


def test_a_forked_child_waits_on_a_connection_of_its_own(app, db):
    parent_id, child_id = str(uuid.uuid4()), str(uuid.uuid4())
    app.backend.mark_as_done(parent_id, "parent")
    assert AsyncResult(parent_id, app=app).get(timeout=10) == "parent"
    (parent_session,) = results_sessions(db)
    parent_listen = listen_session(app)
    app.backend.mark_as_done(child_id, "child")

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if AsyncResult(child_id, app=app).get(timeout=20) == "child" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert parent_session in results_sessions(db)  # the child never closed them
    assert listen_session(app) == parent_listen
    other = str(uuid.uuid4())
    app.backend.mark_as_done(other, "still works")
    assert AsyncResult(other, app=app).get(timeout=10) == "still works"


# Chords --------------------------------------------------------------------------


def test_chord_parts_are_counted_once_and_one_caller_claims_under_concurrency(
    database_url, db,
):
    key, size = f"chord-unlock-{uuid.uuid4()}", 40
    parts = [f"task-{n}:{n}" for n in range(size)]
    claims: list[tuple[str, bool]] = []
    barrier = threading.Barrier(8)

    def count(offset: int) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            barrier.wait()
            # Every part three times over the eight sessions: duplicates too.
            for part in parts[offset::8] + parts[(offset + 3) % 8::8] + parts[(offset + 5) % 8::8]:
                claimed = conn.execute(queries["result_chord_part_returned"], {
                    "key": key, "part": part, "size": size, "claimer": f"{offset}-{part}",
                    "claim": timedelta(hours=1), "expires": timedelta(hours=1),
                }).fetchone()[1]
                claims.append((part, claimed))

    threads = [threading.Thread(target=count, args=(offset,)) for offset in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(claims) == 3 * size
    assert sum(claimed for _, claimed in claims) == 1
    assert db.execute("SELECT parts, claimed_until IS NOT NULL FROM task_result_chords"
                      " WHERE key = %s", (key,)).fetchone() == (size, True)
    assert db.execute("SELECT count(*) FROM task_result_chord_parts WHERE chord = %s",
                      (key,)).fetchone() == (size,)


def test_a_redelivered_last_part_takes_the_chord_over_once_the_hold_expires(app, db):
    store = app.backend.store
    key = f"chord-unlock-{uuid.uuid4()}"
    store.chord_size(key, 2, None)
    assert store.chord_part_returned(key, "a:0", None, "w1", 0.5, None) == (1, False, 2)
    assert store.chord_part_returned(key, "b:1", None, "w2", 0.5, None) == (2, True, 2)
    # Asked again by the same caller (a retry after a lost connection): still its.
    assert store.chord_part_returned(key, "b:1", None, "w2", 3600, None) == (2, True, 2)
    assert store.chord_part_returned(key, "b:1", None, "w3", 0.5, None) == (2, False, 2)

    # The holder died without sending the callback: its part comes again.
    wait_for(lambda: store.chord_part_returned(key, "b:1", None, "w4", 0.5, None)[1], 10,
             "the hold to expire")
    store.chord_done(key)
    assert store.chord_part_returned(key, "b:1", None, "w5", 0.5, None) == (0, False, 2)
    # The same frozen chord applied again counts afresh.
    store.chord_size(key, 2, None)
    assert store.chord_part_returned(key, "a:0", None, "w6", 0.5, None) == (1, False, 2)
    assert store.chord_part_returned(key, "b:1", None, "w7", 0.5, None) == (2, True, 2)


def _callback_rows(db: psycopg.Connection, name: str) -> list[tuple]:
    return db.execute("SELECT payload -> 'headers' -> 'argsrepr' FROM job_tasks"
                      " WHERE task_type = %s", (name,)).fetchall()


def test_a_chord_whose_parts_return_twice_sends_its_callback_once(app, db):
    @app.task(name="results.tsum", shared=False)
    def tsum(values):
        return sum(values)

    @app.task(name="results.add", shared=False)
    def add(x, y):
        return x + y

    backend = app.backend
    gid = str(uuid.uuid4())
    header_ids = [str(uuid.uuid4()) for _ in range(5)]
    header = GroupResult(gid, [AsyncResult(i, app=app) for i in header_ids], app=app)
    callback = tsum.s().set(queue="results-callbacks")
    backend.apply_chord((gid, header.results), callback)
    backend.set_chord_size(gid, len(header_ids))

    def part_returns(index: int) -> None:
        request = Context(id=header_ids[index], group=gid, group_index=index,
                          chord=dict(callback), task="results.add", delivery_info={})
        backend.mark_as_done(header_ids[index], index * 10, request=request)

    for index in range(4):
        part_returns(index)
        part_returns(index)  # delivered twice: counted once
    assert _callback_rows(db, "results.tsum") == []
    part_returns(4)
    part_returns(4)
    part_returns(0)

    assert _callback_rows(db, "results.tsum") == [("([0, 10, 20, 30, 40],)",)]
    assert db.execute("SELECT done, parts FROM task_result_chords").fetchall() == [(True, 0)]


def test_the_last_part_reads_the_header_without_a_join_in_header_order(
        app, db, monkeypatch):
    """As Celery's Redis backend reads its chord's list: no join (a LISTEN
    per header result and Celery's hand-out); parts returning out of order
    give their values in header order, and a failed part fails the chord
    with its own exception."""
    @app.task(name="results.tsum", shared=False)
    def tsum(values):
        return sum(values)

    backend = app.backend
    checks = []
    check = listener_of(backend.store).check
    monkeypatch.setattr(listener_of(backend.store), "check",
                        lambda *a: checks.append(a) or check(*a))
    errors = []
    monkeypatch.setattr(backend, "chord_error_from_stack",
                        lambda callback, exc: errors.append(exc))

    def chord_of(values: list) -> None:
        gid = str(uuid.uuid4())
        ids = [str(uuid.uuid4()) for _ in values]
        callback = tsum.s().set(queue="results-callbacks")
        backend.apply_chord((gid, [AsyncResult(i, app=app) for i in ids]), callback)
        backend.set_chord_size(gid, len(ids))
        for index in reversed(range(len(values))):
            request = Context(id=ids[index], group=gid, group_index=index,
                              chord=dict(callback), task="results.add", delivery_info={})
            if isinstance(values[index], Exception):
                backend.mark_as_failure(ids[index], values[index], request=request)
            else:
                backend.mark_as_done(ids[index], values[index], request=request)

    chord_of([1, 20, 300])
    assert _callback_rows(db, "results.tsum") == [("([1, 20, 300],)",)]
    chord_of([1, Boom("part 1"), 300])
    assert len(errors) == 1 and "Boom('part 1')" in str(errors[0])
    assert isinstance(errors[0].__cause__, Boom)
    assert checks == []


def test_a_header_part_stores_its_result_and_counts_itself_in_one_statement(
        app, db, monkeypatch):
    backend = app.backend
    gid = str(uuid.uuid4())
    header_ids = [str(uuid.uuid4()) for _ in range(2)]
    backend.set_chord_size(gid, len(header_ids))
    statements: list[str] = []
    once = backend.store._once
    monkeypatch.setattr(backend.store, "_once",
                        lambda query, params: statements.append(query) or once(query, params))
    request = Context(id=header_ids[0], group=gid, group_index=0,
                      chord=dict(app.signature("results.never")), delivery_info={})

    backend.mark_as_done(header_ids[0], 7, request=request)

    assert statements == [queries["result_chord_part_stored"]]
    assert AsyncResult(header_ids[0], app=app).get(timeout=10) == 7
    assert db.execute("SELECT parts, done FROM task_result_chords WHERE key = %s",
                      (backend.get_key_for_chord(gid).decode(),)).fetchone() == (1, False)


# Configuration ------------------------------------------------------------------


def test_the_scheme_resolves_through_the_entry_point_without_importing_pg_broker(database_url):
    # -S: site-packages on the path, but its .pth files unread (pg_broker.pth
    # would import pg_broker); the repository, the cwd, stands in for the
    # editable install's path hook.
    code = (
        f"import sys; sys.path += {site.getsitepackages()!r}; from celery import Celery\n"
        f"app = Celery(backend={pgbroker_url(database_url)!r})\n"
        "assert 'pg_broker' not in sys.modules\n"
        "backend = app.backend  # Celery finds it through the entry point\n"
        "print(type(backend).__module__, type(backend).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pg_broker.results.backend", "PgBrokerBackend"]


def test_bare_scheme_is_the_broker_database_and_libpq_parameters_pass_through(
    database_url, db, monkeypatch,
):
    separator = "&" if "?" in database_url else "?"
    monkeypatch.setenv("PG_BROKER_URL", f"{database_url}{separator}application_name=results-probe")
    app = Celery("bare", backend="pgbroker://")
    app.backend.mark_as_done("bare-1", "here")

    assert app.backend.as_uri() == "pgbroker://"
    assert db.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                      ("results-probe",)).fetchone() == (1,)
    shared_store(app.backend.store.conninfo, app.backend.synchronous_commit).close()
    masked = PgBrokerBackend(app=app, url="pgbroker://user:secret@db.example/app?sslmode=require")
    assert masked.as_uri() == "pgbroker://user:**@db.example/app?sslmode=require"
    assert "secret" in masked.as_uri(include_password=True)
