"""Applies the schema's migrations: two tracks, each file once, in the order
of their numbers, each in its own transaction, under an advisory lock so that
processes starting together (worker, beat, Flower, a producer) migrate one at
a time.

``migrations/core/`` is the broker's schema, which any role that may create
tables in its schema can install; ``migrations/supabase/`` is the
Supabase/RLS layer (roles, ``auth.uid()``, row-level security, grants), applied
when asked (``supabase=True``, ``pg-broker migrate --supabase``), once applied
before, or where the database looks like Supabase. Numbers are shared by the
two tracks, start at 100 and give the order. A layer file that fails does
not stop the core files after it: the broker works without the layer, and the
error comes at the end (:class:`LayerFailed`).

``migrations/legacy/`` holds the single-track files (numbered below 100) of
databases migrated before the split. Such a database is completed from
there, then every track
file whose header says ``-- legacy: …`` (the baselines, which build what the
legacy files built) is recorded as applied without running, and the rest
applies as anywhere else. ``migrations/README.md`` has the rules for adding a
file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from pg_broker.database import connect
from pg_broker.queries import queries

log = logging.getLogger(__name__)

MIGRATIONS_DIR_VARIABLE = "PG_BROKER_MIGRATIONS_DIR"
CORE = "core"
SUPABASE = "supabase"
LEGACY = "legacy"
TRACKS = (CORE, SUPABASE)
# Track files are numbered from here, legacy ones below: a version is one
# file in pg_broker_migrations, whichever line it came from.
FIRST_TRACK_VERSION = 100
# Arbitrary constant: pg_advisory_lock key for "pg_broker migrations".
ADVISORY_LOCK_KEY = 7_283_640_111
_FILE_PATTERN = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
_LEGACY_HEADER = re.compile(r"^-- legacy:((?: \d{3})+)\s*$", re.MULTILINE)

_migrated_urls: set[str] = set()


class MigrationFailed(RuntimeError):
    """A migration raised an error; none of it was applied. The message names
    the file, PostgreSQL's reason and its hint."""


class LayerFailed(MigrationFailed):
    """A file of the Supabase layer failed; the core schema is complete."""


@dataclass(frozen=True)
class Migration:
    track: str
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.track}/{self.path.name}"

    @property
    def legacy_versions(self) -> tuple[int, ...]:
        """The legacy versions whose effect this file repeats (its
        ``-- legacy: NNN …`` header line), or () for a file of its own."""
        match = _LEGACY_HEADER.search(self.sql)
        return tuple(int(v) for v in match.group(1).split()) if match else ()


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


def discover(directory: Path | None = None, tracks: Iterable[str] = TRACKS) -> list[Migration]:
    """The files of ``tracks`` under ``directory``, in the order of their
    numbers; a number must not be used twice across the tracks."""
    directory = directory or migrations_dir()
    found = []
    for track in tracks:
        for path in sorted((directory / track).glob("*.sql")):
            match = _FILE_PATTERN.match(path.name)
            if not match:
                raise ValueError(f"migration file {track}/{path.name} is not named NNN_name.sql")
            version = int(match.group(1))
            if (version < FIRST_TRACK_VERSION) != (track == LEGACY):
                raise ValueError(f"migration file {track}/{path.name}: legacy files are numbered "
                                 f"below {FIRST_TRACK_VERSION}, the tracks' from it")
            found.append(Migration(track, version, match.group(2), path))
    found.sort(key=lambda m: m.version)
    for before, after in zip(found, found[1:], strict=False):
        if before.version == after.version:
            raise ValueError(f"two migrations share the number {after.version:03d} in {directory}: "
                             f"{before.label} and {after.label}")
    return found


