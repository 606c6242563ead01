-- supabase 181: job_tasks_history (core 180) under the layer's rules. Users
-- read only their own jobs' history, as they read their own rows of
-- job_tasks (supabase 101); the owner and service_role read and write it;
-- anon reads nothing. The policies are the parent's: its partitions are read
-- through it (each partition alone shows nobody anything, core 180).
-- pg_broker_move_to_history is the workers' (service_role), not for users.

ALTER TABLE job_tasks_history ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_tasks_history FORCE ROW LEVEL SECURITY;

CREATE POLICY job_tasks_history_owner_all ON job_tasks_history TO CURRENT_USER
    USING (true) WITH CHECK (true);
CREATE POLICY job_tasks_history_service_all ON job_tasks_history TO service_role
    USING (true) WITH CHECK (true);
CREATE POLICY job_tasks_history_select_own ON job_tasks_history FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()));

REVOKE ALL ON job_tasks_history FROM anon, authenticated;
GRANT SELECT ON job_tasks_history TO authenticated;
GRANT ALL ON job_tasks_history TO service_role;

REVOKE ALL ON FUNCTION pg_broker_move_to_history(interval, integer, bigint)
    FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION pg_broker_move_to_history(interval, integer, bigint) TO service_role;
