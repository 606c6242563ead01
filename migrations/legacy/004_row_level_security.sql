-- 004: row-level security.
--
-- Users (the `authenticated` role, with their id in the JWT's `sub` claim)
-- read only their own jobs, tasks and artifacts; `anon` reads nothing; the
-- service role and the owner of the tables (what workers connect as) read and
-- write everything. RLS is forced, so the owner is subject to it too and gets
-- its rights from an explicit policy rather than by accident.
--
-- The broker's own tables (queues, bindings, transient messages) are not for
-- users at all: no grants to anon or authenticated.

ALTER TABLE jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE jobs FORCE ROW LEVEL SECURITY;
ALTER TABLE job_tasks ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_tasks FORCE ROW LEVEL SECURITY;
ALTER TABLE job_artifacts ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_artifacts FORCE ROW LEVEL SECURITY;

-- The owner: the role running this migration, which workers connect as.
CREATE POLICY jobs_owner_all ON jobs TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY job_tasks_owner_all ON job_tasks TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY job_artifacts_owner_all ON job_artifacts TO CURRENT_USER USING (true) WITH CHECK (true);

CREATE POLICY jobs_service_all ON jobs TO service_role USING (true) WITH CHECK (true);
CREATE POLICY job_tasks_service_all ON job_tasks TO service_role USING (true) WITH CHECK (true);
CREATE POLICY job_artifacts_service_all ON job_artifacts TO service_role
    USING (true) WITH CHECK (true);

-- (SELECT auth.uid()) is evaluated once per statement, not once per row.
CREATE POLICY jobs_select_own ON jobs FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()));
CREATE POLICY job_tasks_select_own ON job_tasks FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()));
CREATE POLICY job_artifacts_select_own ON job_artifacts FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()));

-- Revoke first: on Supabase the default privileges of schema public have
-- already granted ALL on every new table and sequence to anon and
-- authenticated.
REVOKE ALL ON jobs, job_tasks, job_artifacts FROM anon, authenticated;
GRANT SELECT ON jobs, job_tasks, job_artifacts TO authenticated;
REVOKE ALL ON SEQUENCE job_tasks_sequence_seq, job_tasks_id_seq,
    broker_transient_messages_id_seq FROM anon, authenticated;
DO $$
BEGIN
    -- Absent when these files are pasted into an SQL editor instead of run
    -- by `pg-broker migrate`.
    IF to_regclass('pg_broker_migrations') IS NOT NULL THEN
        REVOKE ALL ON pg_broker_migrations FROM anon, authenticated;
    END IF;
END
$$;
GRANT ALL ON jobs, job_tasks, job_artifacts TO service_role;
GRANT ALL ON broker_queues, broker_bindings, broker_transient_messages TO service_role;
REVOKE ALL ON broker_queues, broker_bindings, broker_transient_messages FROM anon, authenticated;
GRANT USAGE, SELECT ON SEQUENCE job_tasks_sequence_seq TO service_role;
