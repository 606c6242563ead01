-- Every statement pg_broker runs at run time, by name. Schema and functions
-- live in migrations/; these are the statements that call them.
-- (One file on purpose, however long: STYLE.md, the one place to look for
-- the SQL the code runs; each statement is short and named.)

-- name: jobs_by_status
-- Active jobs: how many jobs are in each status.
SELECT status, COUNT(*) FROM jobs GROUP BY status;

-- name: backlog_by_task_type
-- Task backlog: tasks by Celery task name and status.
SELECT task_type, status, COUNT(*) FROM job_tasks GROUP BY task_type, status;

-- name: worker_health
-- Worker health: tasks each worker holds and when it last renewed a lease.
SELECT worker_id, COUNT(*) AS active_tasks, MAX(last_heartbeat) AS last_seen
  FROM job_tasks WHERE status IN ('claimed', 'processing') GROUP BY worker_id;

-- name: consumers_by_queue
-- Live consumers per queue, idle or busy (migrations/core/150): who consumes it, how many of its tasks each holds, since when.
SELECT c.queue, c.worker_id,
       (SELECT count(*) FROM job_tasks t
         WHERE t.queue = c.queue AND t.worker_id = c.worker_id
           AND t.status IN ('claimed', 'processing')) AS holds,
       c.since
  FROM broker_consumers c
 WHERE c.expires_at > now()
 ORDER BY c.queue, c.worker_id;

-- name: client_sessions
-- Sessions of clients (workers, producers, psql) other than the asking one.
SELECT count(*) FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid();

-- name: stale_tasks
-- Stale tasks: held tasks with no heartbeat for ten minutes.
SELECT COUNT(*) FROM job_tasks WHERE status IN ('claimed', 'processing')
   AND last_heartbeat < (now() - INTERVAL '10 minutes');

-- name: reclaim_stale_tasks
-- The watchdog: expired leases back to pending (or dead); returns how many.
SELECT reclaim_stale_tasks();

-- ---------------------------------------------------------------------------
-- The Kombu transport (pg_broker.transport). Durable queues keep messages as
-- job_tasks rows, non-durable ones in broker_transient_messages. Every insert
-- wakes its queue: pg_broker_wake notifies channel 'pgbroker_' || md5(queue)
-- (pg_broker.transport.listener) when a consumer waits there.
-- Consumer statements (claim, ack, requeue, fail, renew, touch, maintenance)
-- commit asynchronously (set_config('synchronous_commit', 'off', true)): if
-- the server crashes, the last of them may be lost, which only redelivers a
-- message (at-least-once). Publishes are durable before they return: a lost
-- publish is a lost message (with visible_before_flush, a publish commits
-- asynchronously and its producer then waits for transport_flush).

-- name: transport_publish
-- Routes one message (anonymous exchange, or the bindings of a direct/topic/fanout exchange), stores one copy per queue (unless store is false), wakes those queues' waiting consumers (unless notify is false); with hand_off, a plain message goes to a waiting consumer already claimed, the row in its notification.
-- pg_broker_wake notifies a queue only when a consumer waits on it, and
-- takes its waiters away (migrations/core/131). pg_broker_hand_off does the
-- same for a plain message's durable queue, except that a waiter which takes
-- hand-offs is notified of the row (JSON: the queue, the row's id, the
-- token, the message when it fits) and the row is inserted claimed for it
-- (migrations/core/220). With no waiter (a busy queue) each queue costs
-- what pg_broker_wake cost.
WITH target AS (
    SELECT %(routing_key)s::text AS queue
     WHERE %(exchange)s::text = '' AND %(routing_key)s::text <> ''
    UNION
    SELECT b.queue FROM broker_bindings b
     WHERE b.exchange = %(exchange)s::text
       AND (b.exchange_type = 'fanout'
            OR (b.exchange_type = 'direct' AND b.routing_key = %(routing_key)s::text)
            OR (b.exchange_type = 'topic' AND %(routing_key)s::text ~ b.pattern))
), routed AS (
    SELECT t.queue, coalesce(q.durable, true) AS durable,
           now() + least(%(ttl)s::interval, q.message_ttl) AS expires_at,
           CASE WHEN %(synchronous_commit)s::text IS NOT NULL
                THEN set_config('synchronous_commit', %(synchronous_commit)s::text, true)
           END AS commit_mode
      FROM target t LEFT JOIN broker_queues q ON q.name = t.queue
), durable AS (
    -- Each row's id taken first: a waiting consumer is told it by
    -- pg_broker_hand_off, which returns the claim to store the row under.
    INSERT INTO job_tasks (id, queue, priority, payload, task_type, task_id, job_id, user_id,
                           max_attempts, expires_at, status, worker_id, lease_token,
                           lease_expires_at, claimed_at, attempts)
    OVERRIDING SYSTEM VALUE
    SELECT m.id, m.queue, %(priority)s::smallint, %(payload)s::jsonb, %(task_type)s::text,
           %(task_id)s::text, %(job_id)s::uuid, %(user_id)s::uuid,
           coalesce(%(max_attempts)s::integer, 3), m.expires_at,
           CASE WHEN (m.claim).lease_token IS NULL THEN 'pending' ELSE 'claimed' END,
           (m.claim).worker_id, (m.claim).lease_token, now() + (m.claim).lease,
           CASE WHEN (m.claim).lease_token IS NOT NULL THEN now() END,
           CASE WHEN (m.claim).lease_token IS NULL THEN 0 ELSE 1 END
      FROM (SELECT r.queue, r.expires_at, n.id,
                   pg_broker_hand_off(r.queue, n.id, %(payload)s::jsonb,
                                      %(notify)s::boolean AND %(hand_off)s::boolean
                                      AND %(job_id)s::uuid IS NULL) AS claim
              FROM routed r, LATERAL (SELECT nextval('job_tasks_id_seq') AS id) n
             WHERE r.durable AND %(store)s::boolean
            OFFSET 0) m  -- one hand-off per row, however often the claim is read
), transient AS (
    INSERT INTO broker_transient_messages (queue, priority, payload, expires_at)
    SELECT queue, %(priority)s::smallint, %(payload)s::jsonb, expires_at
      FROM routed WHERE NOT durable AND %(store)s::boolean
)
SELECT pg_broker_wake(queue) FROM routed
 WHERE %(notify)s::boolean
   AND NOT (durable AND %(store)s::boolean AND %(hand_off)s::boolean
            AND %(job_id)s::uuid IS NULL);

