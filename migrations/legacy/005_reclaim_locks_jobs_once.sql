-- 005: reclaim_stale_tasks() changes jobs in one statement, so it locks them
-- once, in id order.
--
-- The lock order that keeps job cancels, purges, the maintenance sweep and
-- workers from deadlocking with one another:
--   * statements that sweep task rows (cancel_pending_tasks, transport_purge,
--     transport_maintain and this function) never wait for a task row: they
--     lock with SKIP LOCKED, since a row someone holds is being claimed (its
--     worker then skips the task of a cancelled job), settled, or swept by
--     another of them;
--   * jobs are locked after task rows, by the statement trigger
--     pg_broker_job_tasks_changed of 003, in one pass in id order per
--     statement;
--   * a transaction locks no task row after its jobs (cancel_job: tasks, then
--     the job).
-- The reclaim of 003 moved expired leases in one statement and expired job
-- tasks in another: two passes over jobs, each in id order but not together,
-- which deadlocked with a purge or another worker's maintenance locking the
-- same jobs in one pass. Here one UPDATE moves both, so the trigger locks all
-- their jobs at once.
--
-- Behaviour is that of 003: expired leases go back to pending (or dead after
-- their last delivery), pending job tasks past their TTL are dead (so their job
-- can finish), plain messages past their TTL are deleted; it returns how many
-- leases it reclaimed. A held row whose lease and TTL both passed ends as 003
-- left it after its two statements: a job task dead ("message expired before
-- delivery"), a plain message deleted.

CREATE OR REPLACE FUNCTION reclaim_stale_tasks() RETURNS integer
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_reclaimed integer;
BEGIN
    WITH stale AS (
        SELECT id, true AS stale,
               CASE WHEN attempts >= max_attempts THEN 'lease lost'
                    WHEN job_id IS NOT NULL AND expires_at < now() THEN 'expired'
                    ELSE 'retry' END AS fate
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
           SET status = CASE WHEN due.fate = 'retry' THEN 'pending' ELSE 'dead' END,
               error = CASE due.fate
                           WHEN 'lease lost'
                           THEN format('lease expired on worker %s after %s of %s deliveries',
                                       t.worker_id, t.attempts, t.max_attempts)
                           WHEN 'expired' THEN 'message expired before delivery'
                           ELSE t.error END,
               completed_at = CASE WHEN due.fate = 'retry' THEN NULL ELSE now() END,
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
