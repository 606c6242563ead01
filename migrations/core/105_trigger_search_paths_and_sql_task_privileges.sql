-- core 105: the part of legacy 011 that needs no role (the rest, what
-- Supabase's users may do, is supabase 106): the job-table triggers pin their
-- search_path, and the functions of core 104 are nobody's but the owner's
-- until a layer grants them.
--
-- legacy: 011
--
-- Triggers on the job tables run inside submit_job, whose search_path is
-- empty: those that name tables must pin their own (the schema the
-- migrations run in). A new such trigger needs the same, or submit_job fails
-- with "relation ... does not exist" (tests/integration/test_submit_job.py).
ALTER FUNCTION pg_broker_job_tasks_changed() SET search_path FROM CURRENT;
ALTER FUNCTION pg_broker_row_of_job_owner() SET search_path FROM CURRENT;

-- Revoked from PUBLIC as the task functions are (core 100); supabase 106
-- grants them to service_role.
REVOKE ALL ON FUNCTION pg_broker_enqueue_task(text, jsonb, jsonb, text, integer, timestamptz,
                                              timestamptz, uuid, jsonb)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_broker_task_message(text, uuid, jsonb, jsonb, text, integer, timestamptz,
                                              timestamptz, jsonb)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_broker_wake(text) FROM PUBLIC;
