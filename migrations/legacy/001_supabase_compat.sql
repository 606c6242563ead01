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

-- Creating a role needs CREATEROLE; creating one with BYPASSRLS needs a
-- superuser (PostgreSQL 15) or a role that has BYPASSRLS (16 and later). A
-- migrating role that owns its database without being a superuser creates
-- service_role without BYPASSRLS: the policies of 004 give it every row of
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
