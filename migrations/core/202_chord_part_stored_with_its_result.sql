-- core 202: a chord's header task stores its result and counts its part in
-- one statement.
--
-- Celery stores a header task's result and then calls on_chord_part_return:
-- two round trips of the worker per header task (a chord of 100 on one solo
-- worker: 200 statements one after the other). pg_broker_chord_part_stored
-- runs both (pg_broker_result_set, core 200, then
-- pg_broker_chord_part_returned, core 110) in one transaction: the result
-- commits with its count, as a worker that counts a part has stored its
-- result first. Lock order: the result's row and its key's advisory lock
-- (shared), then the chord's row; a waiter takes advisory locks only, a
-- counter of another part takes its own result's row first: no cycle.

CREATE FUNCTION pg_broker_chord_part_stored(
    p_key           text,
    p_value         bytea,
    p_state         text,
    p_expires       interval,
    p_keep_success  boolean,
    p_chord         text,
    p_part          text,
    p_claimer       text,
    p_claim         interval,
    p_chord_expires interval
) RETURNS TABLE (parts integer, claimed boolean, size integer)
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_broker_result_set(p_key, p_value, p_state, p_expires, p_keep_success);
    RETURN QUERY SELECT c.parts, c.claimed, c.size
                   FROM pg_broker_chord_part_returned(p_chord, p_part, NULL, p_claimer,
                                                      p_claim, p_chord_expires) c;
END
$$;

REVOKE ALL ON FUNCTION pg_broker_chord_part_stored(text, bytea, text, interval, boolean, text,
                                                   text, text, interval, interval)
    FROM PUBLIC;
