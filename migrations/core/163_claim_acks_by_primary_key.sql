-- core 163: the ack in pg_broker_claim finds its rows by primary key.
--
-- Its generic plan (core 160) deleted acked plain rows through
-- job_tasks_lease_idx, the index of every row every consumer holds, because
-- the statistics counted few held rows: each claim, even one with nothing to
-- ack, read all of them (5,000 held rows: 5,000 read per claim; test_schema).
-- The body is core 162's with that one part rewritten.

CREATE OR REPLACE FUNCTION pg_broker_claim(
    p_queue        text,
    p_limit        integer,
    p_worker_id    text,
    p_lease_token  uuid,
    p_lease        interval,
    p_ack_ids      bigint[],
    p_ack_tokens   uuid[],
    p_delete_acked boolean
) RETURNS TABLE (claimed boolean, id bigint, payload jsonb, attempts integer,
                 priority smallint, sequence bigint)
    LANGUAGE plpgsql VOLATILE
    SET plan_cache_mode = force_generic_plan
    SET search_path FROM CURRENT AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    -- The rows to claim are chosen once, in a CTE of their own: as a subquery
    -- of `t.id IN (...)` a nested-loop plan ran it again for each row, and
    -- each run, no longer seeing the rows this statement had claimed, locked
    -- the next ones (found by tests/integration/test_task_state_machine.py).
    RETURN QUERY
    WITH ready AS MATERIALIZED (
        SELECT t.id FROM job_tasks t
         WHERE t.status = 'pending' AND t.queue = p_queue
           AND t.visible_at <= now() AND (t.expires_at IS NULL OR t.expires_at > now())
         ORDER BY t.priority DESC, t.sequence
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    ), deleted AS (
        -- Found by primary key. (`status IN ('claimed', 'processing')` here
        -- let the planner walk job_tasks_lease_idx, every row every consumer
        -- holds, on each claim; the same rule written as "none of the other
        -- states" cannot use that index.)
        DELETE FROM job_tasks t
         WHERE t.id = ANY (p_ack_ids)
           AND t.lease_token = p_ack_tokens[array_position(p_ack_ids, t.id)]
           AND t.status <> ALL (ARRAY['pending', 'completed', 'failed', 'dead', 'cancelled'])
           AND t.job_id IS NULL AND p_delete_acked
        RETURNING t.id
    ), completed AS (
        UPDATE job_tasks t
           SET status = CASE t.status WHEN 'cancelled' THEN 'cancelled' ELSE 'completed' END,
               error = NULL, completed_at = now(), lease_token = NULL, lease_expires_at = NULL,
               updated_at = now()
          FROM unnest(p_ack_ids, p_ack_tokens) AS held(id, lease_token)
         WHERE t.id = held.id AND t.lease_token = held.lease_token
           AND t.status IN ('claimed', 'processing', 'cancelled')
           AND NOT (t.job_id IS NULL AND t.status <> 'cancelled' AND p_delete_acked)
        RETURNING t.id
    ), claimed AS (
        UPDATE job_tasks t
           SET status = 'claimed', worker_id = p_worker_id, lease_token = p_lease_token,
               lease_expires_at = now() + p_lease, last_heartbeat = now(),
               claimed_at = now(), attempts = t.attempts + 1, updated_at = now()
         WHERE t.id = ANY (ARRAY(SELECT r.id FROM ready r))
        RETURNING t.id, t.payload, t.attempts, t.priority, t.sequence
    )
    SELECT true, c.id, c.payload, c.attempts, c.priority, c.sequence FROM claimed c
    UNION ALL
    SELECT false, d.id, NULL::jsonb, NULL::integer, NULL::smallint, NULL::bigint FROM deleted d
    UNION ALL
    SELECT false, k.id, NULL::jsonb, NULL::integer, NULL::smallint, NULL::bigint FROM completed k;
END
$$;
