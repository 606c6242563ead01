-- core 200: a stored result notifies only when a process waits for it.
--
-- Every result write (core 110) notified its channel, waited for or not: a
-- worker storing results nobody awaits (a stream of tasks, a chord's header
-- parts) sent one notification per result, and PostgreSQL (up to 18)
-- signals every LISTENing session of the database on each NOTIFY and takes
-- a cluster-wide lock in PreCommit_Notify that it holds through the
-- commit's WAL flush: every notifying commit waits behind any notifying
-- synchronous commit. Now a process waiting for results records the keys
-- it waits for in task_result_waiters (pg_broker_await_results), and a
-- result write (pg_broker_result_set) notifies only when it finds a record
-- of its key.
--
-- No wake-up may be lost between a waiter's read and its sleep; the lock
-- order is core 131's. pg_broker_await_results holds the advisory locks of
-- its keys alone while it records them; pg_broker_result_set holds its key's
-- lock shared from after its row is written until its transaction ends, and
-- only then looks for records (VOLATILE plpgsql: every statement reads a
-- snapshot taken after the lock was granted). Either the write took the lock
-- first, and then committed its row before the waiter's records did (the
-- waiter's lock waited for it), so the waiter's read, which comes after that
-- commit, sees the row; or it takes the lock after the waiter committed its
-- records, sees them, and notifies; the waiter LISTENs before it records,
-- so it hears that. A waiter takes its keys' locks in a fixed order and
-- waits for nothing else, a writer takes one lock shared: no deadlock.
--
-- A write in a REPEATABLE READ or SERIALIZABLE transaction reads its
-- transaction's snapshot, which may predate a waiter: it always notifies.
--
-- Upgrading: a process awaiting results with pg_broker from before this
-- migration records nothing, so results written by an upgraded worker no
-- longer wake it (its get() ends at its timeout): restart the processes that
-- await results together with the workers.

-- A key awaited by a session (the result backend's connection of a waiting
-- process: its backend pid). The waiter deletes its records when it stops
-- waiting; records of sessions that ended are deleted by the results'
-- retention (result_cleanup). UNLOGGED: after a crash the table is empty,
-- and waiters, whose LISTEN sessions were lost with it, record their keys
-- again when they reconnect.
CREATE UNLOGGED TABLE task_result_waiters (
    key      text COLLATE "C" NOT NULL,
    session  integer NOT NULL DEFAULT pg_backend_pid(),
    since    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, session)
) WITH (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);

-- The lock space of awaited keys: pg_advisory_xact_lock(1885823602,
-- hashtext(key)) (1885823602 is 'pgbr'); two keys of one hash share a lock,
-- which costs a wait or a notification, never a lost wake-up.

-- Writes a key's value (and state) and wakes its waiters, if any; with
-- p_keep_success, never over a SUCCESS that has not expired (a late copy of
-- a task must not undo its success). Returns the key if written, else NULL.
-- The notification carries the value in base64 up to 5,400 bytes (7,300
-- characters with encode's line breaks, under NOTIFY's 8,000-byte payload
-- limit), saving the waiter a round trip; a larger value notifies with an
-- empty payload and is read from the row.
CREATE FUNCTION pg_broker_result_set(
    p_key          text,
    p_value        bytea,
    p_state        text,
    p_expires      interval,
    p_keep_success boolean
) RETURNS text
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO task_results AS r (key, value, state, expires_at)
    VALUES (p_key, p_value, p_state, now() + p_expires)
    ON CONFLICT (key) DO UPDATE
       SET value = EXCLUDED.value, state = EXCLUDED.state,
           expires_at = EXCLUDED.expires_at, updated_at = now()
     WHERE NOT p_keep_success OR r.state IS DISTINCT FROM 'SUCCESS'
        OR r.expires_at <= now();
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1885823602, hashtext(p_key));
    IF current_setting('transaction_isolation') <> 'read committed'
       OR EXISTS (SELECT 1 FROM task_result_waiters w WHERE w.key = p_key) THEN
        PERFORM pg_notify('pgbroker_r_' || md5(p_key),
                          CASE WHEN octet_length(p_value) <= 5400
                               THEN encode(p_value, 'base64') ELSE '' END);
    END IF;
    RETURN p_key;
END
$$;

-- The calling session waits for p_keys (it LISTENs on their channels
-- already): records them, so that their writes notify. The caller reads the
-- keys next, in a statement of its own (a snapshot taken after the locks;
-- see above). A key whose result is ready already (SUCCESS, FAILURE,
-- REVOKED: Celery waits for no more) is not recorded: that read finds it
-- (a chord's last part joins a header of finished results so).
CREATE FUNCTION pg_broker_await_results(p_keys text[]) RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
DECLARE
    v_keys text[];
    v_lock integer;
BEGIN
    SELECT array_agg(DISTINCT k) INTO v_keys
      FROM unnest(p_keys) k
     WHERE NOT EXISTS (SELECT 1 FROM task_results r
                        WHERE r.key = k AND r.state IN ('SUCCESS', 'FAILURE', 'REVOKED')
                          AND (r.expires_at IS NULL OR r.expires_at > now()));
    FOR v_lock IN SELECT DISTINCT hashtext(k) FROM unnest(v_keys) k ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(1885823602, v_lock);
    END LOOP;
    -- An UNLOGGED table writes no WAL: its commit waits for no flush.
    INSERT INTO task_result_waiters (key)
    SELECT k FROM unnest(v_keys) k
    ON CONFLICT DO NOTHING;
END
$$;

REVOKE ALL ON FUNCTION pg_broker_result_set(text, bytea, text, interval, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_broker_await_results(text[]) FROM PUBLIC;
