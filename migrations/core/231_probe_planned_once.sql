-- core 231: the safety poll (transport_probe) planned once per session.
--
-- Every worker probes its idle queues every polling_interval: which of them
-- hold a message ready now. Sent as a statement, PostgreSQL planned it on
-- every call (0.12-0.17 ms of planning against 0.012 ms of execution,
-- pg_stat_statements, README "Round two"): a custom plan knows the queue
-- names, so the plan cache never found the generic one cheaper. Here it is
-- the body of a plpgsql function that keeps one generic plan per session, as
-- pg_broker_claim does (core 160), with sequential scans off so that plan is
-- the index one whatever the table held when it was made (core 230): each
-- queue's first ready row in claim order through job_tasks_claim_idx (not
-- EXISTS, which drops ORDER BY and LIMIT and, from the statistics, read the
-- other queues' backlog), and a non-durable queue's messages through their
-- queue index. tests/integration/test_schema.py holds it to those indexes.
CREATE FUNCTION pg_broker_probe(p_queues text[]) RETURNS SETOF text
    LANGUAGE plpgsql STABLE
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off
    SET search_path FROM CURRENT AS $$
BEGIN
    RETURN QUERY
    SELECT q.name
      FROM unnest(p_queues) AS q(name)
     WHERE (SELECT t.id FROM job_tasks t
             WHERE t.status = 'pending' AND t.queue = q.name AND t.visible_at <= now()
               AND (t.expires_at IS NULL OR t.expires_at > now())
             ORDER BY t.priority DESC, t.sequence LIMIT 1) IS NOT NULL
        OR EXISTS (SELECT 1 FROM broker_transient_messages m WHERE m.queue = q.name);
END
$$;
REVOKE ALL ON FUNCTION pg_broker_probe(text[]) FROM PUBLIC;
