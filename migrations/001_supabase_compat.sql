-- 001: Supabase compatibility on plain PostgreSQL.
--
-- Supabase ships the roles anon, authenticated and service_role and a function
-- auth.uid() that reads the caller's id from the JWT claims PostgREST sets in
-- `request.jwt.claims`. On plain PostgreSQL we create the same objects, exactly
-- as Supabase defines them, so the row-level security policies of the next
-- migrations mean the same thing on both. On Supabase every object below
-- already exists and is left alone.
--
-- Roles are cluster-wide: two databases migrated at once on one server may both
-- try to create them, so a lost race is tolerated.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                IF r = 'service_role' THEN
                    EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT BYPASSRLS', r);
                ELSE
                    EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', r);
                END IF;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;

CREATE SCHEMA IF NOT EXISTS auth;

DO $$
BEGIN
    IF to_regprocedure('auth.uid()') IS NULL THEN
        -- Not Supabase: the schema is ours, so are its grants.
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
