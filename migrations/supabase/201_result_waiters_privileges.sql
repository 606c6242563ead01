-- supabase 201: the result waiters of core 200 are the result backend's: not
-- for Supabase's users (anon, authenticated); workers and producers connect
-- as the owner or service_role.
REVOKE ALL ON task_result_waiters FROM anon, authenticated;
GRANT ALL ON task_result_waiters TO service_role;
REVOKE ALL ON FUNCTION pg_broker_result_set(text, bytea, text, interval, boolean)
    FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_result_set(text, bytea, text, interval, boolean)
    TO service_role;
REVOKE ALL ON FUNCTION pg_broker_await_results(text[]) FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_await_results(text[]) TO service_role;
