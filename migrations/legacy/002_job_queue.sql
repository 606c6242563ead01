-- 002: the job model and the message store.
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
