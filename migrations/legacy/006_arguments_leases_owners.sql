-- 006: the task functions take any argument a caller can pass, every held row
-- has a lease that ends, the retry backoff cannot overflow, and a task or
-- artifact of a job belongs to the job's owner.
--
-- NULL arguments. One rule for the functions of 003 and 005 (claim_tasks,
-- heartbeat_task, start_task, complete_task, fail_task; reclaim_stale_tasks
-- takes none):
--   * An argument that has a default takes it when passed NULL, as when it is
--     left out (PostgREST and most clients send an explicit null for a field
--     they did not set): p_lease of claim_tasks and heartbeat_task 5 minutes,
--     p_batch_size of claim_tasks 1, p_retry of fail_task true, p_backoff
--     10 seconds, p_max_backoff 1 hour. Before, a NULL lease held a row for
--     ever (reclaim_stale_tasks never saw it expire); a NULL backoff waited
--     the whole hour, a NULL cap none at all, a NULL p_retry never retried.
--   * An argument whose NULL is documented keeps that meaning:
--     heartbeat_task's p_lease_token and p_task_id (NULL: every row of the
--     worker), complete_task's p_result (NULL: keep the result), fail_task's
--     p_error (NULL: keep the error the task recorded).
--   * Every other argument is required, and NULL is refused:
--     SQLSTATE 22004 (null_value_not_allowed), a message naming the function
--     and the argument, and a hint. These are claim_tasks' p_worker_id and
--     p_queues, heartbeat_task's p_worker_id, and the row id and lease token
--     of start_task, complete_task and fail_task. Before, a NULL worker id
--     claimed rows no heartbeat could renew, and a NULL row or token read as
--     "the lease was lost" when it was the caller's mistake.
--   * A negative backoff is refused (22023, invalid_parameter_value).
-- The transport's statements (pg_broker/sql/queries.sql) pass intervals too:
-- transport_fail's backoff goes through fail_task and its defaults; a NULL
-- lease in transport_claim or transport_renew_leases is refused by the
-- constraint job_tasks_lease_expiry_check below (check_violation) instead of
-- holding rows for ever.
--
-- Backoff. fail_task computed p_backoff * 2^(attempts - 1) and only then
-- capped it with least(): with the defaults the 41st failure of a task allowed
-- 100 attempts raised "interval out of range" (10 s * 2^40 does not fit an
-- interval). The doubling is now compared with the cap in seconds, in double
-- precision and with the exponent bounded, so it cannot overflow for any
-- attempt count; the interval is computed exactly, and only below the cap.
-- The other arithmetic of the functions cannot overflow for values a column
-- can hold (attempts + 1 is bounded by max_attempts; now() + a caller's lease
-- overflows only for leases of hundreds of thousands of years, with
-- PostgreSQL's own error).
--
-- Ownership. A job task's user_id comes from the producer's `user_id`
-- header. Nothing tied it to the job: a publish naming A's job and user B
-- was stored, B could read the task (row-level security goes by user_id) and
-- A's job counted it. Now, on job_tasks and job_artifacts, a row of a job
-- belongs to the job's owner: a NULL user_id takes the owner, another one is
-- refused (22023, so the transport refuses the publish with kombu's
-- ChannelError), a row's job_id never changes, and neither does a job's
-- owner. Plain messages (no job) pay nothing: the insert trigger's WHEN
-- clause skips them before any function runs, and no statement of the
-- transport updates job_id or user_id, so the update triggers never fire for
-- them.
--
-- Locks: job_tasks, then job_artifacts, then jobs, the order workers and
-- cancels take them (see 005).

-- The row id and lease token start_task, complete_task and fail_task need.
CREATE FUNCTION pg_broker_require_held_row(p_function text, p_task_id bigint, p_lease_token uuid)
    RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    IF p_task_id IS NULL OR p_lease_token IS NULL THEN
        RAISE EXCEPTION '%: % must not be NULL', p_function,
                        CASE WHEN p_task_id IS NULL THEN 'p_task_id' ELSE 'p_lease_token' END
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Pass the id and the lease token of a row claim_tasks returned.';
    END IF;
END
$$;

-- fail_task -----------------------------------------------------------------

CREATE OR REPLACE FUNCTION fail_task(
    p_task_id     bigint,
    p_lease_token uuid,
    p_error       text,
    p_retry       boolean DEFAULT true,
    p_backoff     interval DEFAULT interval '10 seconds',
    p_max_backoff interval DEFAULT interval '1 hour'
) RETURNS text
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_retry       boolean := coalesce(p_retry, true);
    v_backoff     interval := coalesce(p_backoff, interval '10 seconds');
    v_max_backoff interval := coalesce(p_max_backoff, interval '1 hour');
    v_status      text;
BEGIN
    PERFORM pg_broker_require_held_row('fail_task', p_task_id, p_lease_token);
    IF v_backoff < interval '0' OR v_max_backoff < interval '0' THEN
        RAISE EXCEPTION 'fail_task: % must not be negative',
                        CASE WHEN v_backoff < interval '0' THEN 'p_backoff' ELSE 'p_max_backoff' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass a backoff of zero or more (NULL takes the default).';
    END IF;
    -- 2^200 seconds of even the smallest backoff (1 microsecond) exceed any
    -- interval, so a bounded exponent compares right; below the cap the
    -- doubling is exact and fits.
    UPDATE job_tasks
       SET status = CASE WHEN v_retry AND attempts < max_attempts
                         THEN 'pending' ELSE 'failed' END,
           visible_at = CASE
                            WHEN NOT (v_retry AND attempts < max_attempts) THEN visible_at
                            WHEN extract(epoch FROM v_backoff)
                                 * power(2::float8, least(greatest(attempts - 1, 0), 200))
                                 >= extract(epoch FROM v_max_backoff)
                            THEN now() + v_max_backoff
                            ELSE now() + v_backoff
                                 * power(2::float8, least(greatest(attempts - 1, 0), 200))
                        END,
           completed_at = CASE WHEN v_retry AND attempts < max_attempts
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

-- claim_tasks ---------------------------------------------------------------
-- As in 003 (see there for why each queue is read on its own), with the
-- argument rule above.

CREATE OR REPLACE FUNCTION claim_tasks(
    p_worker_id  text,
    p_queues     text[],
    p_batch_size integer DEFAULT 1,
    p_lease      interval DEFAULT interval '5 minutes'
) RETURNS SETOF job_tasks
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF p_worker_id IS NULL OR p_queues IS NULL THEN
        RAISE EXCEPTION 'claim_tasks: % must not be NULL',
                        CASE WHEN p_worker_id IS NULL THEN 'p_worker_id' ELSE 'p_queues' END
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Pass the claiming worker''s id and an array of queue names.';
    END IF;
    -- greatest() ignores NULL: a NULL batch size claims one row.
    RETURN QUERY
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
               lease_expires_at = now() + coalesce(p_lease, interval '5 minutes'),
               last_heartbeat = now(),
               claimed_at = now(),
               attempts = t.attempts + 1
          FROM ready, token
         WHERE t.id = ready.id
        RETURNING t.*
    )
    SELECT * FROM claimed c ORDER BY c.priority DESC, c.sequence;
