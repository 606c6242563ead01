-- core 103: legacy 008, whose text follows unchanged (its numbers are those
-- of migrations/legacy/; legacy 002, 003 and 005 are core 100 here).
--
-- legacy: 008
--
-- 008: a job that is not finished has no completed_at.
--
-- The status trigger of 003 recomputes a job's status from its tasks, and a
-- finished job can become unfinished again: a task published into it after it
-- completed or failed, or a dead letter re-queued (`pg-broker dead retry`).
-- Its status then went back to processing while completed_at kept the old
-- moment, so "finished jobs" queries (completed_at IS NOT NULL) counted it.
-- Found by the task life-cycle state machine
-- (tests/integration/test_task_state_machine.py): a job's one task dead, a second task
-- published into the job, and the job read "processing" with a completed_at.
--
-- A BEFORE UPDATE trigger on jobs holds the rule for every writer (the
-- status trigger, retry_dead_tasks, cancel_job): pending and processing jobs
-- have completed_at NULL.

CREATE FUNCTION pg_broker_unfinished_job_not_completed() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IN ('pending', 'processing') THEN
        NEW.completed_at := NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_unfinished_not_completed BEFORE UPDATE OF status, completed_at ON jobs
    FOR EACH ROW EXECUTE FUNCTION pg_broker_unfinished_job_not_completed();

UPDATE jobs SET completed_at = NULL
 WHERE status IN ('pending', 'processing') AND completed_at IS NOT NULL;
