-- Every statement pg_broker runs at run time, by name. Schema and functions
-- live in migrations/; these are the statements that call them.

-- name: jobs_by_status
-- Active jobs: how many jobs are in each status.
SELECT status, COUNT(*) FROM jobs GROUP BY status;

-- name: backlog_by_task_type
-- Task backlog: tasks by Celery task name and status.
SELECT task_type, status, COUNT(*) FROM job_tasks GROUP BY task_type, status;

-- name: worker_health
-- Worker health: tasks each worker holds and when it last renewed a lease.
SELECT worker_id, COUNT(*) AS active_tasks, MAX(last_heartbeat) AS last_seen
  FROM job_tasks WHERE status IN ('claimed', 'processing') GROUP BY worker_id;

-- name: stale_tasks
-- Stale tasks: held tasks with no heartbeat for ten minutes.
SELECT COUNT(*) FROM job_tasks WHERE status IN ('claimed', 'processing')
   AND last_heartbeat < (now() - INTERVAL '10 minutes');

-- name: reclaim_stale_tasks
-- The watchdog: expired leases back to pending (or dead); returns how many.
SELECT reclaim_stale_tasks();

-- ---------------------------------------------------------------------------
-- The worker app and the job model (pg_broker.jobs, storage, maintenance;
-- tasks/). Task rows are addressed by Celery task id while a worker holds them.

-- name: insert_job
-- A new job row for a user; its tasks are inserted by the publishes that follow.
INSERT INTO jobs (user_id, job_type, title, params)
VALUES (%(user_id)s, %(job_type)s, %(title)s, %(params)s)
RETURNING id;

-- name: act_as_user
-- For the rest of the transaction, act as a Supabase user: role authenticated, JWT claims set.
SELECT set_config('role', 'authenticated', true), set_config('request.jwt.claims', %(claims)s, true);

-- name: act_as_user
-- For the rest of the transaction, act as a Supabase user: role authenticated, JWT claims set.
SELECT set_config('role', 'authenticated', true), set_config('request.jwt.claims', %(claims)s, true);

-- name: job_by_id
-- One job with its counters (RLS decides whether the caller may see it).
SELECT id, user_id, job_type, title, params, status, total_tasks, completed_tasks,
       failed_tasks, cancelled_tasks, progress, error, created_at, updated_at, started_at,
       completed_at
  FROM jobs WHERE id = %(job_id)s;

-- name: tasks_of_job
-- A job's tasks in submission order.
SELECT id, task_id, task_type, queue, status, attempts, max_attempts, worker_id, error,
       result, created_at, started_at, completed_at
  FROM job_tasks WHERE job_id = %(job_id)s ORDER BY sequence, id;

-- name: artifacts_of_job
-- A job's artifacts by kind, chapters in order.
SELECT id, job_id, task_id, kind, storage_backend, storage_path, content_type, bytes,
       sha256, duration_seconds, metadata
  FROM job_artifacts WHERE job_id = %(job_id)s
 ORDER BY kind, (metadata ->> 'chapter')::integer NULLS LAST, created_at, storage_path;

-- name: upsert_artifact
-- Records a stored file; a re-run task (same path) updates its one row.
INSERT INTO job_artifacts (job_id, task_id, user_id, kind, storage_backend, storage_path,
                           content_type, bytes, sha256, duration_seconds, metadata)
VALUES (%(job_id)s, %(task_id)s, %(user_id)s, %(kind)s, %(storage_backend)s, %(storage_path)s,
        %(content_type)s, %(bytes)s, %(sha256)s, %(duration_seconds)s, %(metadata)s)
ON CONFLICT (storage_backend, storage_path) DO UPDATE
   SET task_id = EXCLUDED.task_id, content_type = EXCLUDED.content_type,
       bytes = EXCLUDED.bytes, sha256 = EXCLUDED.sha256,
       duration_seconds = EXCLUDED.duration_seconds, metadata = EXCLUDED.metadata
RETURNING id, job_id, task_id, kind, storage_backend, storage_path, content_type, bytes,
          sha256, duration_seconds, metadata;

-- name: cancel_job
-- Marks a job cancelled unless it already finished; returns its id if it did.
UPDATE jobs SET status = 'cancelled', completed_at = now()
 WHERE id = %(job_id)s AND status IN ('pending', 'processing')
