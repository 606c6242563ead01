-- core 190: Celery task ids are indexed for the dead letters only.
--
-- job_tasks_task_id_idx (core 100) held an entry for every row: one written
-- by each publish and another by each claim (a claim's update moves the
-- status, which partial indexes read, so it is never HOT). The statements
-- that look rows up by task id (not_dead_letters, retry_dead_tasks: `pg-broker
-- dead`, the API's retry) look among dead and failed rows only, which this
-- index alone holds; a healthy system has few. A lookup by task id among
-- pending or held rows (an operator's ad-hoc query) now reads the
-- table instead. (Built once here with a scan of job_tasks; a very large table
-- may want it built beforehand with CREATE INDEX CONCURRENTLY under this name.)

CREATE INDEX IF NOT EXISTS job_tasks_dead_task_id_idx ON job_tasks (task_id)
    WHERE status IN ('dead', 'failed');
DROP INDEX IF EXISTS job_tasks_task_id_idx;
