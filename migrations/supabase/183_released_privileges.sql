-- supabase 183: pg_broker_released (core 182) as the other transition
-- functions (supabase 114, 161): not for anon or authenticated (Supabase's
-- default privileges granted them to both, and PostgREST exposed them as
-- /rpc/), callable by service_role, which runs the transport's requeue and
-- reclaim_stale_tasks.

REVOKE ALL ON FUNCTION pg_broker_released(integer, integer, text, integer, text, text)
    FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_released(integer, integer, text, integer, text, text)
    TO service_role;
