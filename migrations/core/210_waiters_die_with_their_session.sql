-- core 210: a waiter whose consumer died takes no wake-up.
--
-- Since core 140 a publish takes the longest-waiting record of its queue and
-- notifies that consumer alone. A consumer killed while it waited (SIGKILL,
-- OOM, a machine gone) left its records behind, and each took one publish's
-- wake-up to a channel nobody LISTENed on any more: that message waited for
-- another consumer's safety poll (a second by default).
--
-- Now a waiter's record names an advisory lock its LISTEN session holds for
-- as long as it lives (session_lock: pg_advisory_lock(1885823596, key),
-- 1885823596 is 'pgbl'; the key is random, taken with pg_try_advisory_lock,
-- so two live sessions never share one). A session's advisory locks go when
-- the session ends, however it ends: a publish that can take the lock (in
-- share mode, for its own transaction only) knows the session is gone,
-- deletes that record and takes the next one. A live waiter costs the
-- publish one lock-table probe. A record without a session lock (a consumer
-- of core 140 still running during an upgrade) counts as live, as before.
--
-- The session lock is the LISTEN session's because a consumer is woken
-- there: its work connection may go through a transaction-mode pooler,
-- where a session lock would stay with a pooled server session.
--
-- Lock order (core 131) is unchanged: the share lock on a dead session's key
-- is never waited for (a try), and a live session never waits for one
-- either (it takes its key with a try, and tries another when it is taken).
ALTER TABLE broker_waiters ADD COLUMN session_lock integer;

CREATE OR REPLACE FUNCTION pg_broker_wake(p_queue text) RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
DECLARE
    v_channel text;
    v_lock integer;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1885823607, hashtext(p_queue));
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM pg_notify('pgbroker_' || md5(p_queue), '');
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM broker_waiters WHERE queue = p_queue) THEN
        RETURN;
    END IF;
    LOOP
        DELETE FROM broker_waiters w
         USING (SELECT queue, waiter FROM broker_waiters WHERE queue = p_queue
                 ORDER BY since LIMIT 1 FOR UPDATE SKIP LOCKED) taken
         WHERE w.queue = taken.queue AND w.waiter = taken.waiter
        RETURNING w.channel, w.session_lock INTO v_channel, v_lock;
        IF NOT FOUND THEN
            -- None free: the records left are being taken by other publishes
            -- (which may yet roll back), so the queue's channel wakes every
            -- consumer of the queue (core 140). None left: nobody waits.
            IF EXISTS (SELECT 1 FROM broker_waiters WHERE queue = p_queue) THEN
                PERFORM pg_notify('pgbroker_' || md5(p_queue), '');
            END IF;
            RETURN;
        END IF;
        -- Its session is gone: the record was dead; the next one is taken.
        CONTINUE WHEN v_lock IS NOT NULL
                  AND pg_try_advisory_xact_lock_shared(1885823596, v_lock);
        IF v_channel IS NOT NULL THEN
            PERFORM pg_notify(v_channel, p_queue);
        ELSE  -- a consumer of core 131: the queue's channel
            PERFORM pg_notify('pgbroker_' || md5(p_queue), '');
        END IF;
        RETURN;
    END LOOP;
END
$$;

-- A consumer found p_queue empty: records it as waiting there, to be
-- notified on p_channel by its LISTEN session, which holds the advisory lock
-- p_session_lock while it lives; then tells whether a message is ready after
-- all (see core 131). A record already there takes the new channel and lock
-- (a consumer that reconnected its LISTEN session) and keeps its place.
CREATE FUNCTION pg_broker_wait(p_queue text, p_waiter uuid, p_channel text, p_session_lock integer)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1885823607, hashtext(p_queue));
    INSERT INTO broker_waiters (queue, waiter, channel, session_lock)
        VALUES (p_queue, p_waiter, p_channel, p_session_lock)
        ON CONFLICT (queue, waiter) DO UPDATE
            SET channel = excluded.channel, session_lock = excluded.session_lock;
    RETURN EXISTS (SELECT 1 FROM job_tasks
                    WHERE status = 'pending' AND queue = p_queue AND visible_at <= now()
                      AND (expires_at IS NULL OR expires_at > now()))
        OR EXISTS (SELECT 1 FROM broker_transient_messages WHERE queue = p_queue);
END
$$;

REVOKE ALL ON FUNCTION pg_broker_wait(text, uuid, text, integer) FROM PUBLIC;
