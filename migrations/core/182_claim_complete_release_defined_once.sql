-- core 182: the last transitions written twice, each defined once.
--
-- Renew and start were unified in core 113, fail in the transport's use of
-- fail_task. What remained:
--   * claim: the seed's claim_tasks wrote its own UPDATE beside the
--     transport's pg_broker_claim (core 160/162/163). claim_tasks now chooses
--     how many rows each of its queues gives (highest priority first across
--     all of them, as before) and has pg_broker_claim claim them.
--   * ack / complete: complete_task wrote its own UPDATE, and refused a row
--     its worker cancelled while holding it, where the transport's ack settles
--     that row and leaves it cancelled. complete_task now settles through
--     pg_broker_claim's ack (delete_acked false: the seed keeps rows), so both
--     agree: a cancelled row stays cancelled, its lease is released, and
--     complete_task returns false (nothing was completed).
--   * release (requeue by the worker, a lease lost to reclaim): "pending while
--     deliveries are left, else dead, with why" was written in
--     transport_requeue and in reclaim_stale_tasks. It is pg_broker_released
--     now, which both call from their own single UPDATE (reclaim_stale_tasks
--     stays one statement: its lock order, legacy/core 005 and 100).
--
-- pg_broker_claim sets synchronous_commit off for its transaction (a lost ack
-- redelivers, at least once); the seed's functions restore the caller's
-- setting after it, so calling them changes nothing else in the caller's
-- transaction.

-- Where a held row goes when its holder lets go of it: back to pending while
-- it has deliveries left (attempts less the refund of one that never started
-- below max_attempts), else dead, the reason "<cause> after N of M
-- deliveries[: error]". A pending row keeps its error unless one is given.
-- The caller clears the lease.
CREATE FUNCTION pg_broker_released(
    p_attempts     integer,
    p_max_attempts integer,
    p_error        text,
    p_refund       integer,
    p_cause        text,
    p_reason       text
) RETURNS TABLE (status text, attempts integer, error text, completed_at timestamptz)
    LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN left_over THEN 'pending' ELSE 'dead' END,
           greatest(p_attempts - p_refund, 0),
           CASE WHEN left_over THEN coalesce(p_reason, p_error)
                ELSE concat_ws(': ', format('%s after %s of %s deliveries',
                                            p_cause, p_attempts, p_max_attempts),
                               p_reason) END,
           CASE WHEN left_over THEN NULL ELSE now() END
      FROM (SELECT p_attempts - p_refund < p_max_attempts AS left_over) AS d
