-- core 131: a publish wakes a queue's consumers only when one of them waits.
--
-- PostgreSQL (up to 18) signals every LISTENing session of the database on
-- each NOTIFY, whatever its channel: measured on PostgreSQL 15, one session
-- sent 13,268 notifications/s with no listener and 1,224/s with 50 idle
-- sessions listening on other channels. A consumer busy with a backlog
-- claims again without being told, so a notification only matters to one
-- that found its queue empty. Such a consumer now records itself in
-- broker_waiters (pg_broker_wait) before it sleeps, and pg_broker_wake, which
-- every publish calls, notifies only when it finds a waiter, and takes the
-- queue's waiters away: each waiter is worth one notification, and a
-- consumer that keeps finding work is never notified at all.
--
-- No wake-up may be lost between a consumer's last empty claim and its
-- sleep. pg_broker_wait records the waiter and then looks for ready messages
-- once more, holding the queue's advisory lock alone; every pg_broker_wake
-- holds it shared until its transaction ends. Either the publish took the
-- lock first, and then committed its message before the consumer's second
-- look (which waited for the lock), or it takes the lock after the waiter's
-- row is committed, and sees it: both functions are VOLATILE plpgsql, whose
-- every statement reads a snapshot taken after the lock was granted. A
-- consumer holds one such lock per transaction and waits for nothing else
-- while it does, publishers take theirs shared and lock no row they might
-- wait for (SKIP LOCKED), so no deadlock is possible.
--
-- A publish in a REPEATABLE READ or SERIALIZABLE transaction reads its
-- transaction's snapshot, which may predate a waiter: it always notifies.

-- A consumer (its LISTEN session's transport: waiter) that found a queue
-- empty and sleeps until notified. UNLOGGED: after a crash the table is
-- empty, and consumers, whose LISTEN sessions were lost with it, poll every
-- queue and record themselves again.
CREATE UNLOGGED TABLE broker_waiters (
    queue  text NOT NULL,
    waiter uuid NOT NULL,
    since  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, waiter)
) WITH (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);

-- The lock space of a queue's waiters: pg_advisory_xact_lock(1885823607,
-- hashtext(queue)) (1885823607 is 'pgbw'); two queues of one hash share a
-- lock, which costs a wait, never a wake-up.

-- Wakes a queue's waiting consumers; the one place SQL says how (core 104).
-- Pinned search_path: it runs inside submit_job, whose is empty.
CREATE OR REPLACE FUNCTION pg_broker_wake(p_queue text) RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1885823607, hashtext(p_queue));
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM pg_notify('pgbroker_' || md5(p_queue), '');
        RETURN;
    END IF;
    -- Any waiter seen, even one another publish is taking away right now
    -- (it may yet roll back), is notified.
    IF EXISTS (SELECT 1 FROM broker_waiters WHERE queue = p_queue) THEN
        DELETE FROM broker_waiters w
         USING (SELECT queue, waiter FROM broker_waiters WHERE queue = p_queue
                   FOR UPDATE SKIP LOCKED) taken
         WHERE w.queue = taken.queue AND w.waiter = taken.waiter;
        PERFORM pg_notify('pgbroker_' || md5(p_queue), '');
    END IF;
END
$$;

-- A consumer found p_queue empty: records it as waiting there (notified by
-- the next publish), then tells whether a message is ready after all (one
-- published meanwhile): then it claims instead of sleeping.
CREATE FUNCTION pg_broker_wait(p_queue text, p_waiter uuid) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1885823607, hashtext(p_queue));
    -- An UNLOGGED table writes no WAL: its commit waits for no flush.
    INSERT INTO broker_waiters (queue, waiter) VALUES (p_queue, p_waiter)
        ON CONFLICT DO NOTHING;
    RETURN EXISTS (SELECT 1 FROM job_tasks
                    WHERE status = 'pending' AND queue = p_queue AND visible_at <= now()
                      AND (expires_at IS NULL OR expires_at > now()))
        OR EXISTS (SELECT 1 FROM broker_transient_messages WHERE queue = p_queue);
END
$$;

REVOKE ALL ON FUNCTION pg_broker_wait(text, uuid) FROM PUBLIC;
