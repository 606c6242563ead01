-- core 113: two transitions of a task row, each defined once, here: renew
-- (a held row's lease extended) and start (claimed -> processing). The seed's
-- functions (heartbeat_task, start_task) and the transport's statements
-- (transport_renew_leases, mark_task_processing in pg_broker/sql/queries.sql)
-- all call these; before, each wrote its own UPDATE.
--
-- Both take rows as two arrays, ids and their lease tokens (the transport
-- settles in batches), fence every row by its token, and return the ids they
-- moved: a row missing from the result is no longer held by that token.
-- Neither supplies a default: a NULL lease is refused by
-- job_tasks_lease_expiry_check (core 102), as it was for the transport; the
-- seed's functions apply their documented defaults before calling.

-- renew: the lease of a held row extended, its heartbeat recorded. A row its
-- worker cancelled instead of running (cancel_held_task) keeps its token
-- until the worker's ack and counts as held until then.
CREATE FUNCTION pg_broker_renew(p_ids bigint[], p_tokens uuid[], p_lease interval)
    RETURNS SETOF bigint
    LANGUAGE sql VOLATILE AS $$
    UPDATE job_tasks t
       SET lease_expires_at = now() + p_lease, last_heartbeat = now()
      FROM unnest(p_ids, p_tokens) AS held(id, lease_token)
     WHERE t.id = held.id AND t.lease_token = held.lease_token
       AND t.status IN ('claimed', 'processing', 'cancelled')
    RETURNING t.id
$$;

-- start: the worker began executing the task; started_at keeps the first start.
CREATE FUNCTION pg_broker_start(p_ids bigint[], p_tokens uuid[])
    RETURNS SETOF bigint
    LANGUAGE sql VOLATILE AS $$
    UPDATE job_tasks t
       SET status = 'processing', started_at = coalesce(t.started_at, now()),
           last_heartbeat = now()
      FROM unnest(p_ids, p_tokens) AS held(id, lease_token)
     WHERE t.id = held.id AND t.lease_token = held.lease_token
       AND t.status IN ('claimed', 'processing')
    RETURNING t.id
$$;

REVOKE ALL ON FUNCTION pg_broker_renew(bigint[], uuid[], interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_broker_start(bigint[], uuid[]) FROM PUBLIC;

-- heartbeat_task: the rows of a worker (optionally one token or one row),
-- renewed through pg_broker_renew; arguments as in core 102.
CREATE OR REPLACE FUNCTION heartbeat_task(
    p_worker_id   text,
    p_lease_token uuid DEFAULT NULL,
    p_task_id     bigint DEFAULT NULL,
    p_lease       interval DEFAULT interval '5 minutes'
) RETURNS integer
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_ids    bigint[];
    v_tokens uuid[];
BEGIN
    IF p_worker_id IS NULL THEN
        RAISE EXCEPTION 'heartbeat_task: p_worker_id must not be NULL'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Pass the id of the worker whose leases to renew.';
    END IF;
    SELECT array_agg(id), array_agg(lease_token) INTO v_ids, v_tokens
      FROM job_tasks
     WHERE status IN ('claimed', 'processing')
       AND worker_id = p_worker_id
       AND (p_lease_token IS NULL OR lease_token = p_lease_token)
       AND (p_task_id IS NULL OR id = p_task_id);
    RETURN (SELECT count(*)
              FROM pg_broker_renew(v_ids, v_tokens, coalesce(p_lease, interval '5 minutes')));
END
$$;

-- start_task: one row through pg_broker_start; arguments as in core 102.
CREATE OR REPLACE FUNCTION start_task(p_task_id bigint, p_lease_token uuid) RETURNS boolean
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_broker_require_held_row('start_task', p_task_id, p_lease_token);
    RETURN EXISTS (SELECT FROM pg_broker_start(ARRAY[p_task_id], ARRAY[p_lease_token]));
END
$$;
