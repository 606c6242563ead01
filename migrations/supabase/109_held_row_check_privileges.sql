-- supabase 109: pg_broker_require_held_row() as the task functions it serves
-- (supabase 101): not for anon or authenticated (Supabase's default
-- privileges granted it to both, and PostgREST exposed it as /rpc/), callable
-- by service_role, which calls start_task, complete_task and fail_task.

REVOKE ALL ON FUNCTION pg_broker_require_held_row(text, bigint, uuid) FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_require_held_row(text, bigint, uuid) TO service_role;
