"""Applies ``migrations/NNN_name.sql`` in order, each once, each in its own
transaction, under an advisory lock so that processes starting together
(worker, beat, Flower, a producer) migrate one at a time."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

from pg_broker.database import connect

log = logging.getLogger(__name__)

MIGRATIONS_DIR_VARIABLE = "PG_BROKER_MIGRATIONS_DIR"
# Arbitrary constant: pg_advisory_lock key for "pg_broker migrations".
ADVISORY_LOCK_KEY = 7_283_640_111
_FILE_PATTERN = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")

_migrated_urls: set[str] = set()


class MigrationFailed(RuntimeError):
    """A migration raised an error; none of it was applied. The message names
    the file, PostgreSQL's reason and its hint."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def migrations_dir() -> Path:
    """``PG_BROKER_MIGRATIONS_DIR``, else the checkout's ``migrations/`` (an
    editable install), else the copy a regular install puts under
    ``<prefix>/share/pg_broker/migrations``."""
    configured = os.environ.get(MIGRATIONS_DIR_VARIABLE)
    if configured:
        return Path(configured)
    checkout = Path(__file__).resolve().parent.parent / "migrations"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "pg_broker" / "migrations"


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_PATTERN.match(path.name)
        if not match:
            raise ValueError(f"migration file {path.name} is not named NNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a number in {directory}")
    return found


def migrate(url: str, directory: Path | None = None) -> list[Migration]:
    """Apply every migration not yet applied; return those applied now."""
    pending_applied: list[Migration] = []
    with connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS pg_broker_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       checksum   text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            applied = dict(conn.execute("SELECT version, checksum FROM pg_broker_migrations"))
            for migration in discover(directory):
                if migration.version in applied:
                    if applied[migration.version] != migration.checksum:
                        log.warning(
                            "migration %03d_%s changed after it was applied; "
                            "migrations are never edited, add a new one",
                            migration.version, migration.name,
                        )
                    continue
                _apply(conn, migration)
                pending_applied.append(migration)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    _migrated_urls.add(url)
    return pending_applied


def ensure_migrated(url: str) -> None:
    """Migrate once per process per URL: the cheap call for every start-up path."""
    if url not in _migrated_urls:
        migrate(url)


def applied_versions(conn: psycopg.Connection) -> list[tuple[int, str]]:
    return list(conn.execute("SELECT version, name FROM pg_broker_migrations ORDER BY version"))


def _apply(conn: psycopg.Connection, migration: Migration) -> None:
    log.info("applying migration %03d_%s", migration.version, migration.name)
    try:
        with conn.transaction():
            conn.execute(migration.sql)
            conn.execute(
                "INSERT INTO pg_broker_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
    except psycopg.Error as exc:
        diag = exc.diag
        reason = diag.message_primary or str(exc).strip().splitlines()[0]
        hint = f" ({diag.message_hint})" if diag.message_hint else ""
        raise MigrationFailed(
            f"migration {migration.path.name} failed and was rolled back: {reason}{hint}"
        ) from exc