$$;
REVOKE ALL ON FUNCTION pg_broker_released(integer, integer, text, integer, text, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION reclaim_stale_tasks() RETURNS integer
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_reclaimed integer;
BEGIN
    WITH stale AS (
        SELECT id, true AS stale,
               CASE WHEN job_id IS NOT NULL AND expires_at < now() AND attempts < max_attempts
                    THEN 'expired' ELSE 'release' END AS fate
          FROM job_tasks
         WHERE status IN ('claimed', 'processing')
           AND lease_expires_at < now()
           FOR UPDATE SKIP LOCKED
    ), expired AS (
        SELECT id, false AS stale, 'expired' AS fate
          FROM job_tasks
         WHERE status = 'pending' AND expires_at < now() AND job_id IS NOT NULL
           FOR UPDATE SKIP LOCKED
    ), due AS (
        SELECT * FROM stale UNION ALL SELECT * FROM expired
    ), changed AS (
        UPDATE job_tasks t
           SET (status, attempts, error, completed_at) =
                   (SELECT r.status, r.attempts, r.error, r.completed_at
                      FROM pg_broker_released(t.attempts, t.max_attempts, t.error, 0,
                                              format('lease expired on worker %s', t.worker_id),
                                              NULL) AS r
                     WHERE due.fate = 'release'
                    UNION ALL
                    SELECT 'dead', t.attempts, 'message expired before delivery', now()
                     WHERE due.fate = 'expired'),
               visible_at = CASE WHEN due.stale THEN now() ELSE t.visible_at END,
               worker_id = NULL,
               lease_token = NULL,
               lease_expires_at = NULL
          FROM due
         WHERE t.id = due.id
        RETURNING due.stale
    )
    SELECT count(*) FILTER (WHERE stale) INTO v_reclaimed FROM changed;

    -- After the UPDATE: a plain message it just returned to pending goes too.
    -- No job, so no trigger and no job lock; SKIP LOCKED, so it never waits.
    DELETE FROM job_tasks
     WHERE id IN (SELECT id FROM job_tasks
                   WHERE status = 'pending' AND expires_at < now() AND job_id IS NULL
                     FOR UPDATE SKIP LOCKED);
    RETURN v_reclaimed;
END
$$;

CREATE OR REPLACE FUNCTION claim_tasks(
    p_worker_id  text,
    p_queues     text[],
    p_batch_size integer DEFAULT 1,
    p_lease      interval DEFAULT interval '5 minutes'
) RETURNS SETOF job_tasks
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_commit  text := current_setting('synchronous_commit');
    v_token   uuid := gen_random_uuid();  -- one lease token for the whole batch
    v_claimed bigint[] := '{}';
    v_queue   record;
BEGIN
    IF p_worker_id IS NULL OR p_queues IS NULL THEN
        RAISE EXCEPTION 'claim_tasks: % must not be NULL',
                        CASE WHEN p_worker_id IS NULL THEN 'p_worker_id' ELSE 'p_queues' END
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Pass the claiming worker''s id and an array of queue names.';
    END IF;
    -- The batch across all the queues, highest priority first; locked here,
    -- so pg_broker_claim, taking each queue's best rows, takes these (a
    -- transaction's own locks do not make it skip a row, and nobody else
    -- can claim them meanwhile). greatest() ignores NULL: a NULL batch size
    -- claims one row.
    FOR v_queue IN
        WITH ready AS (
            SELECT r.queue
              FROM (SELECT DISTINCT unnest(p_queues) AS queue) q
             CROSS JOIN LATERAL (
                    SELECT t.queue, t.priority, t.sequence
                      FROM job_tasks t
                     WHERE t.status = 'pending'
                       AND t.queue = q.queue
                       AND t.visible_at <= now()
                       AND (t.expires_at IS NULL OR t.expires_at > now())
                     ORDER BY t.priority DESC, t.sequence
                     LIMIT greatest(p_batch_size, 1)
                       FOR UPDATE SKIP LOCKED
                   ) r
             ORDER BY r.priority DESC, r.sequence
             LIMIT greatest(p_batch_size, 1)
        )
        SELECT queue, count(*)::integer AS n FROM ready GROUP BY queue
    LOOP
        v_claimed := v_claimed || ARRAY(
            SELECT c.id FROM pg_broker_claim(v_queue.queue, v_queue.n, p_worker_id, v_token,
                                             coalesce(p_lease, interval '5 minutes'),
                                             '{}', '{}', false) AS c
             WHERE c.claimed);
    END LOOP;
    PERFORM set_config('synchronous_commit', v_commit, true);
    RETURN QUERY SELECT * FROM job_tasks t WHERE t.id = ANY (v_claimed)
                  ORDER BY t.priority DESC, t.sequence;
END
$$;

CREATE OR REPLACE FUNCTION complete_task(
    p_task_id     bigint,
    p_lease_token uuid,
    p_result      jsonb DEFAULT NULL
) RETURNS boolean
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_commit  text := current_setting('synchronous_commit');
    v_settled integer;
    v_status  text;
BEGIN
    PERFORM pg_broker_require_held_row('complete_task', p_task_id, p_lease_token);
    -- The result first, while the token still fences the row.
    IF p_result IS NOT NULL THEN
        UPDATE job_tasks SET result = p_result
         WHERE id = p_task_id AND lease_token = p_lease_token
           AND status IN ('claimed', 'processing');
    END IF;
    SELECT count(*) INTO v_settled
      FROM pg_broker_claim(NULL, 0, NULL, NULL, NULL, ARRAY[p_task_id], ARRAY[p_lease_token],
                           false) AS c
     WHERE NOT c.claimed;
    PERFORM set_config('synchronous_commit', v_commit, true);
    IF v_settled > 0 THEN
        SELECT t.status INTO v_status FROM job_tasks t WHERE t.id = p_task_id;
    END IF;
    IF v_status = 'completed' THEN
        RETURN true;
    ELSIF v_status = 'cancelled' THEN
        RAISE NOTICE 'complete_task(%): its job was cancelled while the task was held; '
                     'the row stays cancelled and its lease is released', p_task_id;
    ELSE
        RAISE NOTICE 'complete_task(%): lease token % no longer holds the task; nothing changed',
            p_task_id, p_lease_token;
    END IF;
    RETURN false;
END
$$;
