-- core 108: pg_broker_require_held_row() (core 102, legacy 006) is a helper
-- of start_task, complete_task and fail_task: callable by whoever may call
-- them, not by PUBLIC. A SECURITY INVOKER function checks the caller's
-- EXECUTE on what it calls, so the Supabase layer grants it to service_role
-- with the task functions (supabase 109).

REVOKE ALL ON FUNCTION pg_broker_require_held_row(text, bigint, uuid) FROM PUBLIC;