-- name: transport_flush
-- Returns once the WAL written so far is flushed (and replicated) as synchronous_commit asks (this mode, or the session's): a transaction of its own that writes one tiny WAL record and so waits at its commit.
-- Sent right after a publish that committed asynchronously (transport option
-- visible_before_flush), it makes the producer wait for that publish's flush
-- while consumers already claim and run it. A transaction that wrote no WAL
-- commits without a flush, xid or not (PostgreSQL skips it), so it writes a
-- transactional logical message: no table, ~60 bytes of WAL; logical
-- decoding shows it only to a subscriber that asks for messages (pgoutput's
-- messages option), under the prefix pg_broker.
SELECT pg_logical_emit_message(true, 'pg_broker', ''),
       set_config('synchronous_commit',
                  coalesce(%(synchronous_commit)s::text, current_setting('synchronous_commit')),
                  true);

-- name: transport_claim
-- Acks the given held rows (fenced by lease token: a plain message's row deleted when delete_acked, else completed) and claims up to limit ready rows of a queue (highest priority, then FIFO) under one lease token, in one statement: claimed rows first (claimed = true), then the ids acked.
-- The statement is pg_broker_claim (migrations/core/160), planned once per
-- session. A row its worker cancelled instead of running it
-- (cancel_held_task) keeps its lease token until this ack, which settles it
-- and leaves it cancelled. Deleting a plain message at its ack
-- (completed_retention 0, the default) writes no new row version, no index
-- entry and nothing for retention to delete later (measured: README,
-- "Bounded storage"); a job's rows stay for its counters and its page.
SELECT claimed, id, payload, attempts, priority, sequence
  FROM pg_broker_claim(%(queue)s, %(limit)s, %(worker_id)s, %(lease_token)s,
                       %(lease)s::interval, %(ack_ids)s::bigint[], %(ack_tokens)s::uuid[],
                       %(delete_acked)s::boolean);

-- name: transport_take_transient
-- Takes (deletes and returns) up to limit unexpired messages of a non-durable queue.
-- Chosen once in a CTE, as transport_claim's rows are (why: migrations/core/160).
WITH taken AS MATERIALIZED (
    SELECT id FROM broker_transient_messages
     WHERE queue = %(queue)s AND (expires_at IS NULL OR expires_at > now())
     ORDER BY priority DESC, id
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
DELETE FROM broker_transient_messages m USING taken
 WHERE m.id = taken.id
RETURNING m.id, m.payload, m.priority;

-- name: transport_requeue
-- Requeues held rows at once (dead once deliveries reach max_attempts: pg_broker_released, migrations/core/182, the rule reclaim_stale_tasks applies too); refund 1 un-counts a delivery that never started (prefetched, returned at shutdown); error, if given, is the reason kept on the row.
UPDATE job_tasks t
   SET (status, attempts, error, completed_at) =
           (SELECT r.status, r.attempts, r.error, r.completed_at
              FROM pg_broker_released(t.attempts, t.max_attempts, t.error, %(refund)s,
                                      'requeued', %(error)s::text) AS r),
       worker_id = NULL, lease_token = NULL, lease_expires_at = NULL
  FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS held(id, lease_token),
       (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
 WHERE t.id = held.id AND t.lease_token = held.lease_token
   AND t.status IN ('claimed', 'processing')
RETURNING t.id;

-- name: transport_fail
-- Rejects held rows without requeue: fail_task retries with backoff or fails them; returns rows not fenced.
SELECT held.id, fail_task(held.id, held.lease_token, NULL, true, %(backoff)s::interval) AS status
  FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit,
       unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS held(id, lease_token);

-- name: transport_bury
-- Held rows that are no Kombu message (malformed payload): dead at once, with the reason; returns the rows buried.
UPDATE job_tasks t
   SET status = 'dead', error = %(error)s, completed_at = now(),
       lease_token = NULL, lease_expires_at = NULL
  FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS held(id, lease_token),
       (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
 WHERE t.id = held.id AND t.lease_token = held.lease_token
RETURNING t.id;

-- name: transport_renew_leases
-- Extends the leases of the rows a consumer holds; returns those still held (a row cancelled while held counts until its ack).
SELECT id
  FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit,
       pg_broker_renew(%(ids)s::bigint[], %(tokens)s::uuid[], %(lease)s::interval) AS id;

-- name: transport_notify_probe
-- A listener's probe: a notification on its own channel, sent from the work connection to learn whether notifications reach the LISTEN connection.
SELECT pg_notify(%(channel)s, '');

-- name: transport_probe
-- Safety poll: which of these queues have a message ready now.
-- pg_broker_probe (migrations/core/231): each queue's first ready row in claim
-- order through the claim index, planned once per session (as a statement it
-- was planned on every call, ten times its execution).
SELECT pg_broker_probe(%(queues)s::text[]);

-- name: transport_wait
-- A consumer found a queue empty: records it as waiting there, to be notified on its own channel by its LISTEN session, which holds the advisory lock session_lock while it lives (pg_broker_wait, migrations/core/131, 140, 210 and 220), and, unless lease_token is NULL, to be handed a message claimed as worker_id under lease_token for lease; whether a message is ready after all.
SELECT pg_broker_wait(%(queue)s, %(waiter)s, %(channel)s, %(session_lock)s, %(worker_id)s,
                      %(lease)s::interval, %(lease_token)s::uuid);

-- name: transport_give_back
-- Rows handed to this consumer (worker_id) under the given lease tokens and not taken by it (it closed, stopped consuming, or had no room): back to pending at once, the delivery un-counted (migrations/core/220); each one's queue woken for the next waiter. Returns the ids given back.
-- Found through job_tasks_lease_idx (the rows worker_id holds). A row whose
-- lease was renewed (last_heartbeat set) was taken: never given back here.
WITH given AS (
    UPDATE job_tasks t
       SET (status, attempts, error, completed_at) =
               (SELECT r.status, r.attempts, r.error, r.completed_at
                  FROM pg_broker_released(t.attempts, t.max_attempts, t.error, 1,
                                          'given back', NULL) AS r),
           worker_id = NULL, lease_token = NULL, lease_expires_at = NULL
      FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
     WHERE t.worker_id = %(worker_id)s AND t.status = 'claimed'
       AND t.lease_token = ANY (%(tokens)s::uuid[]) AND t.last_heartbeat IS NULL
    RETURNING t.id, t.queue
)
SELECT id, pg_broker_wake(queue) FROM given;

-- name: transport_handed
-- The message of a row handed to this consumer whose notification could not carry it (over NOTIFY's 8,000 bytes), by primary key, fenced by its lease token; no row when it is no longer held under that token.
SELECT payload::text FROM job_tasks
 WHERE id = %(id)s AND lease_token = %(lease_token)s AND status = 'claimed';

-- name: transport_listener_lock
-- A LISTEN session takes the advisory lock its waiter records name (migrations/core/210): held until the session ends, when a publish treats those records as dead. False: another live session holds this key (try another). The server probes the client as the client probes the server (TCP keepalives, tcp_user_timeout), so the session ends soon after its machine vanishes.
-- Without the server-side settings a client machine that vanished without
-- closing its socket (power, network) kept its backend, its advisory lock
-- and so its waiter records alive for the operating system's keepalive time
-- (2 hours by default). Ignored on a Unix-domain socket.
SELECT pg_try_advisory_lock(1885823596, %(key)s),
       set_config('tcp_keepalives_idle', %(idle)s, false),
       set_config('tcp_keepalives_interval', %(interval)s, false),
       set_config('tcp_keepalives_count', %(count)s, false),
       set_config('tcp_user_timeout', %(user_timeout)s, false);

-- name: transport_unwait
-- A consumer stops consuming queues: its waiting records there go (a record left behind would take a publish's wake-up).
DELETE FROM broker_waiters WHERE waiter = %(waiter)s AND queue = ANY(%(queues)s);

-- name: transport_wake_only
-- A consumer whose prefetch window filled while it waited on queues: its records there stop offering hand-offs (migrations/core/220) and only wake it. A record a publish is taking meanwhile is waited for, so no hand-off committed after this returns.
UPDATE broker_waiters SET worker_id = NULL, lease = NULL, lease_token = NULL
 WHERE waiter = %(waiter)s AND queue = ANY (%(queues)s) AND lease_token IS NOT NULL;

-- name: transport_pass_wake
-- A consumer woken for a queue it cannot claim from now (prefetch window full) passes the wake-up to the next waiter, if any (migrations/core/140).
SELECT pg_broker_wake(%(queue)s);

-- name: transport_touch_queues
-- Consumers keep the queues they consume alive (x-expires counts from the last use).
UPDATE broker_queues SET last_used_at = now()
  FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
 WHERE name = ANY (%(queues)s::text[]);

-- name: transport_declare_queue
-- Declares (or re-declares) a queue with its options; returns whether it is durable.
INSERT INTO broker_queues (name, durable, exclusive, auto_delete, message_ttl, expires,
                           max_priority, arguments)
VALUES (%(name)s, %(durable)s, %(exclusive)s, %(auto_delete)s, %(message_ttl)s::interval,
        %(expires)s::interval, %(max_priority)s, %(arguments)s)
ON CONFLICT (name) DO UPDATE
   SET durable = EXCLUDED.durable, exclusive = EXCLUDED.exclusive,
       auto_delete = EXCLUDED.auto_delete, message_ttl = EXCLUDED.message_ttl,
       expires = EXCLUDED.expires, max_priority = EXCLUDED.max_priority,
       arguments = EXCLUDED.arguments, last_used_at = now()
RETURNING durable;

-- name: transport_queue_durable
-- Whether a declared queue is durable (no row: the queue was never declared).
SELECT durable FROM broker_queues WHERE name = %(name)s;

-- name: transport_queue_size
-- Messages waiting in a queue (pending rows and transient messages, unexpired).
SELECT (SELECT count(*) FROM job_tasks
         WHERE queue = %(name)s AND status = 'pending'
           AND (expires_at IS NULL OR expires_at > now()))
     + (SELECT count(*) FROM broker_transient_messages
         WHERE queue = %(name)s AND (expires_at IS NULL OR expires_at > now()));

-- name: transport_purge
-- Removes a queue's ready messages (never rows a worker holds): plain rows are deleted, job tasks cancelled; returns how many.
-- It never waits for a message row (SKIP LOCKED): one locked now is being
-- claimed, or cancelled or swept by someone else (the lock order: migrations/core/100).
WITH ready AS (
    SELECT id, job_id FROM job_tasks
     WHERE queue = %(name)s AND status = 'pending'
       FOR UPDATE SKIP LOCKED
), transient AS (
    DELETE FROM broker_transient_messages
     WHERE id IN (SELECT id FROM broker_transient_messages WHERE queue = %(name)s
                     FOR UPDATE SKIP LOCKED)
    RETURNING 1
), plain AS (
    DELETE FROM job_tasks WHERE id IN (SELECT id FROM ready WHERE job_id IS NULL) RETURNING 1
), of_jobs AS (
    UPDATE job_tasks SET status = 'cancelled', completed_at = now()
     WHERE id IN (SELECT id FROM ready WHERE job_id IS NOT NULL) RETURNING 1
)
SELECT (SELECT count(*) FROM transient) + (SELECT count(*) FROM plain)
     + (SELECT count(*) FROM of_jobs);

-- name: transport_delete_queue
-- Drops a queue's declaration, bindings and waiters (its messages go with transport_purge).
-- Waiters of a queue nobody publishes to again would stay for ever: a
-- reply queue of each `celery inspect` call, say.
WITH bindings AS (
    DELETE FROM broker_bindings WHERE queue = %(name)s
), waiters AS (
    DELETE FROM broker_waiters WHERE queue = %(name)s
)
DELETE FROM broker_queues WHERE name = %(name)s;

-- name: transport_bind
-- Binds a queue to an exchange (shared by every process).
INSERT INTO broker_bindings (exchange, exchange_type, routing_key, pattern, queue)
VALUES (%(exchange)s, %(exchange_type)s, %(routing_key)s, %(pattern)s, %(queue)s)
ON CONFLICT DO NOTHING;

-- name: transport_unbind
-- Removes one binding of a queue.
DELETE FROM broker_bindings
 WHERE exchange = %(exchange)s AND routing_key = %(routing_key)s AND queue = %(queue)s;

-- name: transport_exchange_delete
-- Deletes an exchange: its bindings (exchanges themselves live in each process).
DELETE FROM broker_bindings WHERE exchange = %(exchange)s;

-- name: transport_bindings
-- The binding table of an exchange: (routing key, pattern, queue) rows.
SELECT routing_key, pattern, queue FROM broker_bindings WHERE exchange = %(exchange)s;

-- name: transport_exchange_type
-- The type an exchange was bound with, for exchanges this process never declared.
SELECT exchange_type FROM broker_bindings WHERE exchange = %(exchange)s LIMIT 1;

-- name: transport_register_consumers
-- A consumer is alive: its queues registered or renewed until now + ttl (migrations/core/150); expired registrations of any consumer swept.
WITH swept AS (
    DELETE FROM broker_consumers WHERE expires_at < now()
)
INSERT INTO broker_consumers AS c (queue, worker_id, expires_at)
SELECT queue, %(worker_id)s, now() + %(ttl)s::interval
  FROM unnest(%(queues)s::text[]) AS queue
    ON CONFLICT (queue, worker_id)
    DO UPDATE SET seen_at = now(), expires_at = excluded.expires_at;

-- name: transport_unregister_consumers
-- A consumer cancelled (or closed): its registrations of these queues go.
DELETE FROM broker_consumers
 WHERE worker_id = %(worker_id)s AND queue = ANY (%(queues)s::text[]);

-- name: transport_maintain
-- A live consumer's maintenance: expired leases back to pending (reclaim_stale_tasks), queues unused past their x-expires dropped with bindings, waiters and messages, expired transient messages dropped. Returns (reclaimed, queues dropped).
-- It never waits for a message row (SKIP LOCKED: one locked now is being
-- claimed or purged, or goes at the next run; the lock order: migrations/core/100). Messages
-- past their TTL are reclaim_stale_tasks()'s: deleting them here too would
-- touch rows it deleted within this same statement, which PostgreSQL refuses.
WITH expired AS (
    DELETE FROM broker_queues
     WHERE expires IS NOT NULL AND last_used_at < now() - expires
    RETURNING name
), unbound AS (
    DELETE FROM broker_bindings WHERE queue IN (SELECT name FROM expired)
), unwaited AS (
    DELETE FROM broker_waiters WHERE queue IN (SELECT name FROM expired)
), dropped AS (
    DELETE FROM broker_transient_messages
     WHERE id IN (SELECT id FROM broker_transient_messages
                   WHERE queue IN (SELECT name FROM expired) OR expires_at < now()
                     FOR UPDATE SKIP LOCKED)
), orphaned AS (
    -- Read only when a queue expired (EXISTS: a one-time filter). As
    -- `queue IN (SELECT name FROM expired)` alone the plan hashed the (nearly
    -- always empty) list and read all of job_tasks beside it: a sequential
    -- scan of the table in every worker's maintenance, whose snapshot, the
    -- longer the table grew, kept vacuum from removing rows.
    DELETE FROM job_tasks
     WHERE id IN (SELECT id FROM job_tasks
                   WHERE EXISTS (SELECT 1 FROM expired)
                     AND queue IN (SELECT name FROM expired) AND status = 'pending'
                     AND job_id IS NULL AND (expires_at IS NULL OR expires_at >= now())
                     FOR UPDATE SKIP LOCKED)
)
SELECT reclaim_stale_tasks(), (SELECT count(*) FROM expired)
  FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit;

-- name: transport_needs_vacuum
-- Whether job_tasks holds more dead row versions than the threshold: then a worker vacuums it (transport_vacuum), whatever autovacuum's state.
-- Every claim and every ack leaves a dead row version. Autovacuum visits a
-- database at most once per autovacuum_naptime (a minute by default), and at
-- hundreds of tasks/s a minute of them is tens of thousands: the 200,000-task
-- endurance run at 569 tasks/s with autovacuum on grew the table to 2.57x its
-- size after the first 20,000 tasks, 41,206 dead at the end. Where autovacuum
-- is off they pile up without end. Below the threshold autovacuum (tuned per
-- table, migrations/core/100) keeps up on its own. Reads the statistics only.
SELECT coalesce((SELECT n_dead_tup > %(threshold)s FROM pg_stat_user_tables
                  WHERE relid = 'job_tasks'::regclass), false);

-- name: transport_oldest_snapshot
-- Seconds the oldest transaction or statement of another session of this database has held its snapshot (0: none): rows that died after it began stay until it ends, whatever vacuums.
SELECT coalesce(extract(epoch FROM now() - min(coalesce(xact_start, query_start)))::float8, 0)
  FROM pg_stat_activity
 WHERE datname = current_database() AND backend_xmin IS NOT NULL AND pid <> pg_backend_pid();

-- name: transport_vacuum
-- Vacuums job_tasks, unless another vacuum (autovacuum, another worker) has it now. Not in a transaction: run on a connection of its own.
VACUUM (SKIP_LOCKED) job_tasks;

-- ---------------------------------------------------------------------------
-- The result backend (pg_broker.results): Celery's key-value results in
-- task_results, chord counters in task_result_chords (migrations/core/110). A
-- result write notifies 'pgbroker_r_' || md5(key), where its waiters LISTEN
-- (pg_broker.results.waiting), when a session awaits that key
-- (task_result_waiters, migrations/core/200), with the value itself (base64)
-- as payload when it fits one (a waiter then reads nothing), or an empty
-- payload (read the row). Expired rows are invisible at once and deleted by
-- result_cleanup.

-- name: result_session_commit
-- How the result backend's session commits (synchronous_commit, e.g. off).
SELECT set_config('synchronous_commit', %(mode)s, false);

-- name: result_session_isolation
-- The result backend's session reads committed data at every statement (whatever the role's default): a waiter's read must see every write that committed before its records (migrations/core/200).
SELECT set_config('default_transaction_isolation', 'read committed', false);

-- name: result_get
-- One result's encoded meta, unless it expired.
SELECT value FROM task_results
 WHERE key = %(key)s AND (expires_at IS NULL OR expires_at > now());

-- name: result_mget
-- The unexpired results among these keys, as (key, value) rows.
SELECT key, value FROM task_results
 WHERE key = ANY (%(keys)s::text[]) AND (expires_at IS NULL OR expires_at > now());

-- name: result_set
-- Writes a key's value (and state) and wakes its waiters, if any (pg_broker_result_set, migrations/core/200); with keep_success, never over a SUCCESS that has not expired (a late copy of a task must not undo its success). Returns the key if written, else NULL.
-- The notification carries the value in base64 up to 5,400 bytes (a waiter
-- then reads nothing); a larger value notifies with an empty payload and is
-- read from the row. A key no session awaits notifies nobody.
SELECT pg_broker_result_set(%(key)s, %(value)s, %(state)s, %(expires)s::interval,
                            %(keep_success)s::boolean);

-- name: result_await
-- The session waits for these keys (it LISTENs on their channels already): records them, so that their writes notify it (migrations/core/200); read them once this commits.
SELECT pg_broker_await_results(%(keys)s::text[]);

-- name: result_unwait
-- The session no longer waits for these keys: its records of them go.
DELETE FROM task_result_waiters
 WHERE key = ANY (%(keys)s::text[]) AND session = pg_backend_pid();

-- name: result_delete
-- Forgets a key (a task's result, a saved group).
DELETE FROM task_results WHERE key = %(key)s;

-- name: result_expire
-- A key expires this long from now (NULL: never).
UPDATE task_results SET expires_at = now() + %(expires)s::interval WHERE key = %(key)s;

-- name: result_incr
-- Adds one to a counter (created at 1); returns the new value.
INSERT INTO task_result_chords AS c (key, parts) VALUES (%(key)s, 1)
ON CONFLICT (key) DO UPDATE SET parts = c.parts + 1
RETURNING parts;

-- name: result_chord_part_returned
-- Counts a header part of a chord once; whether the caller now holds the chord and sends its callback, and the size that decided it (see migrations/core/110).
SELECT parts, claimed, size
  FROM pg_broker_chord_part_returned(%(key)s, %(part)s, %(size)s, %(claimer)s,
                                     %(claim)s::interval, %(expires)s::interval);

-- name: result_chord_part_stored
-- A chord's header task stored its result and counted its part, in one statement (migrations/core/202): result_set, then result_chord_part_returned without a size.
SELECT parts, claimed, size
  FROM pg_broker_chord_part_stored(%(key)s, %(value)s, %(state)s, %(expires)s::interval,
                                   %(keep_success)s::boolean, %(chord)s, %(part)s,
                                   %(claimer)s, %(claim)s::interval,
                                   %(chord_expires)s::interval);

-- name: result_chord_header
-- A chord's header results, for the worker that counted its last part: every part counted (header task id and index, "id:index") with its task's encoded meta (NULL when not there or expired), read by key (the task's key is the prefix and the id).
SELECT p.part, r.value
  FROM task_result_chord_parts p
  LEFT JOIN task_results r
    ON r.key = %(prefix)s || left(p.part, length(p.part) - strpos(reverse(p.part), ':'))
   AND (r.expires_at IS NULL OR r.expires_at > now())
 WHERE p.chord = %(key)s;

-- name: result_chord_done
-- A chord's callback was sent (or the chord failed): its parts are forgotten, later copies of them count nothing.
WITH forgotten AS (
    DELETE FROM task_result_chord_parts WHERE chord = %(key)s
)
UPDATE task_result_chords SET done = true, parts = 0, claimed_by = NULL, claimed_until = NULL
 WHERE key = %(key)s;

-- name: result_chord_size
-- A chord's size, set by its producer before the last header task is sent; the same frozen chord applied again (same group id) counts afresh.
INSERT INTO task_result_chords AS c (key, size, expires_at)
VALUES (%(key)s, %(size)s, now() + %(expires)s::interval)
ON CONFLICT (key) DO UPDATE
   SET size = EXCLUDED.size, done = false,
       expires_at = greatest(c.expires_at, EXCLUDED.expires_at);

-- name: result_cleanup
-- Retention: one batch of expired results and chord counters (with their parts) leaves; returns how many of each.
-- It never waits for a row (SKIP LOCKED): one locked now is being written.
WITH results AS (
    DELETE FROM task_results
     WHERE key IN (SELECT key FROM task_results WHERE expires_at < now()
                    ORDER BY expires_at LIMIT %(batch)s
                      FOR UPDATE SKIP LOCKED)
    RETURNING 1
), chords AS (
    DELETE FROM task_result_chords
     WHERE key IN (SELECT key FROM task_result_chords WHERE expires_at < now()
                    ORDER BY expires_at LIMIT %(batch)s
                      FOR UPDATE SKIP LOCKED)
    RETURNING 1
)
SELECT (SELECT count(*) FROM results), (SELECT count(*) FROM chords);

-- name: result_ended_waiters
-- Retention: the waiter records of sessions that have ended (a waiting process killed, or its connection lost) leave; returns how many.
WITH gone AS (
    DELETE FROM task_result_waiters w
     WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.session)
    RETURNING 1
)
SELECT count(*) FROM gone;

-- ---------------------------------------------------------------------------
-- The worker app and the job model (pg_broker.jobs, storage, maintenance;
-- tasks/). A worker addresses the row it holds by row id and lease token (its
-- delivery tag), as the transport's acks do: a worker whose lease expired
-- writes nothing into a row another worker now holds.

-- name: insert_job
-- A new job row for a user; its tasks are inserted by the publishes that follow.
INSERT INTO jobs (user_id, job_type, title, params)
VALUES (%(user_id)s, %(job_type)s, %(title)s, %(params)s)
RETURNING id;

-- name: act_as_user
-- For the rest of the transaction, act as a Supabase user: role authenticated, JWT claims set in both forms auth.uid() reads.
-- auth.uid() and auth.role() prefer the legacy per-claim settings
-- (request.jwt.claim.sub/.role) to request.jwt.claims: set both, or a
-- connection that kept an older user's per-claim setting would act as them.
SELECT set_config('role', 'authenticated', true),
       set_config('request.jwt.claims', %(claims)s, true),
       set_config('request.jwt.claim.sub', %(user_id)s, true),
       set_config('request.jwt.claim.role', 'authenticated', true);

-- name: job_by_id
-- One job with its counters (RLS decides whether the caller may see it).
SELECT id, user_id, job_type, title, params, status, total_tasks, completed_tasks,
       failed_tasks, cancelled_tasks, progress, error, created_at, updated_at, started_at,
       completed_at
  FROM jobs WHERE id = %(job_id)s;

-- name: tasks_of_job
-- A job's tasks in submission order, those moved to job_tasks_history (partitioned_history) too.
-- One statement, one snapshot: a row being moved is seen once, on one side.
SELECT id, task_id, task_type, queue, status, attempts, max_attempts, worker_id, error,
       result, created_at, started_at, completed_at
  FROM (SELECT id, sequence, task_id, task_type, queue, status, attempts, max_attempts,
               worker_id, error, result, created_at, started_at, completed_at
          FROM job_tasks WHERE job_id = %(job_id)s
        UNION ALL
        SELECT id, sequence, task_id, task_type, queue, status, attempts, max_attempts,
               worker_id, error, result, created_at, started_at, completed_at
          FROM job_tasks_history WHERE job_id = %(job_id)s) t
 ORDER BY sequence, id;

-- name: artifacts_of_job
-- A job's artifacts by kind, chapters in order.
SELECT id, job_id, task_id, kind, storage_backend, storage_path, content_type, bytes,
       sha256, duration_seconds, metadata
  FROM job_artifacts WHERE job_id = %(job_id)s
 ORDER BY kind, (metadata ->> 'chapter')::integer NULLS LAST, created_at, storage_path;

-- name: upsert_artifact
-- Records a stored file; a re-run task (same path) updates its one row.
INSERT INTO job_artifacts (job_id, task_id, user_id, kind, storage_backend, storage_path,
                           content_type, bytes, sha256, duration_seconds, metadata)
VALUES (%(job_id)s, %(task_id)s, %(user_id)s, %(kind)s, %(storage_backend)s, %(storage_path)s,
        %(content_type)s, %(bytes)s, %(sha256)s, %(duration_seconds)s, %(metadata)s)
ON CONFLICT (storage_backend, storage_path) DO UPDATE
   SET task_id = EXCLUDED.task_id, content_type = EXCLUDED.content_type,
       bytes = EXCLUDED.bytes, sha256 = EXCLUDED.sha256,
       duration_seconds = EXCLUDED.duration_seconds, metadata = EXCLUDED.metadata
RETURNING id, job_id, task_id, kind, storage_backend, storage_path, content_type, bytes,
          sha256, duration_seconds, metadata;

-- name: cancel_job
-- Marks a job cancelled unless it completed or failed before the cancel; returns its id if it is cancelled.
-- It runs after cancel_pending_tasks in the same transaction (lock order:
-- tasks, then the job): when those were the job's last unfinished tasks and
-- another one had failed, the status trigger already called the job failed;
-- a job that still had pending tasks (pending_cancelled > 0) was not finished,
-- so the cancel stands.
UPDATE jobs SET status = 'cancelled', completed_at = coalesce(completed_at, now())
 WHERE id = %(job_id)s
   AND (status IN ('pending', 'processing', 'cancelled') OR %(pending_cancelled)s > 0)
RETURNING id;

-- name: cancel_pending_tasks
-- A cancelled job's tasks that no worker holds yet: they will never be claimed.
-- It never waits for a task row (SKIP LOCKED, the lock order: migrations/core/100): one locked
-- now is being claimed (its worker skips it: tasks.lifecycle), or cancelled,
-- purged or expired by someone else.
UPDATE job_tasks SET status = 'cancelled', completed_at = now()
 WHERE id IN (SELECT id FROM job_tasks
               WHERE job_id = %(job_id)s AND status = 'pending'
                 FOR UPDATE SKIP LOCKED);

-- name: cancel_held_task
-- A held task its worker will not run because its job was cancelled: cancelled now, fenced by its lease token; the token stays for the worker's ack (transport_claim).
UPDATE job_tasks t
   SET status = 'cancelled', completed_at = now()
 WHERE t.id = %(id)s AND t.lease_token = %(lease_token)s AND t.status IN ('claimed', 'processing')
   AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = t.job_id AND j.status = 'cancelled');

-- name: mark_task_processing
-- The worker began executing the task (claimed -> processing), fenced by its lease token; returns its id if it did.
SELECT id FROM pg_broker_start(ARRAY[%(id)s::bigint], ARRAY[%(lease_token)s::uuid]) AS id;

-- name: record_task_error
-- Keeps the exception text of a failed attempt, fenced by its lease token; fail_task then retries or fails the row.
UPDATE job_tasks SET error = %(error)s
 WHERE id = %(id)s AND lease_token = %(lease_token)s AND status IN ('claimed', 'processing');

-- name: dead_tasks
-- Dead letters: tasks that failed or died for good, newest first.
SELECT id, task_id, task_type, queue, status, attempts, max_attempts, job_id, error,
       completed_at
  FROM job_tasks WHERE status IN ('dead', 'failed')
 ORDER BY completed_at DESC NULLS LAST, id DESC
 LIMIT %(limit)s;

-- name: not_dead_letters
-- Of the given row ids or Celery task ids, those that name no dead or failed task.
SELECT given FROM unnest(%(ids)s::text[]) WITH ORDINALITY AS g(given, n)
 WHERE NOT EXISTS (SELECT 1 FROM job_tasks t
                    WHERE t.status IN ('dead', 'failed')
                      AND (t.id::text = g.given OR t.task_id = g.given))
 ORDER BY n;

-- name: retry_dead_tasks
-- Re-queues dead/failed tasks (all, or by row id or Celery task id) with fresh attempts, reopens their jobs, wakes their queues' workers.
WITH retried AS (
    UPDATE job_tasks
       SET status = 'pending', attempts = 0, error = NULL, visible_at = now(),
           completed_at = NULL, worker_id = NULL, lease_token = NULL, lease_expires_at = NULL
     WHERE status IN ('dead', 'failed')
       AND (%(ids)s::text[] IS NULL OR id::text = ANY (%(ids)s) OR task_id = ANY (%(ids)s))
    RETURNING id, queue, job_id
), reopened AS (
    UPDATE jobs j
       SET completed_at = NULL,
           error = (SELECT t.error FROM job_tasks t
                     WHERE t.job_id = j.id AND t.status IN ('failed', 'dead')
                       AND t.id NOT IN (SELECT id FROM retried)
                     ORDER BY t.completed_at LIMIT 1)
     WHERE j.id IN (SELECT job_id FROM retried) AND j.status <> 'cancelled'
)
SELECT id, queue, pg_broker_wake(queue) FROM retried;

-- name: delete_finished_tasks
-- Retention: one batch of each kind of finished row past its window leaves job_tasks: plain messages (no job) completed longer ago than keep_completed, plain ones failed, dead or cancelled longer ago than keep_failed, a job's rows once their job finished longer ago than keep_job. With a lock key, only if no other session holds it (workers take turns); returns the rows deleted of each kind, NULLs when the lock was taken.
-- Each kind is read from its own partial index (migrations/core/120) and
-- chosen once in a CTE, as transport_claim's rows are (why: migrations/core/160), so a batch
-- stays a batch. Only finished rows qualify, so pending, delayed (ETA) and
-- held rows are never touched. It never waits for a row (SKIP LOCKED): one
-- locked now is being retried (retry_dead_tasks) or purged, and a row whose
-- retry committed after this statement began is re-read as pending by the
-- row lock and left alone.
WITH turn AS MATERIALIZED (
    SELECT %(lock)s::bigint IS NULL OR pg_try_advisory_xact_lock(%(lock)s::bigint) AS ours
), completed AS MATERIALIZED (
    SELECT id FROM job_tasks
     WHERE job_id IS NULL AND status = 'completed'
       AND completed_at < now() - %(keep_completed)s::interval
       AND (SELECT ours FROM turn)
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED
), failed AS MATERIALIZED (
    SELECT id FROM job_tasks
     WHERE job_id IS NULL AND status IN ('failed', 'dead', 'cancelled')
       AND completed_at < now() - %(keep_failed)s::interval
       AND (SELECT ours FROM turn)
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED
), of_jobs AS MATERIALIZED (
    SELECT t.id FROM job_tasks t JOIN jobs j ON j.id = t.job_id
     WHERE t.job_id IS NOT NULL AND t.status IN ('completed', 'failed', 'dead', 'cancelled')
       AND t.completed_at < now() - %(keep_job)s::interval
       AND j.status IN ('completed', 'failed', 'cancelled')
       AND j.completed_at < now() - %(keep_job)s::interval
       AND (SELECT ours FROM turn)
     LIMIT %(batch)s
       FOR UPDATE OF t SKIP LOCKED
), deleted AS (
    DELETE FROM job_tasks
     WHERE id IN (SELECT id FROM completed UNION ALL SELECT id FROM failed
                  UNION ALL SELECT id FROM of_jobs)
)
SELECT CASE WHEN ours THEN (SELECT count(*) FROM completed) END AS completed,
       CASE WHEN ours THEN (SELECT count(*) FROM failed) END AS failed,
       CASE WHEN ours THEN (SELECT count(*) FROM of_jobs) END AS of_jobs
  FROM turn, (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit;

-- name: move_to_history
-- Partitioned history (partitioned_history): drops the history partitions whose day is over, then moves one batch of finished jobs' completed and cancelled rows from job_tasks into job_tasks_history (migrations/core/180). With a lock key, only if no other session holds it; returns the rows moved and partitions dropped, NULLs when the lock was taken.
SELECT moved, dropped
  FROM pg_broker_move_to_history(%(keep_job)s::interval, %(batch)s, %(lock)s::bigint),
       (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit;

-- ---------------------------------------------------------------------------
-- Flower (pg_broker.flower): the Broker tab and /api/queues/length.

-- name: flower_queue_lengths
-- Per queue name: messages held (unexpired), ready to deliver now, held unacked by workers, live consumers.
SELECT q.name,
       coalesce(d.pending, 0) + coalesce(d.unacked, 0) + coalesce(t.transient, 0) AS messages,
       coalesce(d.ready, 0) + coalesce(t.transient, 0) AS messages_ready,
       coalesce(d.unacked, 0) AS messages_unacknowledged,
       (SELECT count(*) FROM broker_consumers c
         WHERE c.queue = q.name AND c.expires_at > now()) AS consumers
  FROM unnest(%(names)s::text[]) AS q(name)
  LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
               count(*) FILTER (WHERE status = 'pending' AND visible_at <= now()) AS ready,
               count(*) FILTER (WHERE status IN ('claimed', 'processing')) AS unacked
          FROM job_tasks
         WHERE queue = q.name
           AND status IN ('pending', 'claimed', 'processing')
           AND (expires_at IS NULL OR expires_at > now())
       ) d ON true
  LEFT JOIN LATERAL (
        SELECT count(*) AS transient
          FROM broker_transient_messages
         WHERE queue = q.name AND (expires_at IS NULL OR expires_at > now())
       ) t ON true;

-- ---------------------------------------------------------------------------
-- Metrics and autoscaling (pg_broker.metrics: pg-broker metrics and its
-- Prometheus endpoint). Each part reads one partial index of job_tasks: the
-- backlog (job_tasks_claim_idx), the held rows (job_tasks_lease_idx), the
-- dead letters (job_tasks_dead_letters_idx), never the finished rows.

-- name: queue_backlog
-- One queue's backlog, always one row (KEDA's PostgreSQL scaler, any autoscaler): messages ready now, delayed (ETA, countdown, retry backoff), and the seconds its oldest ready message has waited.
-- A message counts as waiting from its visible_at: a countdown of an hour
-- is not an hour late when it falls due.
SELECT count(*) FILTER (WHERE visible_at <= now()) AS ready,
       count(*) FILTER (WHERE visible_at > now()) AS delayed,
       coalesce(extract(epoch FROM now() - min(visible_at) FILTER (WHERE visible_at <= now())),
                0)::float8 AS oldest_ready_age
  FROM job_tasks
 WHERE queue = %(queue)s AND status = 'pending' AND (expires_at IS NULL OR expires_at > now());

-- name: metrics_queues
-- Per queue (those with messages, dead letters, or declared durable): ready, delayed, oldest ready age (s), held leases, renewed at least once, expired and not yet reclaimed, seconds since the stalest renewal, dead letters (dead and failed).
WITH backlog AS (
    SELECT queue,
           count(*) FILTER (WHERE visible_at <= now()) AS ready,
           count(*) FILTER (WHERE visible_at > now()) AS delayed,
           extract(epoch FROM now() - min(visible_at) FILTER (WHERE visible_at <= now()))
               AS oldest_ready_age
      FROM job_tasks
     WHERE status = 'pending' AND (expires_at IS NULL OR expires_at > now())
     GROUP BY queue
), held AS (
    SELECT queue, count(*) AS held,
           count(*) FILTER (WHERE last_heartbeat > claimed_at) AS renewed,
           count(*) FILTER (WHERE lease_expires_at < now()) AS expired,
           extract(epoch FROM now() - min(last_heartbeat)) AS renewal_age
      FROM job_tasks
     WHERE status IN ('claimed', 'processing')
     GROUP BY queue
), dead AS (
    SELECT queue, count(*) AS dead
      FROM job_tasks
     WHERE status IN ('dead', 'failed')
     GROUP BY queue
), declared AS (
    SELECT name AS queue FROM broker_queues WHERE durable
)
SELECT queue, coalesce(ready, 0), coalesce(delayed, 0), coalesce(oldest_ready_age, 0)::float8,
       coalesce(held, 0), coalesce(renewed, 0), coalesce(expired, 0),
       coalesce(renewal_age, 0)::float8, coalesce(dead, 0)
  FROM declared
  FULL JOIN backlog USING (queue)
  FULL JOIN held USING (queue)
  FULL JOIN dead USING (queue)
 ORDER BY queue;

-- ---------------------------------------------------------------------------
-- The migrations runner (pg_broker.migrate). pg_broker_migrations keeps its
-- columns version (still the key: legacy files are numbered below 100, the
-- tracks from 100), name, checksum, applied_at for anything that reads them;
-- the track column came with the two tracks (migrations/README.md).

-- name: migrations_lock
-- Waits for the advisory lock that lets one process at a time migrate; held until the transaction ends (a session-level lock would outlive its transaction on a pooled server session).
SELECT pg_advisory_xact_lock(%(key)s)

-- name: migrations_table
-- Creates the record of applied migrations; one of the single-track runner gets its track column, its rows marked 'legacy'.
CREATE TABLE IF NOT EXISTS pg_broker_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    track      text NOT NULL
);
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = 'pg_broker_migrations'::regclass
                      AND attname = 'track' AND NOT attisdropped) THEN
        ALTER TABLE pg_broker_migrations ADD COLUMN track text NOT NULL DEFAULT 'legacy';
        ALTER TABLE pg_broker_migrations ALTER COLUMN track DROP DEFAULT;
    END IF;
END
$$;

-- name: migrations_applied
-- Every migration recorded as applied: track, version, checksum.
SELECT track, version, checksum FROM pg_broker_migrations

-- name: migrations_applied_in_order
-- The track files applied (legacy rows aside): version and name, in order.
SELECT version, name FROM pg_broker_migrations WHERE track <> 'legacy' ORDER BY version

-- name: migration_checksum
-- The checksum of one migration if it is recorded as applied (checked again under the lock).
SELECT checksum FROM pg_broker_migrations WHERE track = %(track)s AND version = %(version)s

-- name: migration_record
-- Records one migration as applied.
INSERT INTO pg_broker_migrations (track, version, name, checksum)
VALUES (%(track)s, %(version)s, %(name)s, %(checksum)s)

-- name: supabase_detected
-- Whether the database looks like Supabase: its roles anon, authenticated, service_role and auth.uid() exist.
SELECT count(*) = 3 AND to_regprocedure('auth.uid()') IS NOT NULL
  FROM pg_roles
 WHERE rolname IN ('anon', 'authenticated', 'service_role')

-- ---------------------------------------------------------------------------
-- pg-broker doctor (pg_broker.doctor): what a check reads.

-- name: doctor_server_version
-- The server's version, for the report.
SELECT current_setting('server_version');

-- name: doctor_migrations_record
-- Whether the record of applied migrations exists, and whether it has the track column (the single-track runner's lacks it).
SELECT to_regclass('pg_broker_migrations') IS NOT NULL,
       EXISTS (SELECT 1 FROM pg_attribute
                WHERE attrelid = to_regclass('pg_broker_migrations')
                  AND attname = 'track' AND NOT attisdropped);

-- name: doctor_supabase_layer
-- What the Supabase layer puts in place: its roles, auth.uid(), the job tables with forced row-level security, submit_job().
SELECT ARRAY(SELECT rolname::text FROM pg_roles
              WHERE rolname IN ('anon', 'authenticated', 'service_role')) AS roles,
       to_regprocedure('auth.uid()') IS NOT NULL AS uid,
       ARRAY(SELECT relname::text FROM pg_class
              WHERE relname IN ('jobs', 'job_tasks', 'job_artifacts') AND relkind = 'r'
                AND relrowsecurity AND relforcerowsecurity
                AND relnamespace = 'public'::regnamespace) AS forced,
       to_regprocedure('public.submit_job(text, text, jsonb, text)') IS NOT NULL AS submit_job;

-- name: doctor_notify
-- A notification on the doctor's throwaway channel.
SELECT pg_notify(%(channel)s, 'doctor');

-- name: doctor_clock
-- The database's clock now, in seconds since the epoch.
SELECT extract(epoch FROM clock_timestamp())::float8;
