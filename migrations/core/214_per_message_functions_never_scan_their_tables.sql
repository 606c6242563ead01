-- core 214: every per-message function that finds its rows by key reads them
-- through an index whatever its session's plan was made on.
--
-- What core 213 found in pg_broker_claim holds for each function that keeps
-- its plans for the session — plpgsql functions, and SQL functions too on
-- PostgreSQL 18, whose plans are cached since: after a few calls on empty
-- tables (a fresh database, a drained and vacuumed queue, results expired and
-- vacuumed away) the cheapest plan of a lookup by key is a sequential scan,
-- and the session keeps it while the table grows, until the table's
-- statistics change. Seen with 3,000 rows (tests/integration/test_schema.py):
-- a lease renewal read the whole backlog (13 ms), a chord part every chord
-- counter, a wait for a result every stored result (results stay a day by
-- default). With sequential scans off inside them they read by primary key
-- (or the index core 213's functions read), as their plans on a large table
-- did. Left as they were: the sweeps that read many rows by design
-- (reclaim_stale_tasks, pg_broker_move_to_history) and functions on small
-- tables of their own (pg_broker_wake).
--
-- A later migration that redefines one of these with CREATE OR REPLACE must
-- repeat the setting (CREATE OR REPLACE replaces a function's settings);
-- test_schema.py plans each on empty tables and fails if one scans.

-- pg_broker_renew and pg_broker_start (core 113) joined the held ids to
-- job_tasks (unnest(ids, tokens)), which on empty-table statistics planned a
-- walk of the whole primary key: a lease renewal read 3,007 rows to renew
-- one (pg_broker_claim's ack had the same shape: core 230). Their bodies
-- are core 113's with the rows found by primary key.
CREATE OR REPLACE FUNCTION pg_broker_renew(p_ids bigint[], p_tokens uuid[], p_lease interval)
    RETURNS SETOF bigint
    LANGUAGE sql VOLATILE SET enable_seqscan = off AS $$
    UPDATE job_tasks t
       SET lease_expires_at = now() + p_lease, last_heartbeat = now()
     WHERE t.id = ANY (p_ids) AND t.lease_token = p_tokens[array_position(p_ids, t.id)]
       AND t.status IN ('claimed', 'processing', 'cancelled')
    RETURNING t.id
$$;

CREATE OR REPLACE FUNCTION pg_broker_start(p_ids bigint[], p_tokens uuid[])
    RETURNS SETOF bigint
    LANGUAGE sql VOLATILE SET enable_seqscan = off AS $$
    UPDATE job_tasks t
       SET status = 'processing', started_at = coalesce(t.started_at, now()),
           last_heartbeat = now()
     WHERE t.id = ANY (p_ids) AND t.lease_token = p_tokens[array_position(p_ids, t.id)]
       AND t.status IN ('claimed', 'processing')
    RETURNING t.id
$$;

ALTER FUNCTION fail_task(bigint, uuid, text, boolean, interval, interval) SET enable_seqscan = off;
ALTER FUNCTION heartbeat_task(text, uuid, bigint, interval) SET enable_seqscan = off;
ALTER FUNCTION start_task(bigint, uuid) SET enable_seqscan = off;
ALTER FUNCTION complete_task(bigint, uuid, jsonb) SET enable_seqscan = off;
ALTER FUNCTION claim_tasks(text, text[], integer, interval) SET enable_seqscan = off;
ALTER FUNCTION pg_broker_require_held_row(text, bigint, uuid) SET enable_seqscan = off;
ALTER FUNCTION pg_broker_result_set(text, bytea, text, interval, boolean) SET enable_seqscan = off;

-- pg_broker_await_results (core 200) anti-joined the awaited keys to the
-- stored results: on empty-table statistics the join read the whole primary
-- key once per wait (a full index scan, materialised) even with sequential
-- scans off. Its body is core 200's with that one test written as a lookup
-- per awaited key (a subquery on the primary key, which no join replaces).
CREATE OR REPLACE FUNCTION pg_broker_await_results(p_keys text[]) RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT SET enable_seqscan = off AS $$
DECLARE
    v_keys text[];
    v_lock integer;
BEGIN
    SELECT array_agg(DISTINCT k) INTO v_keys
      FROM unnest(p_keys) k
     WHERE (SELECT r.key FROM task_results r
             WHERE r.key = k AND r.state IN ('SUCCESS', 'FAILURE', 'REVOKED')
               AND (r.expires_at IS NULL OR r.expires_at > now())) IS NULL;
    FOR v_lock IN SELECT DISTINCT hashtext(k) FROM unnest(v_keys) k ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(1885823602, v_lock);
    END LOOP;
    -- An UNLOGGED table writes no WAL: its commit waits for no flush.
    INSERT INTO task_result_waiters (key)
    SELECT k FROM unnest(v_keys) k
    ON CONFLICT DO NOTHING;
END
$$;
ALTER FUNCTION pg_broker_chord_part_returned(text, text, integer, text, interval, interval)
    SET enable_seqscan = off;
ALTER FUNCTION pg_broker_chord_part_stored(text, bytea, text, interval, boolean, text, text, text,
                                           interval, interval)
    SET enable_seqscan = off;
