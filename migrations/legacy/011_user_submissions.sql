-- 011: what Supabase users may do themselves: submit, through submit_job();
-- read their own artifacts in Storage. Needs the roles anon, authenticated
-- and service_role and auth.uid() (001 on plain PostgreSQL, Supabase's own
-- elsewhere).
--
-- submit_job() is what the HTTP API (tasks/api) calls inside a user's
-- session, and what a browser may call straight through PostgREST
-- (`supabase.rpc('submit_job', ...)`): the limits and the idempotency hold
-- for every caller because they are enforced here, in one statement.
--
-- Errors it raises, by SQLSTATE (the API maps them to HTTP statuses); the
-- offending field is in the error's COLUMN_NAME:
--   PB401  no signed-in user (auth.uid() is null)
--   PB409  the Idempotency-Key was used before for a different request
--   PB413  the request is larger than the user's max_request_bytes
--   PB422  an unknown job type, or a params list its tasks need is empty
--   PB429  the user already has max_active_jobs pending or processing jobs

-- Triggers on the job tables run inside submit_job, whose search_path is
-- empty: those that name tables must pin their own (the schema the
-- migrations run in). A new such trigger needs the same, or submit_job fails
-- with "relation ... does not exist" (tests/integration/test_submit_job.py).
ALTER FUNCTION pg_broker_job_tasks_changed() SET search_path FROM CURRENT;
ALTER FUNCTION pg_broker_row_of_job_owner() SET search_path FROM CURRENT;

-- submit_job ------------------------------------------------------------------
-- Creates a job of a registered type (job_types) for the calling user and
-- every task message it needs, returning (job_id, created). With an
-- idempotency key the same (user, key) returns the job it created the first
-- time (created = false) and never creates a second one, also when two
-- requests race: submissions of one user are serialised by an advisory lock
-- held to the end of the transaction, and (user_id, key) is unique.
-- SECURITY DEFINER: users have no INSERT on the job tables; the owner is
-- always auth.uid(), never a parameter.

CREATE FUNCTION submit_job(
    p_job_type        text,
    p_title           text,
    p_params          jsonb,
    p_idempotency_key text DEFAULT NULL
) RETURNS TABLE (job_id uuid, created boolean)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = ''
AS $$
#variable_conflict use_column
DECLARE
    v_user    uuid := auth.uid();
    v_tasks   jsonb;
    v_limit   public.job_limits;
    v_request text := jsonb_build_array(p_job_type, p_title, p_params)::text;
    v_hash    text;
    v_found   public.job_idempotency_keys;
    v_missing text;
    v_biggest text;
    v_active  integer;
    v_job     uuid;
