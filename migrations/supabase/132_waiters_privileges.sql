-- supabase 132: the waiters of core 131 are the broker's: not for Supabase's
-- users (anon, authenticated); workers and producers connect as the owner
-- or service_role. (pg_broker_wake keeps the grants of supabase 106; it runs
-- inside submit_job as its owner.)
REVOKE ALL ON broker_waiters FROM anon, authenticated;
GRANT ALL ON broker_waiters TO service_role;
REVOKE ALL ON FUNCTION pg_broker_wait(text, uuid) FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_wait(text, uuid) TO service_role;
