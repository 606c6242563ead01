-- supabase 101: the Supabase/RLS layer, as the legacy migrations 001, 003
-- (its grants) and 004 left it (the baseline of the layer; see
-- migrations/README.md).
--
-- The layer installs where Supabase's roles and auth.uid() exist already
-- (detected), or when asked: `pg-broker migrate --supabase`. On Supabase,
-- paste the files of migrations/core/ and migrations/supabase/ into the SQL
-- editor in the order of their numbers. A database the single-track runner
-- migrated has all of this already: the runner records this file as applied
-- without running it.
--
-- legacy: 001 003 004
--
-- Roles and auth.uid() ---------------------------------------------------------
--
-- Supabase ships the roles anon, authenticated and service_role and a function
-- auth.uid() that reads the caller's id from the JWT claims PostgREST sets in
-- `request.jwt.claims`. On plain PostgreSQL we create the same objects, exactly
-- as Supabase defines them, so the row-level security policies below mean
-- the same thing on both. On Supabase every object below
-- already exists and is left alone.
--
-- Roles are cluster-wide: two databases migrated at once on one server may both
-- try to create them, so a lost race is tolerated.

-- Creating a role needs CREATEROLE; creating one with BYPASSRLS needs a
-- superuser (PostgreSQL 15) or a role that has BYPASSRLS (16 and later). A
-- migrating role that owns its database without being a superuser creates
-- service_role without BYPASSRLS: the policies below give it every row of
-- the job tables all the same. A role that may not create roles at all stops
-- here and is told what a superuser must run.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r);
        BEGIN
            IF r = 'service_role' THEN
                BEGIN
                    EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT BYPASSRLS', r);
                EXCEPTION WHEN insufficient_privilege THEN
                    RAISE NOTICE '% may not grant BYPASSRLS: service_role gets the job tables '
                                 'through their row-level security policies instead', current_user;
                    EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', r);
                END;
            ELSE
                EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', r);
            END IF;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by the migration of another database
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'role "%" does not exist and role "%" may not create it',
                                r, current_user
                    USING HINT = 'Have a superuser run: CREATE ROLE anon NOLOGIN NOINHERIT; '
                                 'CREATE ROLE authenticated NOLOGIN NOINHERIT; '
                                 'CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS; '
                                 'then migrate again.';
        END;
    END LOOP;
END
$$;

DO $$
BEGIN
    IF to_regprocedure('auth.uid()') IS NULL THEN
        -- Not Supabase: the schema is ours, so are its grants.
        CREATE SCHEMA IF NOT EXISTS auth;
        GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
        -- Supabase's definition: the `sub` claim of the request's JWT.
        CREATE FUNCTION auth.uid() RETURNS uuid
            LANGUAGE sql STABLE
            AS $f$
                SELECT coalesce(
                    nullif(current_setting('request.jwt.claim.sub', true), ''),
                    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
                )::uuid
            $f$;
    END IF;
    IF to_regprocedure('auth.role()') IS NULL THEN
        CREATE FUNCTION auth.role() RETURNS text
            LANGUAGE sql STABLE
            AS $f$
                SELECT coalesce(
                    nullif(current_setting('request.jwt.claim.role', true), ''),
                    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
                )::text
            $f$;
    END IF;
END
$$;

-- The worker functions -------------------------------------------------------
-- The core revoked them from PUBLIC. From anon and authenticated too:
-- Supabase's default privileges grant EXECUTE on every new function in
-- public to both, and PostgREST exposes them as /rpc/. service_role may call
-- them, as the table owner may.
REVOKE ALL ON FUNCTION claim_tasks(text, text[], integer, interval) FROM anon, authenticated;
REVOKE ALL ON FUNCTION heartbeat_task(text, uuid, bigint, interval) FROM anon, authenticated;
REVOKE ALL ON FUNCTION start_task(bigint, uuid) FROM anon, authenticated;
REVOKE ALL ON FUNCTION complete_task(bigint, uuid, jsonb) FROM anon, authenticated;
REVOKE ALL ON FUNCTION fail_task(bigint, uuid, text, boolean, interval, interval) FROM anon, authenticated;
REVOKE ALL ON FUNCTION reclaim_stale_tasks() FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION claim_tasks(text, text[], integer, interval) TO service_role;
GRANT EXECUTE ON FUNCTION heartbeat_task(text, uuid, bigint, interval) TO service_role;
GRANT EXECUTE ON FUNCTION start_task(bigint, uuid) TO service_role;
GRANT EXECUTE ON FUNCTION complete_task(bigint, uuid, jsonb) TO service_role;
GRANT EXECUTE ON FUNCTION fail_task(bigint, uuid, text, boolean, interval, interval) TO service_role;
GRANT EXECUTE ON FUNCTION reclaim_stale_tasks() TO service_role;

-- Row-level security ---------------------------------------------------------
--
-- Users (the `authenticated` role, with their id in the JWT's `sub` claim)
-- read only their own jobs, tasks and artifacts; `anon` reads nothing; the
-- service role and the owner of the tables (what workers connect as) read and
-- write everything. RLS is forced, so the owner is subject to it too and gets
-- its rights from an explicit policy rather than by accident.
--
-- The broker's own tables (queues, bindings, transient messages) are not for
-- users at all: no grants to anon or authenticated.

ALTER TABLE jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE jobs FORCE ROW LEVEL SECURITY;
ALTER TABLE job_tasks ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_tasks FORCE ROW LEVEL SECURITY;
ALTER TABLE job_artifacts ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_artifacts FORCE ROW LEVEL SECURITY;

-- The owner: the role running this migration, which workers connect as.
CREATE POLICY jobs_owner_all ON jobs TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY job_tasks_owner_all ON job_tasks TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY job_artifacts_owner_all ON job_artifacts TO CURRENT_USER USING (true) WITH CHECK (true);

CREATE POLICY jobs_service_all ON jobs TO service_role USING (true) WITH CHECK (true);
CREATE POLICY job_tasks_service_all ON job_tasks TO service_role USING (true) WITH CHECK (true);
CREATE POLICY job_artifacts_service_all ON job_artifacts TO service_role
    USING (true) WITH CHECK (true);

-- (SELECT auth.uid()) is evaluated once per statement, not once per row.
CREATE POLICY jobs_select_own ON jobs FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()));
CREATE POLICY job_tasks_select_own ON job_tasks FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()));
CREATE POLICY job_artifacts_select_own ON job_artifacts FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()));

-- Revoke first: on Supabase the default privileges of schema public have
-- already granted ALL on every new table and sequence to anon and
-- authenticated.
REVOKE ALL ON jobs, job_tasks, job_artifacts FROM anon, authenticated;
GRANT SELECT ON jobs, job_tasks, job_artifacts TO authenticated;
REVOKE ALL ON SEQUENCE job_tasks_sequence_seq, job_tasks_id_seq,
    broker_transient_messages_id_seq FROM anon, authenticated;
DO $$
BEGIN
    -- Absent when these files are pasted into an SQL editor instead of run
    -- by `pg-broker migrate`.
    IF to_regclass('pg_broker_migrations') IS NOT NULL THEN
        REVOKE ALL ON pg_broker_migrations FROM anon, authenticated;
    END IF;
END
$$;
GRANT ALL ON jobs, job_tasks, job_artifacts TO service_role;
GRANT ALL ON broker_queues, broker_bindings, broker_transient_messages TO service_role;
REVOKE ALL ON broker_queues, broker_bindings, broker_transient_messages FROM anon, authenticated;
GRANT USAGE, SELECT ON SEQUENCE job_tasks_sequence_seq TO service_role;