BEGIN
    IF v_user IS NULL THEN
        RAISE EXCEPTION 'submit_job needs a signed-in user: auth.uid() is null'
            USING ERRCODE = 'PB401';
    END IF;
    SELECT t.tasks INTO v_tasks FROM public.job_types t WHERE t.job_type = p_job_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job_type: unknown job type %', coalesce(quote_literal(p_job_type), 'NULL')
            USING ERRCODE = 'PB422', COLUMN = 'job_type';
    END IF;
    IF jsonb_typeof(p_params) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'params: must be a JSON object' USING ERRCODE = 'PB422', COLUMN = 'params';
    END IF;

    PERFORM pg_catalog.pg_advisory_xact_lock(
        pg_catalog.hashtextextended('pg_broker.submit_job:' || v_user::text, 0));

    v_hash := pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(v_request, 'UTF8')), 'hex');
    IF p_idempotency_key IS NOT NULL THEN
        SELECT * INTO v_found FROM public.job_idempotency_keys k
         WHERE k.user_id = v_user AND k.key = p_idempotency_key;
        IF FOUND THEN
            IF v_found.request_sha256 <> v_hash THEN
                RAISE EXCEPTION 'Idempotency-Key: this key was used for a different request (job %)',
                                v_found.job_id
                    USING ERRCODE = 'PB409', COLUMN = 'Idempotency-Key',
                          HINT = 'use a new key for a new request';
            END IF;
            RETURN QUERY SELECT v_found.job_id, false;
            RETURN;
        END IF;
    END IF;

    SELECT * INTO v_limit FROM public.job_limits l
     WHERE l.user_id = v_user OR l.user_id IS NULL
     ORDER BY l.user_id NULLS LAST LIMIT 1;
    IF pg_catalog.octet_length(v_request) > v_limit.max_request_bytes THEN
        SELECT e.key INTO v_biggest FROM pg_catalog.jsonb_each(p_params) e
         ORDER BY pg_catalog.octet_length(e.value::text) DESC LIMIT 1;
        RAISE EXCEPTION '%: the request holds % bytes; the limit is % bytes per job',
                        coalesce(v_biggest, 'title'), pg_catalog.octet_length(v_request),
                        v_limit.max_request_bytes
            USING ERRCODE = 'PB413', COLUMN = coalesce(v_biggest, 'title');
    END IF;
    SELECT s.spec ->> 'for_each' INTO v_missing
      FROM pg_catalog.jsonb_array_elements(v_tasks) s(spec)
     WHERE s.spec ? 'for_each'
       AND (pg_catalog.jsonb_typeof(p_params -> (s.spec ->> 'for_each')) IS DISTINCT FROM 'array'
            OR pg_catalog.jsonb_array_length(p_params -> (s.spec ->> 'for_each')) = 0)
     LIMIT 1;
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION '%: must be a non-empty list', v_missing
            USING ERRCODE = 'PB422', COLUMN = v_missing;
    END IF;
    SELECT pg_catalog.count(*) INTO v_active FROM public.jobs j
     WHERE j.user_id = v_user AND j.status IN ('pending', 'processing');
    IF v_active >= v_limit.max_active_jobs THEN
        RAISE EXCEPTION 'too many active jobs: % pending or processing, the limit is %',
                        v_active, v_limit.max_active_jobs
            USING ERRCODE = 'PB429', HINT = 'wait for a job to finish, or cancel one';
    END IF;

    INSERT INTO public.jobs (user_id, job_type, title, params)
    VALUES (v_user, p_job_type, p_title, p_params)
    RETURNING id INTO v_job;
    IF p_idempotency_key IS NOT NULL THEN
        INSERT INTO public.job_idempotency_keys (user_id, key, job_id, request_sha256)
        VALUES (v_user, p_idempotency_key, v_job, v_hash);
    END IF;
    -- All task messages in one statement: the job's counters move once.
    INSERT INTO public.job_tasks (queue, payload, task_type, task_id, job_id, user_id)
    SELECT m.queue,
           public.pg_broker_task_message(m.task, m.task_id, m.args, '{}', m.queue, 0, NULL, NULL,
                                         pg_catalog.jsonb_build_object('job_id', v_job,
                                                                       'user_id', v_user)),
           m.task, m.task_id::text, v_job, v_user
      FROM (SELECT s.spec ->> 'task' AS task, s.spec ->> 'queue' AS queue,
                   pg_catalog.gen_random_uuid() AS task_id,
                   CASE WHEN s.spec ? 'for_each' THEN pg_catalog.jsonb_build_array(v_job, i.n - 1)
                        ELSE pg_catalog.jsonb_build_array(v_job) END AS args
              FROM pg_catalog.jsonb_array_elements(v_tasks) WITH ORDINALITY AS s(spec, ord)
             CROSS JOIN LATERAL pg_catalog.generate_series(
                       1, CASE WHEN s.spec ? 'for_each'
                               THEN pg_catalog.jsonb_array_length(p_params -> (s.spec ->> 'for_each'))
                               ELSE 1 END) AS i(n)
             ORDER BY s.ord, i.n) m;
    PERFORM public.pg_broker_wake(q.queue)
       FROM (SELECT DISTINCT s.spec ->> 'queue' AS queue
               FROM pg_catalog.jsonb_array_elements(v_tasks) s(spec)) q;
    RETURN QUERY SELECT v_job, true;
