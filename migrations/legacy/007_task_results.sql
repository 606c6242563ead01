-- 007: task results, for the pgbroker:// Celery result backend (pg_broker/results/).
--
--   task_results             Celery's key-value results: one row per task
--                            (celery-task-meta-<task id>) or saved group
--                            (celery-taskset-meta-<group id>)
--   task_result_chords       one counter per chord (chord-unlock-<group id>)
--   task_result_chord_parts  the header parts a chord counted, so a header
--                            task delivered twice counts once
--
-- A result is its own row, not a column of the task's job_tasks row: results
-- outlive messages (result_expires, a day by default, against finished
-- messages leaving job_tasks within minutes), exist for tasks that never were
-- a job_tasks row (groups, revoked ids, tasks sent through another broker),
-- and the separate write measured no dearer (see pg_broker/results/__init__.py).
--
-- Every write of a row notifies 'pgbroker_r_' || md5(key): the process
-- waiting for that result LISTENs there (NOTIFY is a wake-up; the row is the
-- result). Keys are compared byte by byte (COLLATE "C"): Celery's keys are
-- identifiers, and the primary key then serves prefix searches too.

CREATE TABLE task_results (
    key         text COLLATE "C" PRIMARY KEY,
    value       bytea NOT NULL,  -- the meta encoded by result_serializer (json, pickle, ...)
    state       text,            -- PENDING ... SUCCESS, for readers in SQL; NULL for a group
    expires_at  timestamptz,     -- result_expires; NULL: kept until forgotten
    updated_at  timestamptz NOT NULL DEFAULT now()
) WITH (
    -- A task writes its row once or twice (STARTED, then its end): leave room
    -- on each page for that update, vacuum early.
    fillfactor = 90,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);

-- Serves retention (expired results leave by age) without reading the rest.
CREATE INDEX task_results_expires_idx ON task_results (expires_at)
    WHERE expires_at IS NOT NULL;

CREATE TABLE task_result_chords (
    key           text COLLATE "C" PRIMARY KEY,
    -- Header tasks to wait for (set by the producer before the last one is
    -- sent; NULL: the caller counts the saved header).
    size          integer CHECK (size >= 0),
    parts         integer NOT NULL DEFAULT 0 CHECK (parts >= 0),
    -- Its callback was sent (or the chord failed): parts delivered again later
    -- change nothing. Reset when the same frozen chord is applied again.
    done          boolean NOT NULL DEFAULT false,
    -- The worker that counted the last part sends the callback and holds the
    -- chord until then; if it died first, a redelivered part takes it over.
    claimed_by    text,
    claimed_until timestamptz,
    expires_at    timestamptz
);

CREATE INDEX task_result_chords_expires_idx ON task_result_chords (expires_at)
    WHERE expires_at IS NOT NULL;

CREATE TABLE task_result_chord_parts (
    chord  text COLLATE "C" NOT NULL REFERENCES task_result_chords (key) ON DELETE CASCADE,
    part   text COLLATE "C" NOT NULL,  -- header task id and its index in the header
    PRIMARY KEY (chord, part)
);

-- pg_broker_chord_part_returned ----------------------------------------------
-- A header task of a chord returned: counts its part once (a part delivered
-- again counts nothing), and answers whether the caller (p_claimer) now holds
-- the chord and must send the callback: every part counted (the chord's size,
-- or p_size when none was set), not done, and no other caller holding it (or
-- its hold of p_claim expired). The same caller asking again gets the same
-- answer, so a call retried after a lost connection is safe. Returns the
-- parts counted, that answer, and the size it went by (NULL: unknown, the
-- caller must count the header and call again with p_size). The chord's row
-- is locked first, so the parts of one chord are counted one at a time.

CREATE FUNCTION pg_broker_chord_part_returned(
    p_key     text,
    p_part    text,
    p_size    integer,
    p_claimer text,
    p_claim   interval,
    p_expires interval
) RETURNS TABLE (parts integer, claimed boolean, size integer)
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_chord task_result_chords;
    v_size  integer;
BEGIN
    INSERT INTO task_result_chords AS c (key, expires_at)
    VALUES (p_key, now() + p_expires)
    ON CONFLICT (key) DO UPDATE
       SET expires_at = greatest(c.expires_at, EXCLUDED.expires_at)
    RETURNING * INTO v_chord;
    v_size := coalesce(v_chord.size, p_size);
    IF v_chord.done THEN
        RETURN QUERY SELECT v_chord.parts, false, v_size;
        RETURN;
    END IF;
    INSERT INTO task_result_chord_parts (chord, part) VALUES (p_key, p_part)
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        UPDATE task_result_chords c SET parts = c.parts + 1
         WHERE c.key = p_key
        RETURNING * INTO v_chord;
    END IF;
    IF v_chord.claimed_by = p_claimer THEN
        RETURN QUERY SELECT v_chord.parts, true, v_size;
    ELSIF v_chord.parts >= v_size
       AND (v_chord.claimed_until IS NULL OR v_chord.claimed_until < now()) THEN
        UPDATE task_result_chords c
           SET claimed_by = p_claimer, claimed_until = now() + p_claim
         WHERE c.key = p_key;
        RETURN QUERY SELECT v_chord.parts, true, v_size;
    ELSE
        RETURN QUERY SELECT v_chord.parts, false, v_size;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION pg_broker_chord_part_returned(text, text, integer, text, interval, interval)
    FROM PUBLIC;

-- Results are not for users (Supabase's anon and authenticated); workers and
-- producers connect as the owner or service_role.
REVOKE ALL ON task_results, task_result_chords, task_result_chord_parts FROM anon, authenticated;
GRANT ALL ON task_results, task_result_chords, task_result_chord_parts TO service_role;
REVOKE ALL ON FUNCTION pg_broker_chord_part_returned(text, text, integer, text, interval, interval)
    FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_chord_part_returned(text, text, integer, text, interval, interval)
    TO service_role;
