-- supabase 111: the grants of legacy 007 (the result backend's tables and
-- function, core 110) to Supabase's roles; the text follows unchanged.
--
-- legacy: 007

-- Results are not for users (Supabase's anon and authenticated); workers and
-- producers connect as the owner or service_role.
REVOKE ALL ON task_results, task_result_chords, task_result_chord_parts FROM anon, authenticated;
GRANT ALL ON task_results, task_result_chords, task_result_chord_parts TO service_role;
REVOKE ALL ON FUNCTION pg_broker_chord_part_returned(text, text, integer, text, interval, interval)
    FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_chord_part_returned(text, text, integer, text, interval, interval)
    TO service_role;
