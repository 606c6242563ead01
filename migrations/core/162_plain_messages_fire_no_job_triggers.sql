-- core 162: plain Celery messages fire none of the job triggers.
--
-- job_tasks has triggers for the job model: a BEFORE UPDATE row trigger that
-- sets updated_at, and two AFTER statement triggers with transition tables
-- that keep jobs' counters and status true (core 100). A plain Celery
-- message has no job, yet every publish, claim and ack statement called the
-- statement trigger's plpgsql function (which found no job row and returned)
-- and every updated row called the updated_at one. Measured on PostgreSQL 15
-- here, 2,000 one-row claim-like updates: 0.29 ms each with both triggers,
-- 0.19 ms with neither (noisy machine, three interleaved rounds).
--
-- Now:
-- - a row of a job that is inserted, or whose status changes, marks its
--   transaction (pg_broker_job_rows_touched: a transaction-local setting,
--   pg_broker.job_rows = 'on', undone with the transaction or savepoint that
--   set it); the statement triggers fire only in a transaction so marked
--   (WHEN on that setting, read when the statement's trigger event is queued,
--   after every row of it went through its BEFORE triggers). A transaction
--   that touched job rows fires them for its later statements too, which find
--   no job row and return, as before; a missed job row is impossible: every
--   row the triggers count (inserted, or status changed) sets the mark.
-- - updated_at is set by the trigger only when the statement did not set it
--   to now() itself (WHEN NEW.updated_at IS DISTINCT FROM now()): the same
--   value either way, no function call for the statements that do;
--   pg_broker_claim now does (its body is core 160's with updated_at = now()
--   in both updates).

CREATE FUNCTION pg_broker_job_rows_touched() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('pg_broker.job_rows', 'on', true);
    RETURN NEW;
END
$$;

CREATE TRIGGER job_tasks_job_rows_inserted BEFORE INSERT ON job_tasks
    FOR EACH ROW WHEN (NEW.job_id IS NOT NULL)
    EXECUTE FUNCTION pg_broker_job_rows_touched();
CREATE TRIGGER job_tasks_job_rows_moved BEFORE UPDATE ON job_tasks
    FOR EACH ROW WHEN (NEW.job_id IS NOT NULL AND NEW.status IS DISTINCT FROM OLD.status)
    EXECUTE FUNCTION pg_broker_job_rows_touched();

DROP TRIGGER job_tasks_job_insert ON job_tasks;
DROP TRIGGER job_tasks_job_status ON job_tasks;
CREATE TRIGGER job_tasks_job_insert AFTER INSERT ON job_tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT
    WHEN (current_setting('pg_broker.job_rows', true) = 'on')
    EXECUTE FUNCTION pg_broker_job_tasks_changed();
CREATE TRIGGER job_tasks_job_status AFTER UPDATE ON job_tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT
    WHEN (current_setting('pg_broker.job_rows', true) = 'on')
    EXECUTE FUNCTION pg_broker_job_tasks_changed();

DROP TRIGGER job_tasks_touch_updated_at ON job_tasks;
CREATE TRIGGER job_tasks_touch_updated_at BEFORE UPDATE ON job_tasks
    FOR EACH ROW WHEN (NEW.updated_at IS DISTINCT FROM now())
    EXECUTE FUNCTION pg_broker_touch_updated_at();

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
        DELETE FROM job_tasks t
         USING unnest(p_ack_ids, p_ack_tokens) AS held(id, lease_token)
         WHERE t.id = held.id AND t.lease_token = held.lease_token
           AND t.status IN ('claimed', 'processing') AND t.job_id IS NULL
           AND p_delete_acked
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
