-- supabase 141: core 140's pg_broker_wait is the broker's, as core 131's is
-- (supabase 132).
REVOKE ALL ON FUNCTION pg_broker_wait(text, uuid, text) FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_wait(text, uuid, text) TO service_role;
