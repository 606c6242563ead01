-- 003: the task functions (the product's RPC contract) and the triggers that
-- keep jobs true.
--
-- Workers call these as the table owner or service_role; they are not granted
-- to anon or authenticated. Every function that finishes a task is fenced by
-- the lease token: a worker whose lease expired (and whose row was reclaimed
-- and claimed by another worker) changes nothing and is told so.

-- updated_at ---------------------------------------------------------------

CREATE FUNCTION pg_broker_touch_updated_at() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_touch_updated_at BEFORE UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION pg_broker_touch_updated_at();
CREATE TRIGGER job_tasks_touch_updated_at BEFORE UPDATE ON job_tasks
    FOR EACH ROW EXECUTE FUNCTION pg_broker_touch_updated_at();
CREATE TRIGGER job_artifacts_touch_updated_at BEFORE UPDATE ON job_artifacts
    FOR EACH ROW EXECUTE FUNCTION pg_broker_touch_updated_at();

-- claim_tasks ---------------------------------------------------------------
-- Claims up to p_batch_size ready rows of the given queues for one worker:
-- highest priority first, then sequence (FIFO), and returns them in that
-- order. Ready means pending, visible (ETA/backoff reached) and not expired.
-- Each claimed row gets the batch's lease token, a lease of p_lease, and one
-- more attempt. SKIP LOCKED lets any number of workers claim at once without
-- waiting on one another.
--
-- Each queue is read on its own (`queue = q.queue`), so job_tasks_claim_idx
-- hands rows over already in (priority DESC, sequence) order and a claim reads
-- about p_batch_size index entries however long the backlog is; one scan with
-- `queue = ANY (p_queues)` would read and sort the whole backlog on every
-- claim. With several queues each one locks up to p_batch_size rows and the
-- best p_batch_size of them are claimed; the others are released at commit.

CREATE FUNCTION claim_tasks(
    p_worker_id  text,
    p_queues     text[],
    p_batch_size integer DEFAULT 1,
    p_lease      interval DEFAULT interval '5 minutes'
) RETURNS SETOF job_tasks
    LANGUAGE sql VOLATILE AS $$
    WITH ready AS (
        SELECT r.id
          FROM (SELECT DISTINCT unnest(p_queues) AS queue) q
         CROSS JOIN LATERAL (
                SELECT t.id, t.priority, t.sequence
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
    ), token AS (
        -- A CTE is evaluated once: one lease token for the whole batch.
        SELECT gen_random_uuid() AS lease_token
    ), claimed AS (
        UPDATE job_tasks t
           SET status = 'claimed',
               worker_id = p_worker_id,
               lease_token = token.lease_token,
               lease_expires_at = now() + p_lease,
               last_heartbeat = now(),
               claimed_at = now(),
               attempts = t.attempts + 1
          FROM ready, token
         WHERE t.id = ready.id
        RETURNING t.*
    )
    SELECT * FROM claimed ORDER BY priority DESC, sequence;
$$;

-- heartbeat_task ------------------------------------------------------------
-- Extends the leases of the rows a worker holds: all of them, or those of one
-- lease token, or one row. Returns how many leases were extended; rows the
-- worker no longer holds are not touched.

CREATE FUNCTION heartbeat_task(
    p_worker_id   text,
    p_lease_token uuid DEFAULT NULL,
    p_task_id     bigint DEFAULT NULL,
    p_lease       interval DEFAULT interval '5 minutes'
) RETURNS integer
    LANGUAGE sql VOLATILE AS $$
    WITH extended AS (
        UPDATE job_tasks
           SET lease_expires_at = now() + p_lease,
               last_heartbeat = now()
         WHERE status IN ('claimed', 'processing')
           AND worker_id = p_worker_id
           AND (p_lease_token IS NULL OR lease_token = p_lease_token)
           AND (p_task_id IS NULL OR id = p_task_id)
        RETURNING 1
    )
    SELECT count(*)::integer FROM extended;
$$;

-- start_task ----------------------------------------------------------------
-- claimed -> processing, when the worker begins executing. False if fenced.

CREATE FUNCTION start_task(p_task_id bigint, p_lease_token uuid) RETURNS boolean
    LANGUAGE sql VOLATILE AS $$
    WITH started AS (
        UPDATE job_tasks
           SET status = 'processing',
               started_at = coalesce(started_at, now()),
               last_heartbeat = now()
         WHERE id = p_task_id
           AND lease_token = p_lease_token
           AND status IN ('claimed', 'processing')
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM started);
$$;

-- complete_task -------------------------------------------------------------
-- Marks a held row completed. Returns false, changing nothing, when the lease
-- token is no longer the row's (the lease expired and the row moved on).

CREATE FUNCTION complete_task(
    p_task_id     bigint,
    p_lease_token uuid,
    p_result      jsonb DEFAULT NULL
) RETURNS boolean
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE job_tasks
       SET status = 'completed',
           result = coalesce(p_result, result),
           error = NULL,
           completed_at = now(),
           lease_token = NULL,
           lease_expires_at = NULL
     WHERE id = p_task_id
       AND lease_token = p_lease_token
       AND status IN ('claimed', 'processing');
    IF NOT FOUND THEN
        RAISE NOTICE 'complete_task(%): lease token % no longer holds the task; nothing changed',
            p_task_id, p_lease_token;
        RETURN false;
    END IF;
    RETURN true;
END
$$;

-- fail_task -----------------------------------------------------------------
-- Records a failed attempt. While attempts < max_attempts (and p_retry), the
-- row goes back to pending, visible again after an exponential backoff:
-- p_backoff * 2^(attempts-1), at most p_max_backoff. Otherwise it is final:
-- 'failed', the error kept (p_error NULL keeps the error the task already
-- recorded). Returns the row's new status, or NULL when fenced.

CREATE FUNCTION fail_task(
    p_task_id     bigint,
    p_lease_token uuid,
    p_error       text,
    p_retry       boolean DEFAULT true,
    p_backoff     interval DEFAULT interval '10 seconds',
    p_max_backoff interval DEFAULT interval '1 hour'
) RETURNS text
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_status text;
BEGIN
    UPDATE job_tasks
       SET status = CASE WHEN p_retry AND attempts < max_attempts
                         THEN 'pending' ELSE 'failed' END,
           visible_at = CASE WHEN p_retry AND attempts < max_attempts
                             THEN now() + least(p_backoff * power(2, greatest(attempts - 1, 0)),
                                                p_max_backoff)
                             ELSE visible_at END,
           completed_at = CASE WHEN p_retry AND attempts < max_attempts
                               THEN NULL ELSE now() END,
           error = coalesce(p_error, error),
           worker_id = NULL,
           lease_token = NULL,
           lease_expires_at = NULL
     WHERE id = p_task_id
       AND lease_token = p_lease_token
       AND status IN ('claimed', 'processing')
    RETURNING status INTO v_status;
    IF v_status IS NULL THEN
        RAISE NOTICE 'fail_task(%): lease token % no longer holds the task; nothing changed',
            p_task_id, p_lease_token;
    END IF;
    RETURN v_status;
END
$$;

-- reclaim_stale_tasks -------------------------------------------------------
-- The watchdog. Rows whose lease expired (their worker died or hung) go back
-- to pending, or to dead once they have used all their attempts. Pending rows
-- whose TTL passed are dropped: messages with no job are deleted, as any
-- broker drops an expired message; a job's task is marked dead so its job can
-- finish. Returns how many rows it reclaimed (expired leases). Safe to call
-- from SQL at any time and from many processes at once.

CREATE FUNCTION reclaim_stale_tasks() RETURNS integer
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_reclaimed integer;
BEGIN
    WITH stale AS (
        SELECT id
          FROM job_tasks
         WHERE status IN ('claimed', 'processing')
           AND lease_expires_at < now()
           FOR UPDATE SKIP LOCKED
    )
    UPDATE job_tasks t
       SET status = CASE WHEN t.attempts < t.max_attempts THEN 'pending' ELSE 'dead' END,
           error = CASE WHEN t.attempts < t.max_attempts THEN t.error
                        ELSE format('lease expired on worker %s after %s of %s deliveries',
                                    t.worker_id, t.attempts, t.max_attempts) END,
           completed_at = CASE WHEN t.attempts < t.max_attempts THEN NULL ELSE now() END,
           visible_at = now(),
           worker_id = NULL,
           lease_token = NULL,
           lease_expires_at = NULL
      FROM stale
     WHERE t.id = stale.id;
    GET DIAGNOSTICS v_reclaimed = ROW_COUNT;

    DELETE FROM job_tasks
     WHERE id IN (SELECT id FROM job_tasks
                   WHERE status = 'pending' AND expires_at < now() AND job_id IS NULL
                     FOR UPDATE SKIP LOCKED);
    UPDATE job_tasks
       SET status = 'dead', error = 'message expired before delivery', completed_at = now()
     WHERE id IN (SELECT id FROM job_tasks
                   WHERE status = 'pending' AND expires_at < now() AND job_id IS NOT NULL
                     FOR UPDATE SKIP LOCKED);
    RETURN v_reclaimed;
END
$$;

-- Job status -----------------------------------------------------------------
-- The rule, applied whenever a job's tasks are inserted or change status:
--   total_tasks      tasks inserted for the job (retention deleting finished
--                    rows does not change the counters)
--   completed_tasks  tasks whose status is completed
--   failed_tasks     tasks whose status is failed or dead
--   cancelled_tasks  tasks whose status is cancelled (e.g. purged unstarted)
--   progress         100 * (completed + failed + cancelled) / total
--   status           cancelled stays cancelled;
--                    completed when every task completed;
--                    once every task finished otherwise: failed when one
--                    failed or died, else cancelled;
--                    processing once any task was claimed;
--                    pending before that.
--   started_at       first claim (a task that expired unclaimed does not
--                    start its job); completed_at when it finished.
--   error            the first final task error.
-- A task's job_id never changes.
--
-- The triggers are per statement, not per row: one claim, watchdog run or
-- batch of acks can move tasks of many jobs at once, and concurrent
-- statements that locked those jobs row by row, each in its own order,
-- deadlocked. Here each statement sums its changes per job, locks the jobs it
-- must change in id order, and updates each once. A claim of an already
-- started job changes no counter and locks nothing; one that starts a job
-- never waits for it (see below).

CREATE FUNCTION pg_broker_job_tasks_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    v_deltas   jsonb;
    v_starting uuid[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE job_id IS NOT NULL) THEN
        RETURN NULL;  -- plain Celery messages: no job to keep
    END IF;
    IF TG_OP = 'INSERT' THEN
        SELECT jsonb_agg(d) INTO v_deltas
          FROM (SELECT n.job_id,
                       count(*) AS total,
                       count(*) FILTER (WHERE n.status = 'completed') AS completed,
                       count(*) FILTER (WHERE n.status IN ('failed', 'dead')) AS failed,
                       count(*) FILTER (WHERE n.status = 'cancelled') AS cancelled,
                       bool_or(n.status IN ('claimed', 'processing', 'completed', 'failed')) AS started,
                       (array_agg(n.error ORDER BY n.id)
                            FILTER (WHERE n.status IN ('failed', 'dead')))[1] AS error
                  FROM new_rows n
                 WHERE n.job_id IS NOT NULL
                 GROUP BY n.job_id) d;
    ELSE
        SELECT jsonb_agg(d) INTO v_deltas
          FROM (SELECT n.job_id,
                       0 AS total,
                       sum((n.status = 'completed')::integer
                           - (o.status = 'completed')::integer) AS completed,
                       sum((n.status IN ('failed', 'dead'))::integer
                           - (o.status IN ('failed', 'dead'))::integer) AS failed,
                       sum((n.status = 'cancelled')::integer
                           - (o.status = 'cancelled')::integer) AS cancelled,
                       bool_or(n.status IN ('claimed', 'processing', 'completed', 'failed')) AS started,
                       (array_agg(n.error ORDER BY n.id)
                            FILTER (WHERE n.status IN ('failed', 'dead')))[1] AS error
                  FROM new_rows n
                  JOIN old_rows o ON o.id = n.id
                 WHERE n.job_id IS NOT NULL
                   AND n.status IS DISTINCT FROM o.status
                 GROUP BY n.job_id) d;
    END IF;

    -- Keep only the jobs that change; a snapshot read, no lock. started_at is
    -- never reset, so a job seen started needs nothing for a claim.
    SELECT jsonb_agg(to_jsonb(d) || jsonb_build_object('counted',
               d.total <> 0 OR d.completed <> 0 OR d.failed <> 0 OR d.cancelled <> 0))
      INTO v_deltas
      FROM jsonb_to_recordset(v_deltas)
               AS d(job_id uuid, total integer, completed integer, failed integer,
                    cancelled integer, started boolean, error text)
      JOIN jobs j ON j.id = d.job_id
     WHERE d.total <> 0 OR d.completed <> 0 OR d.failed <> 0 OR d.cancelled <> 0
        OR (d.started AND j.started_at IS NULL);
    IF v_deltas IS NULL THEN
        RETURN NULL;
    END IF;

    -- Jobs whose counters change: locked in id order, waiting if need be.
    PERFORM 1
       FROM jobs
      WHERE id IN (SELECT (e ->> 'job_id')::uuid FROM jsonb_array_elements(v_deltas) e
                    WHERE (e ->> 'counted')::boolean)
      ORDER BY id
        FOR NO KEY UPDATE;
    -- Jobs that only start (a claim): skipped while another transaction holds
    -- them. That one is starting the job too, finishing a task of it (which
    -- starts it as well) or cancelling it; waiting could deadlock with a
    -- cancel that holds the job and waits for a task row this claim holds.
    SELECT array_agg(id) INTO v_starting
      FROM (SELECT id
              FROM jobs
             WHERE id IN (SELECT (e ->> 'job_id')::uuid FROM jsonb_array_elements(v_deltas) e
                           WHERE NOT (e ->> 'counted')::boolean)
             ORDER BY id
               FOR NO KEY UPDATE SKIP LOCKED) startable;

    -- The jobs are locked by this transaction, so this statement's snapshot
    -- holds their latest counters.
    UPDATE jobs j
       SET total_tasks = c.total,
           completed_tasks = c.completed,
           failed_tasks = c.failed,
           cancelled_tasks = c.cancelled,
           progress = CASE WHEN c.total = 0 THEN 0
                           ELSE round(100.0 * c.finished / c.total, 2) END,
           status = CASE
                        WHEN j.status = 'cancelled' THEN 'cancelled'
                        WHEN c.total > 0 AND c.completed = c.total THEN 'completed'
                        WHEN c.total > 0 AND c.finished = c.total AND c.failed > 0 THEN 'failed'
                        WHEN c.total > 0 AND c.finished = c.total THEN 'cancelled'
                        WHEN c.started_at IS NOT NULL THEN 'processing'
                        ELSE 'pending'
                    END,
           started_at = c.started_at,
           completed_at = CASE
                              WHEN j.status <> 'cancelled' AND c.total > 0
                                   AND c.finished = c.total
                              THEN coalesce(j.completed_at, now())
                              ELSE j.completed_at
                          END,
           error = coalesce(j.error, c.error)
      FROM (SELECT cur.id,
                   cur.total_tasks + d.total AS total,
                   cur.completed_tasks + d.completed AS completed,
                   cur.failed_tasks + d.failed AS failed,
                   cur.cancelled_tasks + d.cancelled AS cancelled,
                   cur.completed_tasks + d.completed + cur.failed_tasks + d.failed
                       + cur.cancelled_tasks + d.cancelled AS finished,
                   CASE WHEN d.started THEN coalesce(cur.started_at, now())
                        ELSE cur.started_at END AS started_at,
                   d.error
              FROM jsonb_to_recordset(v_deltas)
                       AS d(job_id uuid, total integer, completed integer, failed integer,
                            cancelled integer, started boolean, error text, counted boolean)
              JOIN jobs cur ON cur.id = d.job_id
             WHERE d.counted OR d.job_id = ANY (v_starting)) c
     WHERE j.id = c.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER job_tasks_job_insert AFTER INSERT ON job_tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pg_broker_job_tasks_changed();
CREATE TRIGGER job_tasks_job_status AFTER UPDATE ON job_tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pg_broker_job_tasks_changed();

-- FROM anon, authenticated too: Supabase's default privileges grant EXECUTE on
-- every new function in public to both, and PostgREST exposes them as /rpc/.
REVOKE ALL ON FUNCTION claim_tasks(text, text[], integer, interval) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION heartbeat_task(text, uuid, bigint, interval) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION start_task(bigint, uuid) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION complete_task(bigint, uuid, jsonb) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION fail_task(bigint, uuid, text, boolean, interval, interval) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION reclaim_stale_tasks() FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION claim_tasks(text, text[], integer, interval) TO service_role;
GRANT EXECUTE ON FUNCTION heartbeat_task(text, uuid, bigint, interval) TO service_role;
GRANT EXECUTE ON FUNCTION start_task(bigint, uuid) TO service_role;
GRANT EXECUTE ON FUNCTION complete_task(bigint, uuid, jsonb) TO service_role;
GRANT EXECUTE ON FUNCTION fail_task(bigint, uuid, text, boolean, interval, interval) TO service_role;
GRANT EXECUTE ON FUNCTION reclaim_stale_tasks() TO service_role;
