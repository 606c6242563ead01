-- core 112: legacy 012, whose text follows unchanged (its numbers are those
-- of migrations/legacy/: 010 is core 104 here).
--
-- legacy: 012
--
-- 012: a Celery task enqueued from SQL past its `expires` is delivered, so
-- that its worker revokes it, as a task published from Python is
-- (pg_broker/transport/transport.py, _revoked_by_worker).
--
-- A worker that receives an expired task revokes it (Celery checks the
-- `expires` header itself) and stores REVOKED in the result backend: its
-- caller hears the task expired. Dropped by the broker instead (a row TTL),
-- its result would stay PENDING forever. So the row of a task message gets no
-- TTL from `p_expires` (the header and the `expiration` property still say
-- it), unless it is a job's task: the job model marks an expired job task dead
-- (reclaim_stale_tasks()), and that is its job's outcome. The queue's
-- x-message-ttl still caps every message. Everything else is 010's function.

CREATE OR REPLACE FUNCTION pg_broker_enqueue_task(
    p_task     text,
    p_args     jsonb DEFAULT '[]',
    p_kwargs   jsonb DEFAULT '{}',
    p_queue    text DEFAULT 'celery',
    p_priority integer DEFAULT 0,
    p_eta      timestamptz DEFAULT NULL,
    p_expires  timestamptz DEFAULT NULL,
    p_task_id  uuid DEFAULT NULL,
    p_headers  jsonb DEFAULT '{}'
) RETURNS uuid
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_id uuid := coalesce(p_task_id, gen_random_uuid());
BEGIN
    IF p_task IS NULL OR p_task = '' THEN
        RAISE EXCEPTION 'pg_broker_enqueue_task: the task name is empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(p_args) IS DISTINCT FROM 'array'
       OR jsonb_typeof(p_kwargs) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'pg_broker_enqueue_task(%): args must be a JSON array and kwargs a JSON object',
                        p_task
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM broker_queues WHERE name = p_queue AND NOT durable) THEN
        RAISE EXCEPTION 'pg_broker_enqueue_task(%): queue % is not durable; tasks go to durable queues',
                        p_task, p_queue
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO job_tasks (queue, priority, payload, task_type, task_id, job_id, user_id,
                           max_attempts, expires_at)
    SELECT p_queue, p_priority,
           pg_broker_task_message(p_task, v_id, p_args, p_kwargs, p_queue, p_priority,
                                  p_eta, p_expires, p_headers),
           p_task, v_id::text, (p_headers ->> 'job_id')::uuid, (p_headers ->> 'user_id')::uuid,
           coalesce((p_headers ->> 'max_attempts')::integer, 3),
           least(CASE WHEN p_headers ->> 'job_id' IS NOT NULL THEN p_expires END,
                 now() + (SELECT message_ttl FROM broker_queues WHERE name = p_queue));
    PERFORM pg_broker_wake(p_queue);
    RETURN v_id;
END
$$;
