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
-- highest priority first, then sequence (FIFO). Ready means pending, visible
-- (ETA/backoff reached) and not expired. Each claimed row gets the batch's
-- lease token, a lease of p_lease, and one more attempt. SKIP LOCKED lets any
-- number of workers claim at once without waiting on one another.

CREATE FUNCTION claim_tasks(
    p_worker_id  text,
    p_queues     text[],
    p_batch_size integer DEFAULT 1,
    p_lease      interval DEFAULT interval '5 minutes'
) RETURNS SETOF job_tasks
    LANGUAGE sql VOLATILE AS $$
    WITH ready AS (
        SELECT id
          FROM job_tasks
         WHERE status = 'pending'
           AND queue = ANY (p_queues)
           AND visible_at <= now()
           AND (expires_at IS NULL OR expires_at > now())
         ORDER BY priority DESC, sequence
         LIMIT greatest(p_batch_size, 1)
           FOR UPDATE SKIP LOCKED
    ), token AS (
        SELECT gen_random_uuid() AS lease_token
    )
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
    RETURNING t.*;
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
-- The rule, applied on every status change of a job's task:
--   total_tasks      tasks inserted for the job (retention deleting finished
--                    rows does not change the counters)
--   completed_tasks  tasks whose status is completed
--   failed_tasks     tasks whose status is failed or dead
--   progress         100 * (completed + failed) / total
--   status           cancelled stays cancelled;
--                    completed when every task completed;
--                    failed when every task finished and one failed or died;
--                    processing once any task was claimed;
--                    pending before that.
--   started_at       first claim; completed_at when it finished.
--   error            the first final task error.

CREATE FUNCTION pg_broker_job_task_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    d_total     integer := 0;
    d_completed integer := 0;
    d_failed    integer := 0;
    v_started   boolean := false;
    v_error     text := NULL;
BEGIN
    IF TG_OP = 'INSERT' THEN
        d_total := 1;
        d_completed := (NEW.status = 'completed')::integer;
        d_failed := (NEW.status IN ('failed', 'dead'))::integer;
    ELSE
        d_completed := (NEW.status = 'completed')::integer - (OLD.status = 'completed')::integer;
        d_failed := (NEW.status IN ('failed', 'dead'))::integer
                  - (OLD.status IN ('failed', 'dead'))::integer;
    END IF;
    v_started := NEW.status NOT IN ('pending', 'cancelled');
    IF NEW.status IN ('failed', 'dead') THEN
        v_error := NEW.error;
    END IF;

    UPDATE jobs j
       SET total_tasks = j.total_tasks + d_total,
           completed_tasks = j.completed_tasks + d_completed,
           failed_tasks = j.failed_tasks + d_failed,
           started_at = CASE WHEN v_started THEN coalesce(j.started_at, now()) ELSE j.started_at END,
           error = coalesce(j.error, v_error)
     WHERE j.id = NEW.job_id;

    UPDATE jobs j
       SET progress = CASE WHEN j.total_tasks = 0 THEN 0
                           ELSE round(100.0 * (j.completed_tasks + j.failed_tasks) / j.total_tasks, 2)
                      END,
           status = CASE
                        WHEN j.status = 'cancelled' THEN 'cancelled'
                        WHEN j.total_tasks > 0 AND j.completed_tasks = j.total_tasks THEN 'completed'
                        WHEN j.total_tasks > 0
                             AND j.completed_tasks + j.failed_tasks = j.total_tasks THEN 'failed'
                        WHEN j.started_at IS NOT NULL THEN 'processing'
                        ELSE 'pending'
                    END,
           completed_at = CASE
                              WHEN j.status <> 'cancelled' AND j.total_tasks > 0
                                   AND j.completed_tasks + j.failed_tasks = j.total_tasks
                              THEN coalesce(j.completed_at, now())
                              ELSE j.completed_at
                          END
     WHERE j.id = NEW.job_id;
    RETURN NULL;
END
$$;

-- WHEN clauses keep plain Celery messages (no job) free of any trigger cost.
CREATE TRIGGER job_tasks_job_insert AFTER INSERT ON job_tasks
    FOR EACH ROW WHEN (NEW.job_id IS NOT NULL)
    EXECUTE FUNCTION pg_broker_job_task_changed();
CREATE TRIGGER job_tasks_job_status AFTER UPDATE OF status ON job_tasks
    FOR EACH ROW WHEN (NEW.job_id IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION pg_broker_job_task_changed();

REVOKE ALL ON FUNCTION claim_tasks(text, text[], integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION heartbeat_task(text, uuid, bigint, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION start_task(bigint, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION complete_task(bigint, uuid, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION fail_task(bigint, uuid, text, boolean, interval, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION reclaim_stale_tasks() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION claim_tasks(text, text[], integer, interval) TO service_role;
GRANT EXECUTE ON FUNCTION heartbeat_task(text, uuid, bigint, interval) TO service_role;
GRANT EXECUTE ON FUNCTION start_task(bigint, uuid) TO service_role;
GRANT EXECUTE ON FUNCTION complete_task(bigint, uuid, jsonb) TO service_role;
GRANT EXECUTE ON FUNCTION fail_task(bigint, uuid, text, boolean, interval, interval) TO service_role;
GRANT EXECUTE ON FUNCTION reclaim_stale_tasks() TO service_role;
