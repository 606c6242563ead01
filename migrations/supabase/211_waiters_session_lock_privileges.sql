-- supabase 211: core 210's pg_broker_wait is the broker's, as core 140's is
-- (supabase 141).
REVOKE ALL ON FUNCTION pg_broker_wait(text, uuid, text, integer) FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_wait(text, uuid, text, integer) TO service_role;
