"""The named-statement file and its loader: every statement named once, each
with a description, every name the code asks for defined, none left unused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pg_broker.queries import load, queries

REPO_ROOT = Path(__file__).resolve().parents[2]
# Every ``queries["name"]`` (or a name passed on to code that looks it up).
_ASKED = re.compile(r"""queries\[["']([a-z0-9_]+)["']\]|["'](transport_[a-z0-9_]+)["']""")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "queries.sql"
    path.write_text(text)
    return path


def test_a_statement_is_its_text_without_comments_or_the_final_semicolon(tmp_path: Path) -> None:
    path = _write(tmp_path, "-- a file header\n\n-- name: one\n-- Says one.\nSELECT 1\n"
                            "-- a comment inside\n  FROM t;\n\n-- name: two\n-- Says two.\nSELECT 2;\n")
    assert load(path) == {"one": "SELECT 1\n  FROM t", "two": "SELECT 2"}


def test_a_statement_without_a_description_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "-- name: bare\nSELECT 1;\n")
    with pytest.raises(ValueError, match="query 'bare' in queries.sql has no description line"):
        load(path)


def test_a_name_defined_twice_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "-- name: twice\n-- One.\nSELECT 1;\n-- name: twice\n-- Two.\nSELECT 2;\n")
    with pytest.raises(ValueError, match="query 'twice' is defined twice"):
        load(path)


def _asked_for() -> set[str]:
    names: set[str] = set()
    for folder in ("pg_broker", "tasks"):
        for source in (REPO_ROOT / folder).rglob("*.py"):
            for match in _ASKED.finditer(source.read_text(encoding="utf-8")):
                names.add(match.group(1) or match.group(2))
    return names


def test_every_statement_the_code_asks_for_is_defined() -> None:
    assert _asked_for() - set(queries) == set()


def test_every_defined_statement_is_used_by_the_code() -> None:
    assert set(queries) - _asked_for() == set()

