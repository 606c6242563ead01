-- core 230: pg_broker_claim's one plan reads only the rows it acks and claims,
-- whatever the table held when the session planned it.
--
-- pg_broker_claim runs with a generic plan, made once per session (core 160),
-- so the table's size and statistics at that moment decide the plan for every
-- later claim of that session. A worker plans its first claim at start-up,
-- on a table that is empty or small, where reading it whole is the cheapest
-- way to find a row by id: its plan then acked (deleted or completed) and
-- claimed by reading the whole table three times per claim, and kept doing
-- so as a backlog grew behind it (until an ANALYZE or VACUUM happened to
-- invalidate the plan; never where autovacuum is off). That is why a claim's
-- database time rose with the backlog: python -m bench --only drain, 3,000
-- tasks, private PostgreSQL 15, auto_explain on the worker's session: three
-- Seq Scans on job_tasks, 657 pages each, 7-10 ms a claim (the quiet run's
-- 0.32 -> 0.98 ms per call, README "Database work per task", fits the same
-- plan on a smaller table).
--
-- Core 213 turned sequential scans off for the function's statements (the
-- setting is the function's own, restored when it returns); kept here, as
-- CREATE OR REPLACE sets a function's settings anew. That left the ack that
-- completes rows: joined to unnest(ids, tokens), its plan made on a small
-- table walked the whole primary key instead and filtered every row
-- (1,300-2,600 rows per claim in the same bench run, auto_explain). It now
-- finds its rows by primary key, `t.id = ANY (p_ack_ids)`, as the ack that
-- deletes them does (core 163): with sequential scans off, the cheapest plan
-- on any table reads only the rows acked.
-- tests/integration/test_schema.py plans a session on empty, vacuumed and
-- small tables, then acks and claims behind a backlog. What the statement
-- does is unchanged (core 163 describes it).

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
    SET enable_seqscan = off
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
        -- Found by primary key too, as deleted: joined to unnest(ids, tokens),
        -- a plan made on a small table walked the whole primary key.
        UPDATE job_tasks t
           SET status = CASE t.status WHEN 'cancelled' THEN 'cancelled' ELSE 'completed' END,
               error = NULL, completed_at = now(), lease_token = NULL, lease_expires_at = NULL,
               updated_at = now()
         WHERE t.id = ANY (p_ack_ids)
           AND t.lease_token = p_ack_tokens[array_position(p_ack_ids, t.id)]
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
