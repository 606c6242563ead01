"""Applies the schema's migrations: two tracks, each file once, in the order
of their numbers, each in its own transaction, under a transaction-scoped advisory lock so that
processes starting together (worker, beat, Flower, a producer) migrate one at
a time; a database with nothing pending is checked without any lock (see
:func:`migrate`: safe behind a transaction-mode pooler).

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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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

    Safe behind a transaction-mode pooler (PgBouncer, Supavisor on 6543),
    where consecutive transactions may run on different server sessions: the
    applied versions are read first, and a database with nothing pending is
    left without taking any lock; each change runs in a transaction of its
    own under a transaction-scoped advisory lock, and checks again under it
    whether another process made it meanwhile. (A session-level lock taken
    and released in different transactions stayed held by an idle pooled
    session, and the next process waited for it for ever.)
    """
    directory = directory or migrations_dir()
    tracks = discover(directory)
    # No prepared statements: behind a transaction-mode pooler they would not
    # stay with this client, and a start-up check gains nothing from them.
    with connect(url, autocommit=True, prepare_threshold=None) as conn:
        applied = _applied(conn)
        layer = _layer(conn, supabase, applied or {})
        if applied is not None and not _pending(tracks, applied, layer):
            for migration in tracks:
                if (migration.track, migration.version) in applied:
                    _warn_if_changed(migration, applied[(migration.track, migration.version)])
            _migrated_urls.add(url)
            return []
        with _locked(conn):
            conn.execute(queries["migrations_table"])
        applied_now = _apply_pending(conn, directory, tracks, layer)
    _migrated_urls.add(url)
    return applied_now


def _apply_pending(conn: psycopg.Connection, directory: Path, tracks: list[Migration],
                   layer: bool) -> list[Migration]:
    """Apply what is pending, each change under the lock (see :func:`migrate`)."""
    applied_now: list[Migration] = []
    if {t for t, _ in _applied(conn)} == {LEGACY}:
        applied_now += _complete_legacy(conn, directory)
        for migration in tracks:
            if migration.legacy_versions:
                with _locked(conn):
                    if (migration.track, migration.version) not in _applied(conn):
                        _record(conn, migration)
                        log.info("recorded %s as applied: legacy %s built it", migration.label,
                                 " ".join(f"{v:03d}" for v in migration.legacy_versions))
    layer_failure: MigrationFailed | None = None
    for migration in tracks:
        if migration.track != CORE and (not layer or layer_failure is not None):
            continue
        try:
            if _apply_once(conn, migration):
                applied_now.append(migration)
        except MigrationFailed as exc:
            if migration.track == CORE:
                raise
            layer_failure = exc
    if layer_failure is not None:
        raise LayerFailed(f"{layer_failure}. The core schema is complete: the broker works "
                          "without the Supabase layer") from layer_failure
    return applied_now


@contextmanager
def _locked(conn: psycopg.Connection) -> Iterator[None]:
    """A transaction holding the migrations' advisory lock, released at its end."""
    with conn.transaction():
        conn.execute(queries["migrations_lock"], {"key": ADVISORY_LOCK_KEY})
        yield


def _applied(conn: psycopg.Connection) -> dict[tuple[str, int], str] | None:
    """(track, version) -> checksum of every migration recorded; None when the
    record is missing or predates the tracks (a migration is pending)."""
    try:
        return {(track, version): checksum for track, version, checksum
                in conn.execute(queries["migrations_applied"])}
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
        return None


def _layer(conn: psycopg.Connection, supabase: bool | None,
           applied: dict[tuple[str, int], str]) -> bool:
    """Whether the Supabase layer is wanted: asked for, applied before, or Supabase detected."""
    return bool(supabase or any(t == SUPABASE for t, _ in applied)
                or conn.execute(queries["supabase_detected"]).fetchone()[0])


def _pending(tracks: list[Migration], applied: dict[tuple[str, int], str], layer: bool) -> bool:
    """Whether a file of the tracks wanted is not applied yet."""
    return any((m.track, m.version) not in applied for m in tracks
               if m.track == CORE or layer)


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


def _complete_legacy(conn: psycopg.Connection, directory: Path) -> list[Migration]:
    """Run the legacy files a single-track database lacks, as its runner would have."""
    return [migration for migration in discover(directory, (LEGACY,))
            if _apply_once(conn, migration)]


def _warn_if_changed(migration: Migration, checksum: str) -> None:
    if checksum != migration.checksum:
        log.warning("migration %s changed after it was applied; migrations are never edited, "
                    "add a new one", migration.label)


def _record(conn: psycopg.Connection, migration: Migration) -> None:
    conn.execute(queries["migration_record"], {
        "track": migration.track, "version": migration.version, "name": migration.name,
        "checksum": migration.checksum,
    })


def _apply_once(conn: psycopg.Connection, migration: Migration) -> bool:
    """Apply ``migration`` in a transaction of its own under the lock, unless
    it is applied already (by another process meanwhile, perhaps); whether
    it was applied now."""
    try:
        with _locked(conn):
            checksum = conn.execute(queries["migration_checksum"], {
                "track": migration.track, "version": migration.version}).fetchone()
            if checksum is not None:
                _warn_if_changed(migration, checksum[0])
                return False
            log.info("applying migration %s", migration.label)
            conn.execute(migration.sql)
            _record(conn, migration)
            return True
    except psycopg.Error as exc:
        diag = exc.diag
        reason = diag.message_primary or str(exc).strip().splitlines()[0]
        hint = f" ({diag.message_hint})" if diag.message_hint else ""
        raise MigrationFailed(
            f"migration {migration.path.name} failed and was rolled back: {reason}{hint}"
        ) from exc
