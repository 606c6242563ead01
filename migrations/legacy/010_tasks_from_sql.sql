-- 010: Celery tasks from SQL, job events, the job types users may submit.
--
-- Everything here is plain PostgreSQL that any role owning the schema can
-- install; what needs Supabase's roles (submit_job for `authenticated`, the
-- storage policies) is in 011.
--
--   pg_broker_wake(queue)          wakes a queue's consumers (the transport's
--                                  NOTIFY channel); the one place SQL says how
--   pg_broker_task_message(...)    a Celery protocol-2 message, as kombu stores it
--   pg_broker_enqueue_task(...)    stores one and wakes its queue: a trigger, a
--                                  PostgREST RPC or any language can call a task
--   jobs.version + NOTIFY          a watched job's status/counters changed (SSE streams)
--   job_types, job_limits,         what users may submit, how much, and the
--   job_idempotency_keys           keys that make a submission safe to retry

-- Wake-ups -------------------------------------------------------------------
-- A consumer LISTENs on 'pgbroker_' || md5(queue) (pg_broker/transport/
-- listener.py). A notification is only a wake-up: consumers then claim rows.

CREATE FUNCTION pg_broker_wake(p_queue text) RETURNS void
    LANGUAGE sql VOLATILE AS $$
    SELECT pg_notify('pgbroker_' || md5(p_queue), '');
$$;

