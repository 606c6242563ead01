-- core 100: the broker's schema, as the legacy migrations 002, 003 and 005
-- left it (the baseline of the core track; see migrations/README.md).
--
-- Any role that may create tables in its schema installs this file: it
-- creates no role, no schema, no extension and refers to no role but PUBLIC.
-- Row-level security, the Supabase roles and their grants are the Supabase
-- layer's (migrations/supabase/).
--
-- A database the single-track runner migrated (legacy 001-005 applied) has
-- all of this already: the runner records this file as applied without
-- running it. Later legacy files (006...) are repeated by the core and layer
-- files that name them in their `-- legacy:` line.
--
-- legacy: 002 003 005
--
-- The job model and the message store:
--
--   jobs           one user request ("generate this package")
--   job_tasks      one row per Kombu message on a durable queue; for a job, one
--                  row per unit of work (a chapter's audio, the PDF)
--   job_artifacts  files a task produced, stored in object storage (never the
--                  bytes themselves)
--
-- Task life cycle (the one place it is written down; pg_broker/states.py
-- mirrors it):
--
--   pending ──claim──▶ claimed ──start──▶ processing ──complete──▶ completed
--      ▲                  │                    │
--      │                  └──────┬─────────────┘
--      │                         │ fail / lease expired / requeue
--      └──── attempts < max ─────┤
--                                └── attempts exhausted ──▶ failed (the task raised)
--                                                           dead   (never finished:
--                                                                   lease lost, poison
--                                                                   message, expired)
--   pending ──cancel──▶ cancelled
--
-- `attempts` counts deliveries: claim increments it, so a message that kills
-- its worker on every delivery is dead after max_attempts deliveries.


CREATE TABLE jobs (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         uuid,
    job_type        text NOT NULL DEFAULT 'package',
    title           text,
    params          jsonb NOT NULL DEFAULT '{}'::jsonb,
    status          text NOT NULL DEFAULT 'pending'
                    CONSTRAINT jobs_status_check
                    CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    total_tasks     integer NOT NULL DEFAULT 0 CHECK (total_tasks >= 0),
    completed_tasks integer NOT NULL DEFAULT 0 CHECK (completed_tasks >= 0),
    failed_tasks    integer NOT NULL DEFAULT 0 CHECK (failed_tasks >= 0),
    cancelled_tasks integer NOT NULL DEFAULT 0 CHECK (cancelled_tasks >= 0),
    progress        numeric(5, 2) NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    completed_at    timestamptz
);

CREATE INDEX jobs_user_id_created_idx ON jobs (user_id, created_at DESC);
CREATE INDEX jobs_status_idx ON jobs (status);

CREATE SEQUENCE job_tasks_sequence_seq AS bigint;

CREATE TABLE job_tasks (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- FIFO order inside a priority; a job submission may set it explicitly.
    sequence        bigint NOT NULL DEFAULT nextval('job_tasks_sequence_seq'),
    queue           text NOT NULL CHECK (length(queue) BETWEEN 1 AND 1024),
    -- 0..9, higher is delivered first (RabbitMQ's direction).
    priority        smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    job_id          uuid REFERENCES jobs (id) ON DELETE CASCADE,
    user_id         uuid,
    task_type       text,           -- Celery task name (headers.task)
    task_id         text,           -- Celery task id (headers.id)
    payload         jsonb NOT NULL, -- the Kombu envelope, body included
    status          text NOT NULL DEFAULT 'pending'
                    CONSTRAINT job_tasks_status_check
                    CHECK (status IN ('pending', 'claimed', 'processing',
                                      'completed', 'failed', 'dead', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts    integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    worker_id       text,
    lease_token     uuid,
    lease_expires_at timestamptz,
    visible_at      timestamptz NOT NULL DEFAULT now(),  -- ETA, countdown, retry backoff
    expires_at      timestamptz,                         -- message TTL
    last_heartbeat  timestamptz,
    error           text,
    result          jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    claimed_at      timestamptz,
    started_at      timestamptz,
    completed_at    timestamptz,
    CONSTRAINT job_tasks_lease_check
        CHECK (status NOT IN ('claimed', 'processing') OR lease_token IS NOT NULL)
) WITH (
    -- The hot table: rows arrive and leave all day. Vacuum it early and often,
    -- and leave room on each page for HOT updates (heartbeats, status).
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- Serves the claim: only ready rows are indexed, so the index stays as small
-- as the backlog however many finished rows the table still holds.
CREATE INDEX job_tasks_claim_idx ON job_tasks (queue, priority DESC, sequence)
    WHERE status = 'pending';
-- Serves heartbeat_task(), reclaim_stale_tasks() and the worker-health query:
-- the held rows, few (workers x prefetch) however long the backlog. Keyed on
-- worker_id, not lease_expires_at: no index holds a column a heartbeat
-- writes (lease_expires_at, last_heartbeat, updated_at), so lease renewals
-- are HOT updates that touch no index at all.
CREATE INDEX job_tasks_lease_idx ON job_tasks (worker_id)
    WHERE status IN ('claimed', 'processing');
-- Serves the TTL sweep of reclaim_stale_tasks() without reading the backlog;
-- only messages that have a TTL are in it.
CREATE INDEX job_tasks_expiry_idx ON job_tasks (expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;
CREATE INDEX job_tasks_job_id_idx ON job_tasks (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX job_tasks_task_id_idx ON job_tasks (task_id);
-- Serves retention (finished rows leave by age).
CREATE INDEX job_tasks_finished_idx ON job_tasks (completed_at)
    WHERE status IN ('completed', 'failed', 'dead', 'cancelled');

CREATE TABLE job_artifacts (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id        uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    task_id       text NOT NULL,    -- the Celery task id that produced it
    user_id       uuid,
    kind          text NOT NULL CHECK (kind IN ('audio', 'pdf', 'other')),
    storage_backend text NOT NULL,  -- 'local' | 'supabase'
    storage_path  text NOT NULL,    -- {userId}/{jobId}/{kind}/{taskId}.{ext}
    content_type  text NOT NULL,
    bytes         bigint NOT NULL CHECK (bytes >= 0),
    sha256        text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    duration_seconds numeric(10, 3),
    metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- Idempotent uploads: a re-run task writes the same path, one row.
    CONSTRAINT job_artifacts_path_key UNIQUE (storage_backend, storage_path)
);

CREATE INDEX job_artifacts_job_id_idx ON job_artifacts (job_id);

-- Broker plumbing shared by every process (kombu keeps it per process).

CREATE TABLE broker_queues (
    name          text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 1024),
    durable       boolean NOT NULL DEFAULT true,
    exclusive     boolean NOT NULL DEFAULT false,
    auto_delete   boolean NOT NULL DEFAULT false,
    message_ttl   interval,          -- x-message-ttl
    expires       interval,          -- x-expires: dropped after this long unused
    max_priority  smallint,          -- x-max-priority (informational)
    arguments     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE broker_bindings (
    exchange      text NOT NULL,
    exchange_type text NOT NULL CHECK (exchange_type IN ('direct', 'topic', 'fanout', 'headers')),
    routing_key   text NOT NULL DEFAULT '',
    pattern       text NOT NULL DEFAULT '',
    queue         text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (exchange, routing_key, pattern, queue)
);

CREATE INDEX broker_bindings_queue_idx ON broker_bindings (queue);

-- Messages of non-durable queues (events, remote-control replies): never
-- worth a WAL write, gone after a server crash, as with any broker.
CREATE UNLOGGED TABLE broker_transient_messages (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue       text NOT NULL,
    priority    smallint NOT NULL DEFAULT 0,
    payload     jsonb NOT NULL,
    expires_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
) WITH (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);

CREATE INDEX broker_transient_messages_queue_idx
    ON broker_transient_messages (queue, priority DESC, id);


-- The task functions (the product's RPC contract) and the triggers that
-- keep jobs true. Every function that finishes a task is fenced by the
-- lease token: a worker whose lease expired (and whose row was reclaimed
-- and claimed by another worker) changes nothing and is told so.

-- updated_at ---------------------------------------------------------------

CREATE FUNCTION pg_broker_touch_updated_at() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_touch_updated_at BEFORE UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION pg_broker_touch_updated_at();
CREATE TRIGGER job_tasks_touch_updated_at BEFORE UPDATE ON job_tasks
    FOR EACH ROW EXECUTE FUNCTION pg_broker_touch_updated_at();
CREATE TRIGGER job_artifacts_touch_updated_at BEFORE UPDATE ON job_artifacts
    FOR EACH ROW EXECUTE FUNCTION pg_broker_touch_updated_at();

-- claim_tasks ---------------------------------------------------------------
-- Claims up to p_batch_size ready rows of the given queues for one worker:
-- highest priority first, then sequence (FIFO), and returns them in that
-- order. Ready means pending, visible (ETA/backoff reached) and not expired.
-- Each claimed row gets the batch's lease token, a lease of p_lease, and one
-- more attempt. SKIP LOCKED lets any number of workers claim at once without
-- waiting on one another.
--
-- Each queue is read on its own (`queue = q.queue`), so job_tasks_claim_idx
-- hands rows over already in (priority DESC, sequence) order and a claim reads
-- about p_batch_size index entries however long the backlog is; one scan with
-- `queue = ANY (p_queues)` would read and sort the whole backlog on every
-- claim. With several queues each one locks up to p_batch_size rows and the
-- best p_batch_size of them are claimed; the others are released at commit.

CREATE FUNCTION claim_tasks(
    p_worker_id  text,
    p_queues     text[],
    p_batch_size integer DEFAULT 1,
    p_lease      interval DEFAULT interval '5 minutes'
) RETURNS SETOF job_tasks
    LANGUAGE sql VOLATILE AS $$
    WITH ready AS (
        SELECT r.id
          FROM (SELECT DISTINCT unnest(p_queues) AS queue) q
         CROSS JOIN LATERAL (
                SELECT t.id, t.priority, t.sequence
                  FROM job_tasks t
                 WHERE t.status = 'pending'
                   AND t.queue = q.queue
                   AND t.visible_at <= now()
                   AND (t.expires_at IS NULL OR t.expires_at > now())
                 ORDER BY t.priority DESC, t.sequence
                 LIMIT greatest(p_batch_size, 1)
                   FOR UPDATE SKIP LOCKED
               ) r
         ORDER BY r.priority DESC, r.sequence
         LIMIT greatest(p_batch_size, 1)
    ), token AS (
        -- A CTE is evaluated once: one lease token for the whole batch.
        SELECT gen_random_uuid() AS lease_token
    ), claimed AS (
        UPDATE job_tasks t
           SET status = 'claimed',
               worker_id = p_worker_id,
               lease_token = token.lease_token,
               lease_expires_at = now() + p_lease,
               last_heartbeat = now(),
               claimed_at = now(),
               attempts = t.attempts + 1
          FROM ready, token
         WHERE t.id = ready.id
        RETURNING t.*
    )
    SELECT * FROM claimed ORDER BY priority DESC, sequence;
$$;

-- heartbeat_task ------------------------------------------------------------
-- Extends the leases of the rows a worker holds: all of them, or those of one
-- lease token, or one row. Returns how many leases were extended; rows the
-- worker no longer holds are not touched.

CREATE FUNCTION heartbeat_task(
    p_worker_id   text,
    p_lease_token uuid DEFAULT NULL,
    p_task_id     bigint DEFAULT NULL,
    p_lease       interval DEFAULT interval '5 minutes'
) RETURNS integer
    LANGUAGE sql VOLATILE AS $$
    WITH extended AS (
        UPDATE job_tasks
           SET lease_expires_at = now() + p_lease,
               last_heartbeat = now()
         WHERE status IN ('claimed', 'processing')
           AND worker_id = p_worker_id
           AND (p_lease_token IS NULL OR lease_token = p_lease_token)
           AND (p_task_id IS NULL OR id = p_task_id)
        RETURNING 1
    )
    SELECT count(*)::integer FROM extended;
$$;

-- start_task ----------------------------------------------------------------
-- claimed -> processing, when the worker begins executing. False if fenced.

CREATE FUNCTION start_task(p_task_id bigint, p_lease_token uuid) RETURNS boolean
    LANGUAGE sql VOLATILE AS $$
    WITH started AS (
        UPDATE job_tasks
           SET status = 'processing',
               started_at = coalesce(started_at, now()),
               last_heartbeat = now()
         WHERE id = p_task_id
           AND lease_token = p_lease_token
           AND status IN ('claimed', 'processing')
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM started);
$$;

-- complete_task -------------------------------------------------------------
-- Marks a held row completed. Returns false, changing nothing, when the lease
-- token is no longer the row's (the lease expired and the row moved on).

CREATE FUNCTION complete_task(
    p_task_id     bigint,
    p_lease_token uuid,
    p_result      jsonb DEFAULT NULL
) RETURNS boolean
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE job_tasks
       SET status = 'completed',
           result = coalesce(p_result, result),
           error = NULL,
           completed_at = now(),
           lease_token = NULL,
           lease_expires_at = NULL
     WHERE id = p_task_id
       AND lease_token = p_lease_token
       AND status IN ('claimed', 'processing');
    IF NOT FOUND THEN
        RAISE NOTICE 'complete_task(%): lease token % no longer holds the task; nothing changed',
            p_task_id, p_lease_token;
        RETURN false;
    END IF;
    RETURN true;
END
$$;

-- fail_task -----------------------------------------------------------------
-- Records a failed attempt. While attempts < max_attempts (and p_retry), the
-- row goes back to pending, visible again after an exponential backoff:
-- p_backoff * 2^(attempts-1), at most p_max_backoff. Otherwise it is final:
-- 'failed', the error kept (p_error NULL keeps the error the task already
-- recorded). Returns the row's new status, or NULL when fenced.

CREATE FUNCTION fail_task(
    p_task_id     bigint,
    p_lease_token uuid,
    p_error       text,
    p_retry       boolean DEFAULT true,
    p_backoff     interval DEFAULT interval '10 seconds',
    p_max_backoff interval DEFAULT interval '1 hour'
) RETURNS text
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_status text;
BEGIN
    UPDATE job_tasks
       SET status = CASE WHEN p_retry AND attempts < max_attempts
                         THEN 'pending' ELSE 'failed' END,
           visible_at = CASE WHEN p_retry AND attempts < max_attempts
                             THEN now() + least(p_backoff * power(2, greatest(attempts - 1, 0)),
                                                p_max_backoff)
                             ELSE visible_at END,
           completed_at = CASE WHEN p_retry AND attempts < max_attempts
                               THEN NULL ELSE now() END,
           error = coalesce(p_error, error),
           worker_id = NULL,
           lease_token = NULL,
           lease_expires_at = NULL
     WHERE id = p_task_id
       AND lease_token = p_lease_token
       AND status IN ('claimed', 'processing')
    RETURNING status INTO v_status;
    IF v_status IS NULL THEN
        RAISE NOTICE 'fail_task(%): lease token % no longer holds the task; nothing changed',
            p_task_id, p_lease_token;
    END IF;
    RETURN v_status;
END
$$;

-- reclaim_stale_tasks -------------------------------------------------------
-- The watchdog. Rows whose lease expired (their worker died or hung) go back
-- to pending, or to dead once they have used all their attempts. Pending rows
-- whose TTL passed are dropped: messages with no job are deleted, as any
-- broker drops an expired message; a job's task is marked dead so its job can
-- finish. Returns how many rows it reclaimed (expired leases). Safe to call
-- from SQL at any time and from many processes at once. A held row whose
-- lease and TTL both passed ends dead ("message expired before delivery")
-- when it is a job's task, and is deleted when it is a plain message.
--
-- The lock order that keeps job cancels, purges, the maintenance sweep and
-- workers from deadlocking with one another:
--   * statements that sweep task rows (cancel_pending_tasks, transport_purge,
--     transport_maintain and this function) never wait for a task row: they
--     lock with SKIP LOCKED, since a row someone holds is being claimed (its
--     worker then skips the task of a cancelled job), settled, or swept by
--     another of them;
--   * jobs are locked after task rows, by the statement trigger
--     pg_broker_job_tasks_changed below, in one pass in id order per
--     statement;
--   * a transaction locks no task row after its jobs (cancel_job: tasks, then
--     the job).
-- So this function moves expired leases and expired job tasks in ONE
-- statement: the trigger locks all their jobs at once (two statements, each
-- in id order but not together, deadlocked with a purge or another worker's
-- maintenance; legacy 005 fixed that).

CREATE FUNCTION reclaim_stale_tasks() RETURNS integer
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_reclaimed integer;
BEGIN
    WITH stale AS (
        SELECT id, true AS stale,
               CASE WHEN attempts >= max_attempts THEN 'lease lost'
                    WHEN job_id IS NOT NULL AND expires_at < now() THEN 'expired'
                    ELSE 'retry' END AS fate
          FROM job_tasks
         WHERE status IN ('claimed', 'processing')
           AND lease_expires_at < now()
           FOR UPDATE SKIP LOCKED
    ), expired AS (
        SELECT id, false AS stale, 'expired' AS fate
          FROM job_tasks
         WHERE status = 'pending' AND expires_at < now() AND job_id IS NOT NULL
           FOR UPDATE SKIP LOCKED
    ), due AS (
        SELECT * FROM stale UNION ALL SELECT * FROM expired
    ), changed AS (
        UPDATE job_tasks t
           SET status = CASE WHEN due.fate = 'retry' THEN 'pending' ELSE 'dead' END,
               error = CASE due.fate
                           WHEN 'lease lost'
                           THEN format('lease expired on worker %s after %s of %s deliveries',
                                       t.worker_id, t.attempts, t.max_attempts)
                           WHEN 'expired' THEN 'message expired before delivery'
                           ELSE t.error END,
               completed_at = CASE WHEN due.fate = 'retry' THEN NULL ELSE now() END,
               visible_at = CASE WHEN due.stale THEN now() ELSE t.visible_at END,
               worker_id = NULL,
               lease_token = NULL,
               lease_expires_at = NULL
          FROM due
         WHERE t.id = due.id
        RETURNING due.stale
    )
    SELECT count(*) FILTER (WHERE stale) INTO v_reclaimed FROM changed;

    -- After the UPDATE: a plain message it just returned to pending goes too.
    -- No job, so no trigger and no job lock; SKIP LOCKED, so it never waits.
    DELETE FROM job_tasks
     WHERE id IN (SELECT id FROM job_tasks
                   WHERE status = 'pending' AND expires_at < now() AND job_id IS NULL
                     FOR UPDATE SKIP LOCKED);
    RETURN v_reclaimed;
END
$$;

-- Job status -----------------------------------------------------------------
-- The rule, applied whenever a job's tasks are inserted or change status:
--   total_tasks      tasks inserted for the job (retention deleting finished
--                    rows does not change the counters)
--   completed_tasks  tasks whose status is completed
--   failed_tasks     tasks whose status is failed or dead
--   cancelled_tasks  tasks whose status is cancelled (e.g. purged unstarted)
--   progress         100 * (completed + failed + cancelled) / total
--   status           cancelled stays cancelled;
--                    completed when every task completed;
--                    once every task finished otherwise: failed when one
--                    failed or died, else cancelled;
--                    processing once any task was claimed;
--                    pending before that.
--   started_at       first claim (a task that expired unclaimed does not
--                    start its job); completed_at when it finished.
--   error            the first final task error.
-- A task's job_id never changes.
--
-- The triggers are per statement, not per row: one claim, watchdog run or
-- batch of acks can move tasks of many jobs at once, and concurrent
-- statements that locked those jobs row by row, each in its own order,
-- deadlocked. Here each statement sums its changes per job, locks the jobs it
-- must change in id order, and updates each once. A claim of an already
-- started job changes no counter and locks nothing; one that starts a job
-- never waits for it (see below).

CREATE FUNCTION pg_broker_job_tasks_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    v_deltas   jsonb;
    v_starting uuid[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE job_id IS NOT NULL) THEN
        RETURN NULL;  -- plain Celery messages: no job to keep
    END IF;
    IF TG_OP = 'INSERT' THEN
        SELECT jsonb_agg(d) INTO v_deltas
          FROM (SELECT n.job_id,
                       count(*) AS total,
                       count(*) FILTER (WHERE n.status = 'completed') AS completed,
                       count(*) FILTER (WHERE n.status IN ('failed', 'dead')) AS failed,
                       count(*) FILTER (WHERE n.status = 'cancelled') AS cancelled,
                       bool_or(n.status IN ('claimed', 'processing', 'completed', 'failed')) AS started,
                       (array_agg(n.error ORDER BY n.id)
                            FILTER (WHERE n.status IN ('failed', 'dead')))[1] AS error
                  FROM new_rows n
                 WHERE n.job_id IS NOT NULL
                 GROUP BY n.job_id) d;
    ELSE
        SELECT jsonb_agg(d) INTO v_deltas
          FROM (SELECT n.job_id,
                       0 AS total,
                       sum((n.status = 'completed')::integer
                           - (o.status = 'completed')::integer) AS completed,
                       sum((n.status IN ('failed', 'dead'))::integer
                           - (o.status IN ('failed', 'dead'))::integer) AS failed,
                       sum((n.status = 'cancelled')::integer
                           - (o.status = 'cancelled')::integer) AS cancelled,
                       bool_or(n.status IN ('claimed', 'processing', 'completed', 'failed')) AS started,
                       (array_agg(n.error ORDER BY n.id)
                            FILTER (WHERE n.status IN ('failed', 'dead')))[1] AS error
                  FROM new_rows n
                  JOIN old_rows o ON o.id = n.id
                 WHERE n.job_id IS NOT NULL
                   AND n.status IS DISTINCT FROM o.status
                 GROUP BY n.job_id) d;
    END IF;

    -- Keep only the jobs that change; a snapshot read, no lock. started_at is
    -- never reset, so a job seen started needs nothing for a claim.
    SELECT jsonb_agg(to_jsonb(d) || jsonb_build_object('counted',
               d.total <> 0 OR d.completed <> 0 OR d.failed <> 0 OR d.cancelled <> 0))
      INTO v_deltas
      FROM jsonb_to_recordset(v_deltas)
               AS d(job_id uuid, total integer, completed integer, failed integer,
                    cancelled integer, started boolean, error text)
      JOIN jobs j ON j.id = d.job_id
     WHERE d.total <> 0 OR d.completed <> 0 OR d.failed <> 0 OR d.cancelled <> 0
        OR (d.started AND j.started_at IS NULL);
    IF v_deltas IS NULL THEN
        RETURN NULL;
    END IF;

    -- Jobs whose counters change: locked in id order, waiting if need be.
    PERFORM 1
       FROM jobs
      WHERE id IN (SELECT (e ->> 'job_id')::uuid FROM jsonb_array_elements(v_deltas) e
                    WHERE (e ->> 'counted')::boolean)
      ORDER BY id
        FOR NO KEY UPDATE;
    -- Jobs that only start (a claim): skipped while another transaction holds
    -- them. That one is starting the job too, finishing a task of it (which
    -- starts it as well) or cancelling it; waiting could deadlock with a
    -- cancel that holds the job and waits for a task row this claim holds.
    SELECT array_agg(id) INTO v_starting
      FROM (SELECT id
              FROM jobs
             WHERE id IN (SELECT (e ->> 'job_id')::uuid FROM jsonb_array_elements(v_deltas) e
                           WHERE NOT (e ->> 'counted')::boolean)
             ORDER BY id
               FOR NO KEY UPDATE SKIP LOCKED) startable;

    -- The jobs are locked by this transaction, so this statement's snapshot
    -- holds their latest counters.
    UPDATE jobs j
       SET total_tasks = c.total,
           completed_tasks = c.completed,
           failed_tasks = c.failed,
           cancelled_tasks = c.cancelled,
           progress = CASE WHEN c.total = 0 THEN 0
                           ELSE round(100.0 * c.finished / c.total, 2) END,
           status = CASE
                        WHEN j.status = 'cancelled' THEN 'cancelled'
                        WHEN c.total > 0 AND c.completed = c.total THEN 'completed'
                        WHEN c.total > 0 AND c.finished = c.total AND c.failed > 0 THEN 'failed'
                        WHEN c.total > 0 AND c.finished = c.total THEN 'cancelled'
                        WHEN c.started_at IS NOT NULL THEN 'processing'
                        ELSE 'pending'
                    END,
           started_at = c.started_at,
           completed_at = CASE
                              WHEN j.status <> 'cancelled' AND c.total > 0
                                   AND c.finished = c.total
                              THEN coalesce(j.completed_at, now())
                              ELSE j.completed_at
                          END,
           error = coalesce(j.error, c.error)
      FROM (SELECT cur.id,
                   cur.total_tasks + d.total AS total,
                   cur.completed_tasks + d.completed AS completed,
                   cur.failed_tasks + d.failed AS failed,
                   cur.cancelled_tasks + d.cancelled AS cancelled,
                   cur.completed_tasks + d.completed + cur.failed_tasks + d.failed
                       + cur.cancelled_tasks + d.cancelled AS finished,
                   CASE WHEN d.started THEN coalesce(cur.started_at, now())
                        ELSE cur.started_at END AS started_at,
                   d.error
              FROM jsonb_to_recordset(v_deltas)
                       AS d(job_id uuid, total integer, completed integer, failed integer,
                            cancelled integer, started boolean, error text, counted boolean)
              JOIN jobs cur ON cur.id = d.job_id
             WHERE d.counted OR d.job_id = ANY (v_starting)) c
     WHERE j.id = c.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER job_tasks_job_insert AFTER INSERT ON job_tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pg_broker_job_tasks_changed();
CREATE TRIGGER job_tasks_job_status AFTER UPDATE ON job_tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pg_broker_job_tasks_changed();

-- Workers call these as the table owner (or, with the Supabase layer,
-- service_role); nobody else may.
REVOKE ALL ON FUNCTION claim_tasks(text, text[], integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION heartbeat_task(text, uuid, bigint, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION start_task(bigint, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION complete_task(bigint, uuid, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION fail_task(bigint, uuid, text, boolean, interval, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION reclaim_stale_tasks() FROM PUBLIC;
