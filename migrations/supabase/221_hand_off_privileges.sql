-- supabase 221: core 220's functions are the broker's, as the other waiter
-- functions are (supabase 132, 141, 211): not for anon or authenticated,
-- callable by service_role, which runs the transport. (reclaim_stale_tasks
-- keeps its grants: CREATE OR REPLACE leaves them.)
REVOKE ALL ON FUNCTION pg_broker_wait(text, uuid, text, integer, text, interval, uuid)
    FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_wait(text, uuid, text, integer, text, interval, uuid)
    TO service_role;
REVOKE ALL ON FUNCTION pg_broker_hand_off(text, bigint, jsonb, boolean) FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_hand_off(text, bigint, jsonb, boolean) TO service_role;
REVOKE ALL ON FUNCTION pg_broker_ready(text) FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_ready(text) TO service_role;
