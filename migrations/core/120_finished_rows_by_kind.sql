-- core 120: retention finds each kind of finished row without reading the others.
--
-- Finished rows now leave job_tasks on three windows (the transport options
-- completed_retention, failed_retention and job_retention; README, "Bounded
-- storage"): a plain message (no job) that completed, one that failed, died or
-- was cancelled (kept longer: `pg-broker dead list` and Flower's operators
-- read them), and the rows of a job, which stay until their job finished
-- longer ago than its window. One index over all finished rows ordered by
-- completed_at made the search for, say, completed plain rows older than an
-- hour walk every job row of the last week on each worker's cleanup; these
-- two partial indexes give each kind a range of its own.
--
-- A plain message acked with the default completed_retention (0) is deleted
-- by its ack and never enters either index.

DROP INDEX job_tasks_finished_idx;

-- Plain messages by status, then age: `status = 'completed'` and
-- `status IN ('failed', 'dead', 'cancelled')` are ranges of their own.
CREATE INDEX job_tasks_plain_finished_idx ON job_tasks (status, completed_at)
    WHERE job_id IS NULL AND status IN ('completed', 'failed', 'dead', 'cancelled');

-- A job's finished rows by age; the job's own end decides (jobs.completed_at).
CREATE INDEX job_tasks_job_finished_idx ON job_tasks (completed_at)
    WHERE job_id IS NOT NULL AND status IN ('completed', 'failed', 'dead', 'cancelled');
