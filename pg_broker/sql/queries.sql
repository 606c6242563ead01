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
