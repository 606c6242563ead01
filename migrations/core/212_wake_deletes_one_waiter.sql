-- core 212: a wake deletes one waiter record, whatever the plan.
--
-- pg_broker_wake (core 140, 210) chose the longest-waiting record in a
-- LIMIT 1 ... FOR UPDATE SKIP LOCKED subquery joined to its DELETE. When the
-- statistics said broker_waiters held about one row (an UNLOGGED table
-- analyzed while nearly empty), the planner scanned the table as the outer
-- side of a nested loop and ran the subquery again for each row; each run
-- skipped the record the DELETE had just removed (a row deleted by the same
-- statement cannot be locked) and took the next, so one publish deleted every
-- waiter of its queue — and, since core 140's RETURNING ... INTO, failed with
-- "query returned more than one row" (seen in
-- tests/integration/test_transport_recovery.py; reproduced by
-- tests/integration/test_transport_waiters.py with such statistics). The
-- record is now chosen by a SELECT of its own and deleted by its key, as core
-- 160 chose the rows to claim in a CTE of their own. Otherwise core 210's
-- function unchanged.

CREATE OR REPLACE FUNCTION pg_broker_wake(p_queue text) RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
DECLARE
    v_channel text;
    v_lock integer;
    v_waiter uuid;
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
        -- The longest-waiting free record, chosen by a statement of its own
        -- and deleted by its key (core 212: never as a subquery of the DELETE).
        SELECT w.waiter INTO v_waiter FROM broker_waiters w
         WHERE w.queue = p_queue
         ORDER BY w.since LIMIT 1
           FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            DELETE FROM broker_waiters w WHERE w.queue = p_queue AND w.waiter = v_waiter
            RETURNING w.channel, w.session_lock INTO v_channel, v_lock;
        END IF;
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
