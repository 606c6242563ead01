-- core 160: the transport's ack-and-claim, planned once per session.
--
-- transport_claim (pg_broker/sql/queries.sql) acks a consumer's settled rows
-- and claims the next ones in one statement. Sent as a prepared statement,
-- PostgreSQL planned it again on every call: its generic plan looked dearer
-- than a custom one (a LIMIT it cannot see is costed as 10 % of the queue), so
-- the plan cache kept choosing custom plans. Measured with pg_stat_statements
-- (python -m bench.hotpath, PostgreSQL 15): 1.1-1.8 ms of planning per claim
-- against 0.7-1.0 ms of execution, the largest single cost of a task in the
-- database.
--
-- Here the statement is the body of a plpgsql function that runs with
-- plan_cache_mode = force_generic_plan: plpgsql keeps the plan for the
-- session, so a claim is planned once per connection. A generic plan must
-- stay index-driven whatever the backlog: the rows to claim come from
-- job_tasks_claim_idx (queue = $1, in its order, LIMIT on top), and the rows
-- claimed are updated through the primary key, `t.id = ANY (ARRAY(...))`
-- (an earlier form, `FROM ready WHERE t.id = ready.id`, had a generic plan
-- that estimated 10 % of the queue for the LIMIT and merge-joined the whole
-- primary key: 125 ms a claim on a 400,000-row table, the collapse of the
-- endurance run with force_generic_plan recorded in README "Performance").
-- tests/integration/test_schema.py holds the plan to that on a large backlog.
--
-- What the statement does is unchanged: acks fenced by lease token (a plain
-- message's row deleted when p_delete_acked, else completed; a row its worker
-- cancelled stays cancelled), then up to p_limit ready rows of p_queue
-- (highest priority first, then FIFO) claimed under one lease token; claimed
-- rows first (claimed = true), then the ids acked. Consumer statements commit
-- asynchronously (queries.sql says why).

CREATE FUNCTION pg_broker_claim(
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
        DELETE FROM job_tasks t
         USING unnest(p_ack_ids, p_ack_tokens) AS held(id, lease_token)
         WHERE t.id = held.id AND t.lease_token = held.lease_token
           AND t.status IN ('claimed', 'processing') AND t.job_id IS NULL
           AND p_delete_acked
        RETURNING t.id
    ), completed AS (
        UPDATE job_tasks t
           SET status = CASE t.status WHEN 'cancelled' THEN 'cancelled' ELSE 'completed' END,
               error = NULL, completed_at = now(), lease_token = NULL, lease_expires_at = NULL
          FROM unnest(p_ack_ids, p_ack_tokens) AS held(id, lease_token)
         WHERE t.id = held.id AND t.lease_token = held.lease_token
           AND t.status IN ('claimed', 'processing', 'cancelled')
           AND NOT (t.job_id IS NULL AND t.status <> 'cancelled' AND p_delete_acked)
        RETURNING t.id
    ), claimed AS (
        UPDATE job_tasks t
           SET status = 'claimed', worker_id = p_worker_id, lease_token = p_lease_token,
               lease_expires_at = now() + p_lease, last_heartbeat = now(),
               claimed_at = now(), attempts = t.attempts + 1
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

REVOKE ALL ON FUNCTION pg_broker_claim(text, integer, text, uuid, interval, bigint[], uuid[],
                                       boolean) FROM PUBLIC;
