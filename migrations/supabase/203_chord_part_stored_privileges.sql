-- supabase 203: core 202's function is the result backend's, as core 110's.
REVOKE ALL ON FUNCTION pg_broker_chord_part_stored(text, bytea, text, interval, boolean, text,
                                                   text, text, interval, interval)
    FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_chord_part_stored(text, bytea, text, interval, boolean, text,
                                                      text, text, interval, interval)
    TO service_role;
