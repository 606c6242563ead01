-- core 140: a publish wakes one waiting consumer, not all of a queue's.
--
-- With core 131 a publish took every waiter of its queue and notified the
-- queue's channel, which every consumer of the queue LISTENs on: with N
-- idle workers on one queue, each message woke N processes, N - 1 of which
-- found nothing and recorded themselves again (two statements each). Now a
-- consumer records the channel it alone LISTENs on (pg_broker_wait's third
-- argument), and each publish takes the longest-waiting free waiter and
-- notifies that channel, with the queue as payload: one wake-up per message
-- (a transaction publishing n messages takes n waiters).
--
-- No wake-up may be lost (core 131's lock order is unchanged). A waiter
-- another publish is taking right now is skipped (SKIP LOCKED), but that
-- publish may yet roll back and leave its waiter asleep: when no waiter is
-- free, the queue's channel is notified, waking every consumer of the queue,
-- as core 131 did. A record without a channel (a consumer of core 131,
-- still running during an upgrade: it LISTENs on the queue's channel only)
-- is woken the same way. A woken consumer that cannot claim (its prefetch
-- window is full) passes the wake on (pg_broker_wake without a message:
-- the next waiter looks). A consumer that went away without deleting its
-- records (killed) leaves them to absorb one wake each: the message then
-- waits for another consumer's safety poll (a second by default).
ALTER TABLE broker_waiters ADD COLUMN channel text;

CREATE OR REPLACE FUNCTION pg_broker_wake(p_queue text) RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
DECLARE
    v_channel text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1885823607, hashtext(p_queue));
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM pg_notify('pgbroker_' || md5(p_queue), '');
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM broker_waiters WHERE queue = p_queue) THEN
        DELETE FROM broker_waiters w
         USING (SELECT queue, waiter FROM broker_waiters WHERE queue = p_queue
                 ORDER BY since LIMIT 1 FOR UPDATE SKIP LOCKED) taken
         WHERE w.queue = taken.queue AND w.waiter = taken.waiter
        RETURNING w.channel INTO v_channel;
        IF v_channel IS NOT NULL THEN
            PERFORM pg_notify(v_channel, p_queue);
        ELSE  -- none free, or a consumer of core 131: the queue's channel
            PERFORM pg_notify('pgbroker_' || md5(p_queue), '');
        END IF;
    END IF;
END
$$;

-- A consumer found p_queue empty: records it as waiting there, to be
-- notified on p_channel (which it LISTENs on), then tells whether a message
-- is ready after all (see core 131).
CREATE FUNCTION pg_broker_wait(p_queue text, p_waiter uuid, p_channel text) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1885823607, hashtext(p_queue));
    INSERT INTO broker_waiters (queue, waiter, channel) VALUES (p_queue, p_waiter, p_channel)
        ON CONFLICT DO NOTHING;
    RETURN EXISTS (SELECT 1 FROM job_tasks
                    WHERE status = 'pending' AND queue = p_queue AND visible_at <= now()
                      AND (expires_at IS NULL OR expires_at > now()))
        OR EXISTS (SELECT 1 FROM broker_transient_messages WHERE queue = p_queue);
END
$$;

REVOKE ALL ON FUNCTION pg_broker_wait(text, uuid, text) FROM PUBLIC;
