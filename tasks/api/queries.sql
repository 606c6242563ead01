-- The statements of the HTTP API (tasks/api), by name. Those about jobs run
-- inside pg_broker.jobs.user_session: as the `authenticated` role with the
-- caller's id in the JWT claims, so row-level security decides what they
-- see; none filters by user itself. The watcher statements run as the API.

-- name: submit_job
-- A job of a registered type for the signed-in user, with its task messages; limits and idempotency in SQL (migrations/supabase/106).
SELECT job_id, created
  FROM submit_job(%(job_type)s, %(title)s, %(params)s, %(idempotency_key)s);

-- name: job_summary
-- One job as a stream or a list shows it (no tasks, no chapter text).
SELECT id, job_type, title, status, progress, total_tasks, completed_tasks, failed_tasks,
       cancelled_tasks, error, version, created_at, updated_at, started_at, completed_at
  FROM jobs WHERE id = %(job_id)s;

-- name: jobs_page
-- The caller's jobs, newest first, optionally of one status, after a (created_at, id) cursor.
SELECT id, job_type, title, status, progress, total_tasks, completed_tasks, failed_tasks,
       cancelled_tasks, error, version, created_at, updated_at, started_at, completed_at
  FROM jobs
 WHERE (%(status)s::text IS NULL OR status = %(status)s::text)
   AND (%(after_created)s::timestamptz IS NULL
        OR (created_at, id) < (%(after_created)s::timestamptz, %(after_id)s::uuid))
 ORDER BY created_at DESC, id DESC
 LIMIT %(limit)s;

-- name: watch_jobs
-- The jobs whose changes the listening session pid wants notified (migrations/core/104); rows of sessions that are gone are swept.
WITH swept AS (
    DELETE FROM job_event_watchers
     WHERE listener_pid NOT IN (SELECT pid FROM pg_stat_activity)
)
INSERT INTO job_event_watchers (job_id, listener_pid)
SELECT unnest(%(job_ids)s::uuid[]), %(pid)s
    ON CONFLICT DO NOTHING;

-- name: unwatch_job
-- No stream of the listening session pid watches this job any more.
DELETE FROM job_event_watchers WHERE job_id = %(job_id)s AND listener_pid = %(pid)s;