END
$$;

-- Privileges --------------------------------------------------------------------
-- FROM anon, authenticated too: Supabase's default privileges grant EXECUTE on
-- every new function and ALL on every new table in public to both.

REVOKE ALL ON FUNCTION submit_job(text, text, jsonb, text) FROM PUBLIC, anon;
GRANT EXECUTE ON FUNCTION submit_job(text, text, jsonb, text) TO authenticated, service_role;
REVOKE ALL ON FUNCTION pg_broker_enqueue_task(text, jsonb, jsonb, text, integer, timestamptz,
                                              timestamptz, uuid, jsonb)
    FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_enqueue_task(text, jsonb, jsonb, text, integer, timestamptz,
                                                 timestamptz, uuid, jsonb) TO service_role;
REVOKE ALL ON FUNCTION pg_broker_task_message(text, uuid, jsonb, jsonb, text, integer, timestamptz,
                                              timestamptz, jsonb)
    FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_task_message(text, uuid, jsonb, jsonb, text, integer,
                                                 timestamptz, timestamptz, jsonb) TO service_role;
REVOKE ALL ON FUNCTION pg_broker_wake(text) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_wake(text) TO service_role;
REVOKE ALL ON job_types, job_limits, job_idempotency_keys, job_event_watchers
    FROM anon, authenticated;
GRANT ALL ON job_types, job_limits, job_idempotency_keys, job_event_watchers TO service_role;

-- Storage -------------------------------------------------------------------------
-- Where Supabase Storage's tables exist: the private bucket job-artifacts, and
-- who may touch its objects. A user reads only objects under their own
-- `{userId}/` folder (what a signed URL is made from); only the service role
-- (the workers) writes. The RESTRICTIVE policies hold even if another policy
-- of the project grants more on every bucket. Elsewhere nothing happens here.

DO $$
BEGIN
    IF to_regclass('storage.objects') IS NULL OR to_regclass('storage.buckets') IS NULL THEN
        RAISE NOTICE 'no Supabase Storage tables (storage.objects): storage policies skipped';
        RETURN;
    END IF;
    INSERT INTO storage.buckets (id, name, public) VALUES ('job-artifacts', 'job-artifacts', false)
        ON CONFLICT (id) DO NOTHING;
    CREATE POLICY pg_broker_artifacts_owner_read ON storage.objects
        FOR SELECT TO authenticated
        USING (bucket_id = 'job-artifacts'
               AND (storage.foldername(name))[1] = (SELECT auth.uid())::text);
    CREATE POLICY pg_broker_artifacts_service_all ON storage.objects
        FOR ALL TO service_role
        USING (bucket_id = 'job-artifacts') WITH CHECK (bucket_id = 'job-artifacts');
    CREATE POLICY pg_broker_artifacts_only_own_read ON storage.objects
        AS RESTRICTIVE FOR SELECT TO anon, authenticated
        USING (bucket_id <> 'job-artifacts'
               OR (storage.foldername(name))[1] = (SELECT auth.uid())::text);
    CREATE POLICY pg_broker_artifacts_no_user_insert ON storage.objects
        AS RESTRICTIVE FOR INSERT TO anon, authenticated
        WITH CHECK (bucket_id <> 'job-artifacts');
    CREATE POLICY pg_broker_artifacts_no_user_update ON storage.objects
        AS RESTRICTIVE FOR UPDATE TO anon, authenticated
        USING (bucket_id <> 'job-artifacts') WITH CHECK (bucket_id <> 'job-artifacts');
    CREATE POLICY pg_broker_artifacts_no_user_delete ON storage.objects
        AS RESTRICTIVE FOR DELETE TO anon, authenticated
        USING (bucket_id <> 'job-artifacts');
END
$$;