-- Celery messages ------------------------------------------------------------
-- The envelope kombu's virtual transport stores for `task.apply_async()` with
-- Celery's task protocol 2: the body is base64 of the JSON
-- [args, kwargs, embed], the routing headers carry the task name and id.
-- Differences from a Python producer, none of which a worker reads: argsrepr
-- and kwargsrepr are the JSON text of args/kwargs (Python writes its repr),
-- origin names the database role and database, reply_to is empty (no
-- producer waits on an rpc:// reply), and the body's JSON has jsonb's key
-- order. tests/test_tasks_from_sql.py compares it with a real delay(), field
-- by field.

CREATE FUNCTION pg_broker_task_message(
    p_task     text,
    p_task_id  uuid,
    p_args     jsonb DEFAULT '[]',
    p_kwargs   jsonb DEFAULT '{}',
    p_queue    text DEFAULT 'celery',
    p_priority integer DEFAULT 0,
    p_eta      timestamptz DEFAULT NULL,
    p_expires  timestamptz DEFAULT NULL,
    p_headers  jsonb DEFAULT '{}'
) RETURNS jsonb
    LANGUAGE sql VOLATILE AS $$
    SELECT jsonb_build_object(
        'body', translate(encode(convert_to(jsonb_build_array(
                    p_args, p_kwargs,
                    jsonb_build_object('callbacks', NULL, 'errbacks', NULL,
                                       'chain', NULL, 'chord', NULL))::text, 'UTF8'),
                    'base64'), E'\n', ''),
        'content-type', 'application/json',
        'content-encoding', 'utf-8',
        'headers', jsonb_build_object(
            'lang', 'py', 'task', p_task, 'id', p_task_id, 'shadow', NULL,
            'eta', iso[1], 'expires', iso[2],
            'group', NULL, 'group_index', NULL, 'retries', 0,
            'timelimit', jsonb_build_array(NULL, NULL),
            'root_id', p_task_id, 'parent_id', NULL,
            'argsrepr', p_args::text, 'kwargsrepr', p_kwargs::text,
            'origin', format('sql:%s@%s', current_user, current_database()),
            'ignore_result', false, 'replaced_task_nesting', 0,
            'stamped_headers', NULL, 'stamps', '{}'::jsonb
        ) || coalesce(p_headers, '{}'),
        'properties', jsonb_build_object(
            'correlation_id', p_task_id, 'reply_to', '',
            'delivery_mode', 2,
            'delivery_info', jsonb_build_object('exchange', '', 'routing_key', p_queue),
            'priority', p_priority, 'body_encoding', 'base64',
            'delivery_tag', gen_random_uuid()
        ) || CASE WHEN p_expires IS NULL THEN '{}'::jsonb
                  ELSE jsonb_build_object('expiration', greatest(0, round(
                           extract(epoch FROM p_expires - now()) * 1000))::bigint::text) END
    )
      -- Celery's times: datetime.isoformat() of an aware UTC time.
      FROM (SELECT array_agg(to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00'
                             ORDER BY n) AS iso
              FROM unnest(ARRAY[p_eta, p_expires]) WITH ORDINALITY AS u(t, n)) times;
$$;

-- pg_broker_enqueue_task ------------------------------------------------------
-- Stores a Celery task message in a durable queue, as `apply_async(args,
-- kwargs, queue=..., priority=..., eta=..., expires=..., task_id=...)` would,
-- and wakes the queue's consumers when the transaction commits. Returns the
-- task id: `AsyncResult(id)` reads its result from the app's result backend.
-- p_headers adds Celery headers; `job_id`, `user_id` and `max_attempts` also
-- fill the row's columns, as the transport does. The queue's x-message-ttl
-- (broker_queues.message_ttl) caps the message's lifetime, as on publish.

CREATE FUNCTION pg_broker_enqueue_task(
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
           least(p_expires, now() + (SELECT message_ttl FROM broker_queues WHERE name = p_queue));
    PERFORM pg_broker_wake(p_queue);
    RETURN v_id;
END
$$;

-- Job events -----------------------------------------------------------------
-- `version` counts the changes a user can see (status, counters, progress,
-- error). A change of a job that a stream watches notifies channel
-- 'pgbroker_jobs' with '<job id>:<version>'; an HTTP API process LISTENs on
-- that one channel for all its streams and re-reads the job (under its
-- user's row-level security); the version is the event id a stream resumes
-- from (Last-Event-ID).
--
-- PostgreSQL (up to 18) signals every session of the database that LISTENs
-- on any channel for each NOTIFY (≈15 µs of server CPU per listening session,
-- workers included). So: one channel, not one per job (per-job channels
-- would cost the same signals plus a LISTEN/UNLISTEN per stream), and no
-- NOTIFY at all for a job nobody watches: a stream's API process records
-- (job, its LISTEN session's pid) in job_event_watchers while it watches.
-- Rows of sessions that are gone are swept when an API process connects.

ALTER TABLE jobs ADD COLUMN version bigint NOT NULL DEFAULT 1;

-- UNLOGGED: after a crash no session listens any more anyway.
CREATE UNLOGGED TABLE job_event_watchers (
    job_id       uuid NOT NULL,
    listener_pid integer NOT NULL,
    since        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, listener_pid)
);

CREATE FUNCTION pg_broker_job_version() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END
$$;

-- Pinned search_path: it also fires inside submit_job (011), whose is empty.
CREATE FUNCTION pg_broker_job_notify() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM job_event_watchers WHERE job_id = NEW.id) THEN
        PERFORM pg_notify('pgbroker_jobs', NEW.id::text || ':' || NEW.version);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_version BEFORE UPDATE ON jobs
    FOR EACH ROW
    WHEN ((OLD.status, OLD.total_tasks, OLD.completed_tasks, OLD.failed_tasks,
           OLD.cancelled_tasks, OLD.progress, OLD.error)
          IS DISTINCT FROM
          (NEW.status, NEW.total_tasks, NEW.completed_tasks, NEW.failed_tasks,
           NEW.cancelled_tasks, NEW.progress, NEW.error))
    EXECUTE FUNCTION pg_broker_job_version();
CREATE TRIGGER jobs_notify AFTER UPDATE ON jobs
    FOR EACH ROW WHEN (OLD.version IS DISTINCT FROM NEW.version)
    EXECUTE FUNCTION pg_broker_job_notify();

-- Serves the per-user active-job limit of submit_job (011).
CREATE INDEX jobs_user_active_idx ON jobs (user_id) WHERE status IN ('pending', 'processing');

-- What users may submit --------------------------------------------------------
-- A job type names the Celery tasks one submission creates, in order: each
-- task spec is {"task": name, "queue": queue} and runs once per job with the
-- job id as its argument, or, with "for_each": key, once per element of the
-- job's params -> key with (job id, index). The app registers its types here
-- (the package job below); users can submit nothing else.

CREATE TABLE job_types (
    job_type    text PRIMARY KEY,
    tasks       jsonb NOT NULL CHECK (jsonb_typeof(tasks) = 'array' AND jsonb_array_length(tasks) > 0),
    description text
);

INSERT INTO job_types (job_type, tasks, description) VALUES (
    'package',
    '[{"task": "tasks.audio.synthesize_chapter", "queue": "audio", "for_each": "chapters"},
      {"task": "tasks.documents.render_package_pdf", "queue": "documents"}]',
    'chapters of text: one MP3 per chapter (audio queue), one PDF of them all (documents queue)'
);

-- Per-user limits: the row with user_id NULL applies to everyone without a
-- row of their own. Active = pending or processing.
CREATE TABLE job_limits (
    user_id           uuid UNIQUE NULLS NOT DISTINCT,
    max_active_jobs   integer NOT NULL CHECK (max_active_jobs >= 0),
    max_request_bytes integer NOT NULL CHECK (max_request_bytes > 0)
);

INSERT INTO job_limits (user_id, max_active_jobs, max_request_bytes)
VALUES (NULL, 10, 1048576);

-- One row per (user, Idempotency-Key): the same key returns the same job,
-- never a second one; the request's hash tells a retry from a reuse of the
-- key for a different request.
CREATE TABLE job_idempotency_keys (
    user_id        uuid NOT NULL,
    key            text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    job_id         uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    request_sha256 text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

CREATE INDEX job_idempotency_keys_job_id_idx ON job_idempotency_keys (job_id);
