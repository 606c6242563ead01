-- supabase 114: the transition functions of core 113 as the task functions
-- that call them (supabase 101): not for anon or authenticated (Supabase's
-- default privileges granted them to both, and PostgREST exposed them as
-- /rpc/), callable by service_role, which runs heartbeat_task, start_task and
-- the transport's statements.

REVOKE ALL ON FUNCTION pg_broker_renew(bigint[], uuid[], interval) FROM anon, authenticated;
REVOKE ALL ON FUNCTION pg_broker_start(bigint[], uuid[]) FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_renew(bigint[], uuid[], interval) TO service_role;
GRANT EXECUTE ON FUNCTION pg_broker_start(bigint[], uuid[]) TO service_role;
