"""``pg-broker token`` and ``pg-broker api``: what they refuse and why."""

from __future__ import annotations

import uuid

import pytest

from pg_broker.cli import main
from tasks.api.auth import DEV_SECRET, Verifier

USER = uuid.UUID("00000000-0000-4000-8000-0000000000e1")


@pytest.fixture(autouse=True)
def no_supabase(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SUPABASE_JWT_SECRET", "SUPABASE_URL"):
        monkeypatch.delenv(name, raising=False)


def test_token_refuses_without_a_secret_and_signs_with_the_configured_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "--user", str(USER)]) == 2
    assert "set SUPABASE_JWT_SECRET" in capsys.readouterr().err

    monkeypatch.setenv("SUPABASE_JWT_SECRET", "project-secret-of-thirty-two-bytes!!")
    assert main(["token", "--user", str(USER), "--expires-in", "60"]) == 0
    token = capsys.readouterr().out.strip()
    assert Verifier(secret="project-secret-of-thirty-two-bytes!!").user_id(token) == USER
    assert main(["token", "--dev", "--user", str(USER)]) == 0
    assert Verifier(secret=DEV_SECRET).user_id(capsys.readouterr().out.strip()) == USER


def test_api_refuses_to_start_without_a_way_to_check_tokens(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["api", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "SUPABASE_JWT_SECRET" in err and "--dev" in err


def test_dev_mode_refuses_a_configured_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SUPABASE_JWT_SECRET", "project-secret-of-thirty-two-bytes!!")
    assert main(["api", "--dev", "--port", "1"]) == 2
    assert "unset SUPABASE_JWT_SECRET" in capsys.readouterr().err
