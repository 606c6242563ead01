-- core 235: only a hand-off's delivery is refunded when its lease ran out
-- unrenewed.
--
-- Core 220 refunds the delivery of a claimed row whose lease expired before
-- its consumer ever renewed it (last_heartbeat NULL): a hand-off whose
-- consumer died before taking it. The rule also matched a job's row held
-- with no heartbeat recorded (a row claimed by SQL of the caller's own, or
-- by code from before last_heartbeat was set at claim), which then never
-- went dead however often its lease ran out
-- (tests/integration/test_jobs_maintenance.py::test_watchdog_returns_expired_leases_to_pending
-- failed on core 220). Hand-offs are plain messages only (core 220 never
-- hands off a job's row), so the refund now is too. The body is core 220's
-- with that one condition added.

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
                      FROM pg_broker_released(
                               t.attempts, t.max_attempts, t.error,
                               CASE WHEN t.last_heartbeat IS NULL AND t.status = 'claimed'
                                         AND t.job_id IS NULL
                                    THEN 1 ELSE 0 END,
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

    DELETE FROM job_tasks
     WHERE id IN (SELECT id FROM job_tasks
                   WHERE status = 'pending' AND expires_at < now() AND job_id IS NULL
                     FOR UPDATE SKIP LOCKED);
    RETURN v_reclaimed;
END
$$;
