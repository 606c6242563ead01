-- core 220: a publish hands its message to a waiting consumer, claimed.
--
-- Since core 131/140/210 a publish that finds a consumer waiting on the
-- queue notifies it, and the consumer then claims the row: one more round
-- trip on every idle worker's wake-up (README "Round two": 0.9 ms of the
-- 2.8 ms publish -> start p50). Now a consumer that can take a message
-- records, with its wait, who it is (worker_id), the lease it holds rows
-- under and a fresh lease token; a publish of a plain message (no job) in a
-- transaction of its own that takes such a record inserts the row already
-- claimed by that consumer, as pg_broker_claim would have claimed it
-- (status claimed, worker_id, lease_token, lease_expires_at, claimed_at,
-- attempts 1), and its notification carries the row: id, token and, when the
-- whole payload fits in NOTIFY's 8,000 bytes, the message itself. The
-- consumer delivers it without a statement.
--
-- Guarantees:
-- - one record, one row: the record goes with the hand-off (as with a
--   wake-up), so a consumer holds at most one hand-off per queue it waits on;
-- - fencing: the token is the record's; an ack from anyone else is refused;
-- - a consumer that cannot take it when it arrives (closed, cancelled,
--   prefetch window full) gives it back at once: transport_give_back (back
--   to pending, the delivery un-counted, the next waiter woken); one that
--   stops waiting gives back, by its tokens, what was handed to it and not
--   yet received;
-- - last_heartbeat stays NULL until the consumer's lease thread first
--   renews the lease: a hand-off whose consumer died before that (never
--   reached it, or died at once) is reclaimed after its lease with the
--   delivery refunded (reclaim_stale_tasks below). A hand-off happens only at
--   a message's publish, so at most one delivery of a message goes uncounted
--   this way, and a message that kills its workers still goes dead;
-- - a waiter record exists only for a queue the consumer found empty, and a
--   message is handed off only while no other is ready there (else the
--   consumer is woken and claims), so priorities and order are those of the
--   claim; records without a lease
--   (core 140/210 consumers, or a consumer whose prefetch window was full)
--   are woken as before;
-- - job rows (submit_job, job_id set) and publishes inside a caller's
--   transaction (enqueue_in: its lease would tick until the caller commits)
--   are never handed off: they are woken as before.

ALTER TABLE broker_waiters
    ADD COLUMN worker_id text,
    ADD COLUMN lease interval,
    ADD COLUMN lease_token uuid;

-- A consumer found p_queue empty: core 210's pg_broker_wait, recording also
-- how a hand-off would be held (p_worker_id, p_lease, p_lease_token; NULLs:
-- wake it only). A record already there takes all of the new values.
-- Planned without sequential scans of job_tasks, as core 213 plans core
-- 210's: its last look stays on the claim index whatever the statistics.
CREATE FUNCTION pg_broker_wait(p_queue text, p_waiter uuid, p_channel text,
                               p_session_lock integer, p_worker_id text, p_lease interval,
                               p_lease_token uuid)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT SET enable_seqscan = off AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1885823607, hashtext(p_queue));
    INSERT INTO broker_waiters (queue, waiter, channel, session_lock, worker_id, lease,
                                lease_token)
        VALUES (p_queue, p_waiter, p_channel, p_session_lock, p_worker_id, p_lease,
                p_lease_token)
        ON CONFLICT (queue, waiter) DO UPDATE
            SET channel = excluded.channel, session_lock = excluded.session_lock,
                worker_id = excluded.worker_id, lease = excluded.lease,
                lease_token = excluded.lease_token;
    RETURN EXISTS (SELECT 1 FROM job_tasks
                    WHERE status = 'pending' AND queue = p_queue AND visible_at <= now()
                      AND (expires_at IS NULL OR expires_at > now()))
        OR EXISTS (SELECT 1 FROM broker_transient_messages WHERE queue = p_queue);
END
$$;

REVOKE ALL ON FUNCTION pg_broker_wait(text, uuid, text, integer, text, interval, uuid)
    FROM PUBLIC;

