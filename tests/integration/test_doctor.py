"""``pg-broker doctor``: every check passes on a sound set-up, and each
problem is reported as FAIL (or warn) with its fix and a non-zero exit."""

from __future__ import annotations

import time

import psycopg
import pytest
from supabase_fake import KEY, serve_fake_supabase
from test_migration_tracks import build_legacy

from pg_broker import doctor
from pg_broker.cli import main
from pg_broker.migrate import migrate


@pytest.fixture
def env(database_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PG_BROKER_URL", database_url)
    monkeypatch.setenv("PG_BROKER_STORAGE_DIR", str(tmp_path / "artifacts"))
    for name in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "CELERY_BROKER_URL",
                 "PG_BROKER_LISTEN_URL"):
        monkeypatch.delenv(name, raising=False)
    return database_url


def _statuses(results: list[tuple[str, doctor.Result]]) -> dict[str, str]:
    return {name: result.status for name, result in results}


def test_a_sound_set_up_passes_every_check_and_exits_0(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["ok"] * len(doctor.CHECKS)
    for name, _ in doctor.CHECKS:
        assert name in out
    assert "LISTEN/NOTIFY round trip" in out


def test_an_unreachable_database_fails_with_its_fix_and_skips_what_needs_it(
    env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PG_BROKER_URL", "postgresql://nobody:secret@127.0.0.1:1/none")
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  database" in out and "fix: start the server" in out
    assert "secret" not in out  # passwords masked
    for name in ("migrations", "supabase layer", "listen/notify", "clock"):
        assert f"skip  {name}" in out


def test_a_database_not_migrated_fails_with_pg_broker_migrate(
    env: str, empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_BROKER_URL", empty_database)
    results = dict(doctor.run())
    assert results["migrations"].status == "FAIL"
    assert results["migrations"].fix == "pg-broker migrate"
    assert "core/100_broker_schema.sql" in results["migrations"].message
    # The layer is optional: a database that does not look like Supabase is told how to add it.
    assert results["supabase layer"].status == "skip"
    assert "pg-broker migrate --supabase" in results["supabase layer"].message


def test_a_database_of_the_single_track_runner_is_told_to_migrate(
    env: str, empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_legacy(empty_database, 5)
    monkeypatch.setenv("PG_BROKER_URL", empty_database)
    results = dict(doctor.run())
    assert results["migrations"].status == "FAIL"
    assert "from before the migration tracks" in results["migrations"].message
    assert results["migrations"].fix.startswith("pg-broker migrate")
    # That schema had the Supabase layer; only submit_job() is new.
    assert results["supabase layer"].message == "missing: submit_job()"
    migrate(empty_database)
    results = dict(doctor.run())
    assert (results["migrations"].status, results["supabase layer"].status) == ("ok", "ok")


def test_a_lost_notification_fails_the_listen_check_with_the_pooler_fix(
    env: str, empty_database: str
) -> None:
    # The notification goes out on a session of another database, as a
    # transaction pooler may hand LISTEN and NOTIFY to unrelated sessions.
    ctx = doctor.Context(url=env, notify_timeout=0.5)
    ctx.conn = psycopg.connect(empty_database, autocommit=True)
    (_, result), = doctor.run(ctx, [("listen/notify", doctor.check_listen)])
    assert result.status == "FAIL"
    assert "did not reach another" in result.message and "session mode" in result.fix


def test_without_pg_broker_pth_the_scheme_check_warns_what_a_celery_app_will_meet(
    tmp_path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    here = doctor.check_scheme(doctor.Context())
    assert here.status == doctor.OK, f"{here.message}: a venv made before setup.py installed " \
        "pg_broker.pth needs pip install -e '.[test]' again"
    monkeypatch.setattr(doctor.site, "getsitepackages", lambda: [str(tmp_path)])
    monkeypatch.setattr(doctor.site, "getusersitepackages", lambda: str(tmp_path / "user"))

    result = doctor.check_scheme(doctor.Context())

    assert result.status == doctor.WARN
    assert "No such transport: pgbroker" in result.message
    assert "import pg_broker" in result.fix


def test_clock_skew_warns_past_a_second_and_fails_past_thirty(env: str) -> None:
    for offset, expected in ((0.0, "ok"), (5.0, "warn"), (-120.0, "FAIL")):
        ctx = doctor.Context(clock=lambda offset=offset: time.time() + offset)
        statuses = _statuses(doctor.run(ctx, doctor.CHECKS[:2] + [("clock", doctor.check_clock)]))
        assert statuses["clock"] == expected, offset
    assert "ahead of this host" in dict(doctor.run(
        doctor.Context(clock=lambda: time.time() - 120),
        doctor.CHECKS[:2] + [("clock", doctor.check_clock)]))["clock"].message


def test_storage_checks_the_supabase_bucket_is_there_and_private(
    env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage_check = [("storage", doctor.check_storage)]
    with serve_fake_supabase() as (url, state):
        monkeypatch.setenv("SUPABASE_URL", url)
        monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", KEY)
        (_, missing), = doctor.run(doctor.Context(), storage_check)
        assert missing.status == "FAIL" and "bucket unavailable" in missing.message
        state.buckets["job-artifacts"] = {
            "id": "job-artifacts", "name": "job-artifacts", "owner": "", "public": True,
            "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z",
            "file_size_limit": None, "allowed_mime_types": None}
        (_, public), = doctor.run(doctor.Context(), storage_check)
        assert public.status == "FAIL" and "is public" in public.message
        state.buckets["job-artifacts"]["public"] = False
        (_, private), = doctor.run(doctor.Context(), storage_check)
        assert private.status == "ok"
    monkeypatch.delenv("SUPABASE_SERVICE_ROLE_KEY")
    assert _statuses(doctor.run(doctor.Context(), doctor.CHECKS[:1]))["configuration"] == "warn"
