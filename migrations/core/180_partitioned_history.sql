-- core 180: a job's finished rows can leave job_tasks for a history
-- partitioned by day, so that keeping them costs no DELETE (the transport
-- option partitioned_history; README, "Bounded storage").
--
-- Why this layout (measured: README, "Storage per day"): deleting a million
-- kept rows in batches took 65.8 s and wrote 1.23 GB of WAL, leaving the
-- table's size and a million dead row versions to vacuum; dropping a day's
-- partition of the same rows took 4.3 s and wrote 0.2 MB. The rows kept for
-- long are a job's (a week after the job, by default): all of a job-heavy
-- app's traffic. So:
--
-- - job_tasks stays what it is, a plain table holding every pending, delayed
--   and held row (the seed's SQL and every hot statement run against it
--   unchanged); nothing here touches the claim, the ack or the publish.
-- - The workers' cleanup moves the completed and cancelled rows of finished
--   jobs here (pg_broker_move_to_history, one batch per turn, one worker at a
--   time), each into the partition of the day it may be dropped:
--   purge_after = the job's completed_at + job_retention. Retention is then
--   DROP of the partitions whose whole day lies in the past, never DELETE.
--   A row stays its window, and less than a day more.
-- - Failed and dead rows stay in job_tasks, where `pg-broker dead list`,
--   `dead retry`, the metrics and the seed's fail_task find them (a retry
--   puts such a row back to pending, which a row moved out could not do
--   without counting it twice in its job's totals: the job triggers count
--   inserted rows); they are few, and leave by DELETE past failed_retention.
-- - Plain messages (no job) never come here: they leave at their ack by
--   default, or by DELETE past completed_retention.
--
-- No foreign key to jobs: dropping a partition would then lock jobs, which
-- every task's status change updates. A job deleted by hand leaves its
-- history rows to their day. Partitions are created when the first row for
-- their day moves, by the function (no extension needed; pg_partman is not
-- used), named job_tasks_history_pYYYYMMDD (days in UTC).

CREATE TABLE job_tasks_history (
    id              bigint NOT NULL,
    sequence        bigint NOT NULL,
    queue           text NOT NULL,
    priority        smallint NOT NULL,
    job_id          uuid NOT NULL,
    user_id         uuid,
    task_type       text,
    task_id         text,
    payload         jsonb NOT NULL,
    status          text NOT NULL CHECK (status IN ('completed', 'cancelled')),
    attempts        integer NOT NULL,
    max_attempts    integer NOT NULL,
    worker_id       text,
    visible_at      timestamptz NOT NULL,
    expires_at      timestamptz,
    last_heartbeat  timestamptz,
    error           text,
    result          jsonb,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    claimed_at      timestamptz,
    started_at      timestamptz,
    completed_at    timestamptz,
    -- The row may be dropped from then on: its partition's key.
    purge_after     timestamptz NOT NULL,
    PRIMARY KEY (id, purge_after)
) PARTITION BY RANGE (purge_after);

-- A job's tasks (its page, pg-broker job) and a Celery task id.
CREATE INDEX job_tasks_history_job_id_idx ON job_tasks_history (job_id);
CREATE INDEX job_tasks_history_task_id_idx ON job_tasks_history (task_id);