-- Whether a message is ready in p_queue now (the hand-off's look below;
-- on the claim index, as core 213 keeps pg_broker_wait's). A function of
-- its own so that the setting costs only a publish that found a waiter.
CREATE FUNCTION pg_broker_ready(p_queue text) RETURNS boolean
    LANGUAGE sql STABLE SET enable_seqscan = off AS $$
    SELECT EXISTS (SELECT 1 FROM job_tasks t
                    WHERE t.status = 'pending' AND t.queue = p_queue
                      AND t.visible_at <= now()
                      AND (t.expires_at IS NULL OR t.expires_at > now()))
$$;

REVOKE ALL ON FUNCTION pg_broker_ready(text) FROM PUBLIC;

-- A publish about to store one plain message in p_queue as row p_id:
-- core 212's pg_broker_wake, except that when the live waiter it takes
-- takes hand-offs (and no message is ready in the queue: else it is woken
-- and claims them in order, priority first), that waiter is notified of the
-- row (JSON: q the queue, id, t the token, m the message when the whole
-- notification stays under NOTIFY's 8,000 bytes) and the claim to store it
-- under is returned (worker_id, lease, lease_token); the caller inserts the
-- row so (transport_publish). Otherwise it wakes as pg_broker_wake does and
-- returns NULLs. Called for each durable queue a message is routed to, in
-- place of pg_broker_wake, by the same statement, under the same lock
-- (core 131); p_go false (no wake-up asked, or not a plain message of the
-- publish's own transaction): nothing (the statement wakes, if asked, with
-- pg_broker_wake). A scalar function (not set-returning, no CASE around it,
-- the notification sent here): with no waiter, a busy queue, a publish
-- costs what it cost with pg_broker_wake (README, "Hand-off").
CREATE FUNCTION pg_broker_hand_off(p_queue text, p_id bigint, p_message jsonb, p_go boolean,
                                   OUT worker_id text, OUT lease interval,
                                   OUT lease_token uuid)
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
DECLARE
    v_waiter uuid;
    v_channel text;
    v_lock integer;
    v_note text;
    v_message text;
BEGIN
    IF NOT p_go THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1885823607, hashtext(p_queue));
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM pg_notify('pgbroker_' || md5(p_queue), '');
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM broker_waiters w WHERE w.queue = p_queue) THEN
        RETURN;
    END IF;
    LOOP
        -- Not a dead record's, taken in the turn before.
        worker_id := NULL;
        lease := NULL;
        lease_token := NULL;
        SELECT w.waiter INTO v_waiter FROM broker_waiters w
         WHERE w.queue = p_queue
         ORDER BY w.since LIMIT 1
           FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            DELETE FROM broker_waiters w WHERE w.queue = p_queue AND w.waiter = v_waiter
            RETURNING w.channel, w.session_lock, w.worker_id, w.lease, w.lease_token
                 INTO v_channel, v_lock, worker_id, lease, lease_token;
        END IF;
        IF NOT FOUND THEN
            IF EXISTS (SELECT 1 FROM broker_waiters w WHERE w.queue = p_queue) THEN
                PERFORM pg_notify('pgbroker_' || md5(p_queue), '');
            END IF;
            RETURN;
        END IF;
        CONTINUE WHEN v_lock IS NOT NULL
                  AND pg_try_advisory_xact_lock_shared(1885823596, v_lock);
        IF v_channel IS NOT NULL AND lease_token IS NOT NULL
           AND lease IS NOT NULL AND worker_id IS NOT NULL
           AND NOT pg_broker_ready(p_queue) THEN
            v_note := format('{"q":%s,"id":%s,"t":"%s"', to_json(p_queue), p_id,
                             lease_token);
            v_message := p_message::text;
            IF octet_length(v_note) + octet_length(v_message) < 7990 THEN
                PERFORM pg_notify(v_channel, v_note || ',"m":' || v_message || '}');
            ELSE  -- the consumer reads the message by id
                PERFORM pg_notify(v_channel, v_note || '}');
            END IF;
            RETURN;
        END IF;
        -- Woken, not handed a row.
        worker_id := NULL;
        lease := NULL;
        lease_token := NULL;
        IF v_channel IS NOT NULL THEN
            PERFORM pg_notify(v_channel, p_queue);
        ELSE
            PERFORM pg_notify('pgbroker_' || md5(p_queue), '');
        END IF;
        RETURN;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION pg_broker_hand_off(text, bigint, jsonb, boolean) FROM PUBLIC;

-- core 182's reclaim_stale_tasks, with one change: a hand-off (above) whose
-- lease was never renewed (last_heartbeat NULL: its consumer never confirmed
-- it) goes back with its delivery refunded, as a prefetched row given back
-- at shutdown does (refund 1 in pg_broker_released).
CREATE OR REPLACE FUNCTION reclaim_stale_tasks() RETURNS integer
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_reclaimed integer;
BEGIN
    WITH stale AS (
        SELECT id, true AS stale,
               CASE WHEN job_id IS NOT NULL AND expires_at < now() AND attempts < max_attempts
                    THEN 'expired' ELSE 'release' END AS fate
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
           SET (status, attempts, error, completed_at) =
                   (SELECT r.status, r.attempts, r.error, r.completed_at
                      FROM pg_broker_released(
                               t.attempts, t.max_attempts, t.error,
                               CASE WHEN t.last_heartbeat IS NULL AND t.status = 'claimed'
                                    THEN 1 ELSE 0 END,
                               format('lease expired on worker %s', t.worker_id),
                               NULL) AS r
                     WHERE due.fate = 'release'
                    UNION ALL
                    SELECT 'dead', t.attempts, 'message expired before delivery', now()
                     WHERE due.fate = 'expired'),
               visible_at = CASE WHEN due.stale THEN now() ELSE t.visible_at END,
               worker_id = NULL,
               lease_token = NULL,
               lease_expires_at = NULL
          FROM due
         WHERE t.id = due.id
        RETURNING due.stale
    )
    SELECT count(*) FILTER (WHERE stale) INTO v_reclaimed FROM changed;

    DELETE FROM job_tasks
     WHERE id IN (SELECT id FROM job_tasks
                   WHERE status = 'pending' AND expires_at < now() AND job_id IS NULL
                     FOR UPDATE SKIP LOCKED);
    RETURN v_reclaimed;
END
$$;
