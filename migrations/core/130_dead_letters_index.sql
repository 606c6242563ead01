-- core 130: dead letters are counted without reading the finished rows.
--
-- The metrics (pg-broker metrics, its Prometheus endpoint) count each
-- queue's dead and failed tasks on every scrape. The finished-rows index
-- (core 100) holds every completed row too, as many as a week of traffic
-- before retention; this one holds only the dead letters, which a healthy
-- system has few of. (Built once here with a scan of job_tasks; a very large
-- table may want it built beforehand with CREATE INDEX CONCURRENTLY under
-- this name.)

CREATE INDEX IF NOT EXISTS job_tasks_dead_letters_idx ON job_tasks (queue)
    WHERE status IN ('dead', 'failed');
