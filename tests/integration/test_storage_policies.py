"""Storage policies of migrations/supabase/106 on a database shaped like Supabase's
(its ``storage`` schema: buckets, objects with their columns,
``storage.foldername()``, the grants Supabase gives its roles, RLS on), and
signed-URL expiry against the Storage stand-in."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import urlopen

import psycopg
import pytest
from psycopg import errors
from supabase_fake import KEY, serve_fake_supabase

from pg_broker.jobs import user_session
from pg_broker.migrate import migrate
from tasks.storage import SupabaseStorage

USER_A = uuid.UUID("00000000-0000-4000-8000-0000000005a1")
USER_B = uuid.UUID("00000000-0000-4000-8000-0000000005b2")

# Supabase Storage's tables as its migrations define them (the columns a
# policy can see), its foldername(), and what Supabase grants on them.
SUPABASE_STORAGE = """
CREATE SCHEMA storage;
GRANT USAGE ON SCHEMA storage TO anon, authenticated, service_role;
CREATE TABLE storage.buckets (
    id text PRIMARY KEY,
    name text NOT NULL,
    owner uuid,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now(),
    public boolean DEFAULT false,
    avif_autodetection boolean DEFAULT false,
    file_size_limit bigint,
    allowed_mime_types text[],
    owner_id text
);
CREATE UNIQUE INDEX bname ON storage.buckets (name);
CREATE TABLE storage.objects (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    bucket_id text REFERENCES storage.buckets (id),
    name text,
    owner uuid,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now(),
    last_accessed_at timestamptz DEFAULT now(),
    metadata jsonb,
    path_tokens text[] GENERATED ALWAYS AS (string_to_array(name, '/')) STORED,
    version text,
    owner_id text,
    user_metadata jsonb
);
CREATE UNIQUE INDEX bucketid_objname ON storage.objects (bucket_id, name);
ALTER TABLE storage.objects ENABLE ROW LEVEL SECURITY;
ALTER TABLE storage.buckets ENABLE ROW LEVEL SECURITY;
GRANT ALL ON storage.objects, storage.buckets TO anon, authenticated, service_role;
CREATE FUNCTION storage.foldername(name text) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    _parts text[];
BEGIN
    SELECT string_to_array(name, '/') INTO _parts;
    RETURN _parts[1:array_length(_parts, 1) - 1];
END
$$;
"""


@pytest.fixture
def supabase_storage_url(empty_database: str) -> str:
    """A database with Supabase's storage tables, then migrated."""
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(SUPABASE_STORAGE)
        # Another bucket, and a project policy that opens every bucket.
        conn.execute("INSERT INTO storage.buckets (id, name, public)"
                     " VALUES ('avatars', 'avatars', true)")
        conn.execute("CREATE POLICY anyone_anything ON storage.objects"
                     " TO anon, authenticated USING (true) WITH CHECK (true)")
    migrate(empty_database, supabase=True)
    return empty_database


def _put(conn: psycopg.Connection, bucket: str, name: str) -> None:
    conn.execute("INSERT INTO storage.objects (bucket_id, name, metadata) VALUES (%s, %s, '{}')",
                 (bucket, name))


def _names(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT name FROM storage.objects WHERE bucket_id = 'job-artifacts'")}


def test_the_private_bucket_exists_and_users_read_only_their_own_folder(
    supabase_storage_url: str,
) -> None:
    with psycopg.connect(supabase_storage_url, autocommit=True) as conn:
        assert conn.execute("SELECT public FROM storage.buckets WHERE id = 'job-artifacts'"
                            ).fetchone() == (False,)
        with conn.transaction():
            conn.execute("SET LOCAL ROLE service_role")  # the workers' role writes
            for user in (USER_A, USER_B):
                _put(conn, "job-artifacts", f"{user}/job-1/audio/t1.mp3")
            _put(conn, "job-artifacts", f"not-a-user/{USER_A}/x.mp3")
        with user_session(conn, USER_A):
            assert _names(conn) == {f"{USER_A}/job-1/audio/t1.mp3"}
        with user_session(conn, USER_B):
            assert _names(conn) == {f"{USER_B}/job-1/audio/t1.mp3"}
        with conn.transaction():
            conn.execute("SET LOCAL ROLE anon")
            assert _names(conn) == set()
        with conn.transaction():
            conn.execute("SET LOCAL ROLE service_role")
            assert len(_names(conn)) == 3


@pytest.mark.parametrize("statement", [
    "INSERT INTO storage.objects (bucket_id, name) VALUES ('job-artifacts', %(mine)s)",
    "UPDATE storage.objects SET metadata = '{}' WHERE bucket_id = 'job-artifacts'",
    "UPDATE storage.objects SET bucket_id = 'job-artifacts', name = %(mine)s WHERE bucket_id = 'avatars'",
    "DELETE FROM storage.objects WHERE bucket_id = 'job-artifacts'",
])
def test_users_never_write_the_bucket_even_under_a_policy_that_opens_every_bucket(
    supabase_storage_url: str, statement: str
) -> None:
    mine = f"{USER_A}/job-1/audio/forged.mp3"
    with psycopg.connect(supabase_storage_url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SET LOCAL ROLE service_role")
            _put(conn, "job-artifacts", f"{USER_A}/job-1/audio/t1.mp3")
            _put(conn, "avatars", f"{USER_A}/me.png")
        with user_session(conn, USER_A):
            changed = 0
            try:
                changed = conn.execute(statement, {"mine": mine}).rowcount
            except errors.InsufficientPrivilege:
                pass  # new row violates row-level security policy
        assert changed == 0
        assert conn.execute("SELECT bucket_id, name, metadata FROM storage.objects ORDER BY 1"
                            ).fetchall() == [("avatars", f"{USER_A}/me.png", {}),
                                             ("job-artifacts", f"{USER_A}/job-1/audio/t1.mp3", {})]
        # The project's own policy still works for its own bucket.
        with user_session(conn, USER_A):
            _put(conn, "avatars", f"{USER_A}/new.png")


def test_without_supabase_storage_the_migration_leaves_no_storage_objects(
    db: psycopg.Connection,
) -> None:
    assert db.execute("SELECT to_regclass('storage.objects')").fetchone() == (None,)
    # The file with the storage policies (supabase 106) ran, and made none.
    assert db.execute("SELECT version FROM pg_broker_migrations WHERE version = 106"
                      ).fetchone() == (106,)


def test_a_signed_url_stops_working_when_it_expires(tmp_path: Path) -> None:
    with serve_fake_supabase() as (url, state):
        store = SupabaseStorage(url, KEY)
        source = tmp_path / "a.mp3"
        source.write_bytes(b"\xff\xfbframes")
        store.put(f"{USER_A}/j/audio/t.mp3", source, "audio/mpeg")
        short = store.url(f"{USER_A}/j/audio/t.mp3", expires_in=1)
        hour = store.url(f"{USER_A}/j/audio/t.mp3")
        with urlopen(short) as response:
            assert (response.status, response.read()) == (200, b"\xff\xfbframes")
        time.sleep(1.5)
        with pytest.raises(HTTPError) as refused:
            urlopen(short)
        assert refused.value.code == 400
        with urlopen(hour) as response:
            assert response.status == 200