END
$$;

-- heartbeat_task ------------------------------------------------------------

CREATE OR REPLACE FUNCTION heartbeat_task(
    p_worker_id   text,
    p_lease_token uuid DEFAULT NULL,
    p_task_id     bigint DEFAULT NULL,
    p_lease       interval DEFAULT interval '5 minutes'
) RETURNS integer
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_extended integer;
BEGIN
    IF p_worker_id IS NULL THEN
        RAISE EXCEPTION 'heartbeat_task: p_worker_id must not be NULL'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Pass the id of the worker whose leases to renew.';
    END IF;
    UPDATE job_tasks
       SET lease_expires_at = now() + coalesce(p_lease, interval '5 minutes'),
           last_heartbeat = now()
     WHERE status IN ('claimed', 'processing')
       AND worker_id = p_worker_id
       AND (p_lease_token IS NULL OR lease_token = p_lease_token)
       AND (p_task_id IS NULL OR id = p_task_id);
    GET DIAGNOSTICS v_extended = ROW_COUNT;
    RETURN v_extended;
END
$$;

-- start_task, complete_task ---------------------------------------------------

CREATE OR REPLACE FUNCTION start_task(p_task_id bigint, p_lease_token uuid) RETURNS boolean
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_broker_require_held_row('start_task', p_task_id, p_lease_token);
    UPDATE job_tasks
       SET status = 'processing',
           started_at = coalesce(started_at, now()),
           last_heartbeat = now()
     WHERE id = p_task_id
       AND lease_token = p_lease_token
       AND status IN ('claimed', 'processing');
    RETURN FOUND;
