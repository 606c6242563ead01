-- core 150: the live consumers of each queue, so that `pg-broker status` and
-- Flower's Broker tab show idle workers too (a worker that holds no task left
-- no trace in job_tasks).
--
-- A consuming process registers each queue it consumes (one row per queue and
-- worker_id, the `host:pid` its claims write into job_tasks.worker_id) from its
-- lease thread, and renews the row every lease/3 seconds while it lives, busy
-- or idle (the thread does not wait for the worker's tasks). A consumer that
-- cancels, or closes its channel, deletes its rows; one that died stops
-- renewing and its rows count as gone once expires_at passes (they are
-- deleted by the next registration of any consumer).
--
-- UNLOGGED: nothing here is worth a WAL record; after a crash of the server
-- the table is empty and live consumers register again within lease/3.

CREATE UNLOGGED TABLE broker_consumers (
    queue       text NOT NULL,
    worker_id   text NOT NULL,
    since       timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (queue, worker_id)
);
