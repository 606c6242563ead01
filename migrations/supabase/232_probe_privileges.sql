-- supabase 232: core 231's pg_broker_probe is the broker's, as the other
-- transport functions are (supabase 161): not for anon or authenticated,
-- callable by service_role, which runs the transport's safety poll.
REVOKE ALL ON FUNCTION pg_broker_probe(text[]) FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_probe(text[]) TO service_role;