END
$$;

CREATE OR REPLACE FUNCTION complete_task(
    p_task_id     bigint,
    p_lease_token uuid,
    p_result      jsonb DEFAULT NULL
) RETURNS boolean
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_broker_require_held_row('complete_task', p_task_id, p_lease_token);
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

-- A held row always has a lease that ends ------------------------------------
-- Every path that makes a row claimed or processing sets lease_expires_at
-- (transport_claim, claim_tasks, heartbeats and renewals only extend it); a
-- row its worker cancelled (cancel_held_task) keeps its lease but is no
-- longer held in this sense. Rows an earlier NULL lease left held for ever
-- get a lease that has ended: the next reclaim_stale_tasks() returns them.

ALTER TABLE job_tasks ADD CONSTRAINT job_tasks_lease_expiry_check
    CHECK (status NOT IN ('claimed', 'processing') OR lease_expires_at IS NOT NULL) NOT VALID;
UPDATE job_tasks SET lease_expires_at = now()
 WHERE status IN ('claimed', 'processing') AND lease_expires_at IS NULL;
ALTER TABLE job_tasks VALIDATE CONSTRAINT job_tasks_lease_expiry_check;

-- A row of a job belongs to the job's owner --------------------------------
-- TG_ARGV[0] names the row in messages ('task', 'artifact'). The owner is
-- read as the caller sees it: only the table owner and service_role write
-- these tables, and both see every job. A job_id that names no job is left
-- to the foreign key to refuse.

CREATE FUNCTION pg_broker_row_of_job_owner() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    v_owner uuid;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.job_id IS DISTINCT FROM OLD.job_id THEN
        RAISE EXCEPTION 'the job_id of a % never changes', TG_ARGV[0]
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('%s row %s of job %s, not of job %s', TG_TABLE_NAME, OLD.id,
                                  coalesce(OLD.job_id::text, '(none)'),
                                  coalesce(NEW.job_id::text, '(none)')),
                  HINT = format('Insert a new %s for the other job.', TG_ARGV[0]);
    END IF;
    SELECT user_id INTO v_owner FROM jobs WHERE id = NEW.job_id;
    IF NOT FOUND THEN
        RETURN NEW;
    END IF;
    IF NEW.user_id IS NULL THEN
        NEW.user_id := v_owner;
    ELSIF NEW.user_id IS DISTINCT FROM v_owner THEN
        RAISE EXCEPTION 'user_id % refused: a % belongs to its job''s owner (job %)',
                        NEW.user_id, TG_ARGV[0], NEW.job_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Leave user_id unset (no user_id header) and the job''s owner is taken.';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER job_tasks_owned_by_job BEFORE INSERT ON job_tasks
    FOR EACH ROW WHEN (NEW.job_id IS NOT NULL)
    EXECUTE FUNCTION pg_broker_row_of_job_owner('task');
CREATE TRIGGER job_tasks_stay_owned_by_job BEFORE UPDATE OF job_id, user_id ON job_tasks
    FOR EACH ROW WHEN (NEW.job_id IS DISTINCT FROM OLD.job_id
                       OR (NEW.job_id IS NOT NULL AND NEW.user_id IS DISTINCT FROM OLD.user_id))
    EXECUTE FUNCTION pg_broker_row_of_job_owner('task');

CREATE TRIGGER job_artifacts_owned_by_job BEFORE INSERT ON job_artifacts
    FOR EACH ROW EXECUTE FUNCTION pg_broker_row_of_job_owner('artifact');
CREATE TRIGGER job_artifacts_stay_owned_by_job BEFORE UPDATE OF job_id, user_id ON job_artifacts
    FOR EACH ROW WHEN (NEW.job_id IS DISTINCT FROM OLD.job_id
                       OR NEW.user_id IS DISTINCT FROM OLD.user_id)
    EXECUTE FUNCTION pg_broker_row_of_job_owner('artifact');

CREATE FUNCTION pg_broker_job_owner_is_fixed() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the owner of a job never changes (job %)', OLD.id
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'Its tasks and artifacts belong to that owner; submit a new job for another user.';
END
$$;

CREATE TRIGGER jobs_owner_is_fixed BEFORE UPDATE OF user_id ON jobs
    FOR EACH ROW WHEN (NEW.user_id IS DISTINCT FROM OLD.user_id)
    EXECUTE FUNCTION pg_broker_job_owner_is_fixed();