def migrate(url: str, directory: Path | None = None, *, supabase: bool | None = None
            ) -> list[Migration]:
    """Apply every migration not yet applied; return those applied now.

    ``supabase``: True applies the Supabase layer; None (the default) applies
    it where it was applied before or the database looks like Supabase.
    Raises :class:`MigrationFailed` (and :class:`LayerFailed` when only the
    layer failed, after the core files that follow it were applied).
    """
    directory = directory or migrations_dir()
    applied_now: list[Migration] = []
    with connect(url, autocommit=True) as conn:
        conn.execute(queries["migrations_lock"], {"key": ADVISORY_LOCK_KEY})
        try:
            conn.execute(queries["migrations_table"])
            applied = {(track, version): checksum for track, version, checksum
                       in conn.execute(queries["migrations_applied"])}
            tracks = discover(directory)
            if {t for t, _ in applied} == {LEGACY}:
                applied_now += _complete_legacy(conn, directory, applied)
                for migration in tracks:
                    if migration.legacy_versions:
                        _record(conn, migration)
                        applied[(migration.track, migration.version)] = migration.checksum
                        log.info("recorded %s as applied: legacy %s built it", migration.label,
                                 " ".join(f"{v:03d}" for v in migration.legacy_versions))
            layer = bool(supabase or any(t == SUPABASE for t, _ in applied)
                         or conn.execute(queries["supabase_detected"]).fetchone()[0])
            layer_failure: MigrationFailed | None = None
            for migration in tracks:
                key = (migration.track, migration.version)
                if key in applied:
                    _warn_if_changed(migration, applied[key])
                elif migration.track == CORE:
                    _apply(conn, migration)
                    applied_now.append(migration)
                elif layer and layer_failure is None:
                    try:
                        _apply(conn, migration)
                    except MigrationFailed as exc:
                        layer_failure = exc
                    else:
                        applied_now.append(migration)
        finally:
            conn.execute(queries["migrations_unlock"], {"key": ADVISORY_LOCK_KEY})
    if layer_failure is not None:
        raise LayerFailed(f"{layer_failure}. The core schema is complete: the broker works "
                          "without the Supabase layer") from layer_failure
    _migrated_urls.add(url)
    return applied_now


def ensure_migrated(url: str) -> None:
    """Migrate once per process per URL: the cheap call for every start-up
    path. A layer that cannot install is logged, not raised: the core it
    leaves complete is all the broker needs."""
    if url in _migrated_urls:
        return
    try:
        migrate(url)
    except LayerFailed as exc:
        log.warning("%s", exc)
        _migrated_urls.add(url)


def applied_versions(conn: psycopg.Connection) -> list[tuple[int, str]]:
    """(version, name) of every track file applied, in order (legacy rows aside)."""
    return list(conn.execute(queries["migrations_applied_in_order"]))


def layer_installed(conn: psycopg.Connection) -> bool:
    """Whether the Supabase layer has been applied to this database."""
    return any(track == SUPABASE for track, _, _ in conn.execute(queries["migrations_applied"]))


def _complete_legacy(conn: psycopg.Connection, directory: Path,
                     applied: dict[tuple[str, int], str]) -> list[Migration]:
    """Run the legacy files a single-track database lacks, as its runner would have."""
    ran = []
    for migration in discover(directory, (LEGACY,)):
        key = (LEGACY, migration.version)
        if key in applied:
            _warn_if_changed(migration, applied[key])
            continue
        _apply(conn, migration)
        applied[key] = migration.checksum
        ran.append(migration)
    return ran


def _warn_if_changed(migration: Migration, checksum: str) -> None:
    if checksum != migration.checksum:
        log.warning("migration %s changed after it was applied; migrations are never edited, "
                    "add a new one", migration.label)


def _record(conn: psycopg.Connection, migration: Migration) -> None:
    conn.execute(queries["migration_record"], {
        "track": migration.track, "version": migration.version, "name": migration.name,
        "checksum": migration.checksum,
    })


def _apply(conn: psycopg.Connection, migration: Migration) -> None:
    log.info("applying migration %s", migration.label)
    try:
        with conn.transaction():
            conn.execute(migration.sql)
            _record(conn, migration)
    except psycopg.Error as exc:
        diag = exc.diag
        reason = diag.message_primary or str(exc).strip().splitlines()[0]
        hint = f" ({diag.message_hint})" if diag.message_hint else ""
        raise MigrationFailed(
            f"migration {migration.path.name} failed and was rolled back: {reason}{hint}"
        ) from exc
