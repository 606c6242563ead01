-- core 213: pg_broker_claim's plan reads the claim index whatever the
-- statistics said when its session planned it.
--
-- The claim runs with a generic plan, made once per session and kept until
-- job_tasks' statistics change (core 160). A session that planned it while
-- the table was empty — as a vacuum of a drained queue leaves its statistics
-- — got sequential scans for all three of its parts (the rows to claim, read
-- whole and sorted; the acks' delete and update), which cost nothing on a
-- table said to be empty, and kept them while a backlog was published behind
-- it, until the next vacuum or analyze: 20 ms of database time per claim
-- with 3,000 rows in bench.listeners' slow steps (2 ms a row of 4 claimed),
-- and the backlog figure's claims growing with the backlog (README,
-- "Performance"). With sequential scans off for the function's statements,
-- the same plan is the index-driven one core 160 chose on a large table: the
-- claim index in claim order, LIMIT on top, the acks by primary key
-- (tests/integration/test_schema.py plans it on an empty table, then claims
-- from a 3,000-row backlog). No other plan of the function is changed: the
-- setting applies inside it only.
--
-- pg_broker_wait (core 210), a consumer's last look at its queue before it
-- sleeps, had the same flaw: its EXISTS, planned generic on an empty table,
-- read every other queue's backlog on each wait of an idle consumer (0.9 ms
-- with 3,000 rows elsewhere, growing with them). Same setting.

ALTER FUNCTION pg_broker_claim(text, integer, text, uuid, interval, bigint[], uuid[], boolean)
    SET enable_seqscan = off;

ALTER FUNCTION pg_broker_wait(text, uuid, text, integer)
    SET enable_seqscan = off;