RETURNING id;

-- name: cancel_pending_tasks
-- A cancelled job's tasks that no worker holds yet: they will never be claimed.
UPDATE job_tasks SET status = 'cancelled', completed_at = now()
 WHERE job_id = %(job_id)s AND status = 'pending';

-- name: mark_task_processing
-- The worker began executing the task (claimed -> processing), by Celery task id.
UPDATE job_tasks
   SET status = 'processing', started_at = coalesce(started_at, now()), last_heartbeat = now()
 WHERE task_id = %(task_id)s AND status IN ('claimed', 'processing');

-- name: record_task_error
-- Keeps the exception text of a failed attempt; fail_task then retries or fails the row.
UPDATE job_tasks SET error = %(error)s
 WHERE task_id = %(task_id)s AND status IN ('claimed', 'processing');

-- name: dead_tasks
-- Dead letters: tasks that failed or died for good, newest first.
SELECT id, task_id, task_type, queue, status, attempts, max_attempts, job_id, error,
       completed_at
  FROM job_tasks WHERE status IN ('dead', 'failed')
 ORDER BY completed_at DESC NULLS LAST, id DESC
 LIMIT %(limit)s;

-- name: retry_dead_tasks
-- Re-queues dead/failed tasks (all, or by row id or Celery task id) with fresh attempts, reopens their jobs, wakes their queues' workers.
WITH retried AS (
    UPDATE job_tasks
       SET status = 'pending', attempts = 0, error = NULL, visible_at = now(),
           completed_at = NULL, worker_id = NULL, lease_token = NULL, lease_expires_at = NULL
     WHERE status IN ('dead', 'failed')
       AND (%(ids)s::text[] IS NULL OR id::text = ANY (%(ids)s) OR task_id = ANY (%(ids)s))
    RETURNING id, queue, job_id
), reopened AS (
    UPDATE jobs j
       SET completed_at = NULL,
           error = (SELECT t.error FROM job_tasks t
                     WHERE t.job_id = j.id AND t.status IN ('failed', 'dead')
                       AND t.id NOT IN (SELECT id FROM retried)
                     ORDER BY t.completed_at LIMIT 1)
     WHERE j.id IN (SELECT job_id FROM retried) AND j.status <> 'cancelled'
)
SELECT id, queue, pg_notify('pgbroker_' || md5(queue), '') FROM retried;

-- name: delete_finished_tasks
-- Retention: one batch of finished task rows older than the given age leaves the table.
DELETE FROM job_tasks
 WHERE id IN (SELECT id FROM job_tasks
               WHERE status IN ('completed', 'failed', 'dead', 'cancelled')
                 AND completed_at < now() - %(age)s::interval
               ORDER BY completed_at
               LIMIT %(batch)s
                 FOR UPDATE SKIP LOCKED);

-- ---------------------------------------------------------------------------
-- Flower (pg_broker.flower): the Broker tab and /api/queues/length.

-- name: flower_queue_lengths
-- Per queue name: messages held (unexpired), ready to deliver now, held unacked by workers.
SELECT q.name,
       coalesce(d.pending, 0) + coalesce(d.unacked, 0) + coalesce(t.transient, 0) AS messages,
       coalesce(d.ready, 0) + coalesce(t.transient, 0) AS messages_ready,
       coalesce(d.unacked, 0) AS messages_unacknowledged,
       bq.last_used_at AS idle_since
  FROM unnest(%(names)s::text[]) AS q(name)
  LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
               count(*) FILTER (WHERE status = 'pending' AND visible_at <= now()) AS ready,
               count(*) FILTER (WHERE status IN ('claimed', 'processing')) AS unacked
          FROM job_tasks
         WHERE queue = q.name
           AND status IN ('pending', 'claimed', 'processing')
           AND (expires_at IS NULL OR expires_at > now())
       ) d ON true
  LEFT JOIN LATERAL (
        SELECT count(*) AS transient
          FROM broker_transient_messages
         WHERE queue = q.name AND (expires_at IS NULL OR expires_at > now())
       ) t ON true
  LEFT JOIN broker_queues bq ON bq.name = q.name;
