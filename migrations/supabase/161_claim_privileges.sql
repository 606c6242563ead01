-- supabase 161: pg_broker_claim (core 160) as the other transport functions
-- (supabase 114): not for anon or authenticated (Supabase's default
-- privileges granted them to both, and PostgREST exposed them as /rpc/),
-- callable by service_role, which runs the transport's statements.

REVOKE ALL ON FUNCTION pg_broker_claim(text, integer, text, uuid, interval, bigint[], uuid[],
                                       boolean) FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_claim(text, integer, text, uuid, interval, bigint[], uuid[],
                                          boolean) TO service_role;