-- pg_broker_move_to_history(keep_job, batch, lock) -> (moved, dropped)
-- Drops the partitions whose day is over, then moves one batch of the
-- completed and cancelled rows of finished jobs out of job_tasks (into the
-- partition of their purge day, created if missing; a row already past its
-- window is only deleted). With a lock key, only if no other session holds
-- it (workers take turns, as with delete_finished_tasks); NULLs then.
-- SECURITY DEFINER: creating and dropping partitions needs the owner of
-- job_tasks_history, and workers may connect as another role (Supabase's
-- service_role). A DROP gives way after lock_timeout to readers of the
-- history (the next turn drops it).
CREATE FUNCTION pg_broker_move_to_history(p_keep_job interval, p_batch integer,
                                          p_lock bigint DEFAULT NULL)
    RETURNS TABLE (moved integer, dropped integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path FROM CURRENT
    SET lock_timeout = '2s'
AS $$
DECLARE
    v_schema  text := (SELECT n.nspname FROM pg_class c
                         JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE c.oid = 'job_tasks_history'::regclass);
    v_name    text;
    v_rel     regclass;
    v_day     date;
    v_grantee regrole;
    v_ids     bigint[];
    v_purge   timestamptz[];
BEGIN
    IF p_batch IS NULL OR p_batch < 0 OR p_keep_job IS NULL THEN
        RAISE EXCEPTION 'pg_broker_move_to_history: keep_job and a batch >= 0 are required'
            USING ERRCODE = '22023';
    END IF;
    IF p_lock IS NOT NULL AND NOT pg_try_advisory_xact_lock(p_lock) THEN
        RETURN QUERY SELECT NULL::integer, NULL::integer;
        RETURN;
    END IF;

    dropped := 0;
    FOR v_name IN
        SELECT c.relname
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'job_tasks_history'::regclass
           AND c.relname ~ '^job_tasks_history_p[0-9]{8}$'
           AND to_date(right(c.relname, 8), 'YYYYMMDD') + 1
               <= (now() AT TIME ZONE 'UTC')::date
         ORDER BY c.relname
    LOOP
        BEGIN
            EXECUTE format('DROP TABLE %I.%I', v_schema, v_name);
            dropped := dropped + 1;
        EXCEPTION WHEN lock_not_available THEN
            RAISE LOG 'pg_broker_move_to_history: % is being read; dropped next time', v_name;
        END;
    END LOOP;

    SELECT array_agg(b.id), array_agg(b.purge) INTO v_ids, v_purge
      FROM (SELECT t.id, j.completed_at + p_keep_job AS purge
              FROM job_tasks t JOIN jobs j ON j.id = t.job_id
             WHERE t.job_id IS NOT NULL AND t.status IN ('completed', 'cancelled')
               AND j.status IN ('completed', 'failed', 'cancelled')
               AND j.completed_at IS NOT NULL
             LIMIT p_batch
               FOR UPDATE OF t SKIP LOCKED) b;
    IF v_ids IS NULL THEN
        moved := 0;
        RETURN NEXT;
        RETURN;
    END IF;

    FOR v_day IN SELECT DISTINCT (p AT TIME ZONE 'UTC')::date FROM unnest(v_purge) p
                  WHERE p > now()
    LOOP
        v_name := 'job_tasks_history_p' || to_char(v_day, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(format('%I.%I', v_schema, v_name)) IS NOT NULL;
        EXECUTE format('CREATE TABLE IF NOT EXISTS %I.%I PARTITION OF job_tasks_history'
                       ' FOR VALUES FROM (%L) TO (%L)', v_schema, v_name,
                       v_day::timestamp AT TIME ZONE 'UTC',
                       (v_day + 1)::timestamp AT TIME ZONE 'UTC');
        v_rel := format('%I.%I', v_schema, v_name)::regclass;
        -- Read through job_tasks_history only, whose privileges and (with
        -- the Supabase layer) row-level security hold: a partition keeps no
        -- privilege but its owner's, not even those default privileges gave
        -- it (Supabase grants every new table in public to its roles).
        EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', v_rel);
        FOR v_grantee IN
            SELECT DISTINCT a.grantee::regrole
              FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = v_rel AND a.grantee <> c.relowner AND a.grantee <> 0
        LOOP
            EXECUTE format('REVOKE ALL ON %s FROM %s', v_rel, v_grantee);
        END LOOP;
    END LOOP;

    WITH removed AS (
        DELETE FROM job_tasks t
         USING unnest(v_ids, v_purge) AS b(id, purge)
         WHERE t.id = b.id
        RETURNING t.*, b.purge
    ), kept AS (
        INSERT INTO job_tasks_history (
            id, sequence, queue, priority, job_id, user_id, task_type, task_id, payload,
            status, attempts, max_attempts, worker_id, visible_at, expires_at,
            last_heartbeat, error, result, created_at, updated_at, claimed_at, started_at,
            completed_at, purge_after)
        SELECT id, sequence, queue, priority, job_id, user_id, task_type, task_id, payload,
               status, attempts, max_attempts, worker_id, visible_at, expires_at,
               last_heartbeat, error, result, created_at, updated_at, claimed_at, started_at,
               completed_at, purge
          FROM removed
         WHERE purge > now()
    )
    SELECT count(*)::integer INTO moved FROM removed;
    RETURN NEXT;
END
$$;

REVOKE ALL ON FUNCTION pg_broker_move_to_history(interval, integer, bigint) FROM PUBLIC;
