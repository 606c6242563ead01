"""The mutation check: break one important line, run the tests that should
notice, and report the mutations no test caught (the survivors).

    python -m tests.mutations                    # every mutation below
    python -m tests.mutations claim-order ...    # some of them, by name
    python -m tests.mutations --list             # names, targets and tests

Each mutation is a hand-written (file, exact text, replacement) with the
tests that guard that line. The files git knows are copied, as they are in
the working tree, to a temporary directory once; each mutation is applied
there alone, its tests run there (``PYTHONPATH`` puts the copy's
``pg_broker`` and ``tasks`` before the installed ones, and its migrations and
``queries.sql`` are read from the copy), and the file is put back. The
working tree is never written.

A mutation whose text is not found exactly once fails the check at once
(the code moved on: update the mutation, do not drop it); so does a
baseline run of every listed test on the unmutated copy that does not pass
(a mutation "caught" by a failing test proves nothing).
``tests/unit/test_mutations.py`` checks the targets in the unit tier, so
that the list does not rot between runs.

The tests run against ``PG_BROKER_TEST_URL`` if it is set (each pytest
session makes a database of its own there), else against one embedded
PostgreSQL this script starts for all the runs and stops at the end.

Exit status: 0 when every mutation was caught, 1 when one survived or could
not be judged, 2 when a target is missing or the baseline fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Seconds one test may take (pytest-timeout), and one mutation's whole run.
TEST_TIMEOUT = 180
RUN_TIMEOUT = 1200

QUERIES = "pg_broker/sql/queries.sql"
SCHEMA = "migrations/core/100_broker_schema.sql"
LEASES_OWNERS = "migrations/core/102_arguments_leases_owners.sql"
RENEW_START = "migrations/core/113_renew_and_start_defined_once.sql"
CLAIM = "migrations/core/163_claim_acks_by_primary_key.sql"  # pg_broker_claim as redefined there
SUPABASE = "migrations/supabase/101_supabase_layer.sql"
HISTORY = "migrations/core/180_partitioned_history.sql"
# pg_broker_released, reclaim_stale_tasks, claim_tasks, complete_task as redefined there
RELEASE = "migrations/core/182_claim_complete_release_defined_once.sql"
HISTORY_LAYER = "migrations/supabase/181_history_privileges.sql"
WAKE = "migrations/core/212_wake_deletes_one_waiter.sql"  # pg_broker_wake as redefined there
# pg_broker_hand_off, and reclaim_stale_tasks as redefined there
HAND_OFF = "migrations/core/220_hand_off_to_waiting_consumer.sql"

MESSAGES = "tests/integration/test_transport_messages.py"
EVENT_LOOP = "tests/integration/test_transport_event_loop.py"
WAITERS = "tests/integration/test_transport_waiters.py"
HANDED = "tests/integration/test_transport_hand_off.py"
SHARED_LISTEN = "tests/integration/test_transport_shared_listen.py"
FLUSH = "tests/integration/test_publish_flush.py"
PIPELINE = "tests/integration/test_transport_pipeline.py"
RECOVERY = "tests/integration/test_transport_recovery.py"
ROUTING = "tests/integration/test_transport_routing.py"
FUNCTIONS = "tests/integration/test_task_functions.py"
RLS = "tests/integration/test_rls.py"
CLI = "tests/e2e/test_cli_foundation.py"
PARTITIONED = "tests/integration/test_partitioned_history.py"
RESULTS = "tests/integration/test_result_backend.py"
AWAITED = "migrations/core/200_notify_only_awaited_results.sql"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository's root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids (or files) that must catch it
    breaks: str  # what the mutation breaks, in a few words


class TargetMissing(Exception):
    """A mutation's text is not in its file exactly once."""


def _fence(settle: str) -> str:
    """The test of a settlement sent after its lease was lost."""
    return (f"{MESSAGES}::test_a_settlement_after_the_lease_was_lost_changes_nothing_and_is_logged"
            f"[{settle}]")


MUTATIONS: tuple[Mutation, ...] = (
    # Claim order ---------------------------------------------------------------
    Mutation(
        "claim-order", CLAIM,
        "         ORDER BY t.priority DESC, t.sequence\n         LIMIT p_limit\n",
        "         ORDER BY t.priority ASC, t.sequence\n         LIMIT p_limit\n",
        (f"{MESSAGES}::test_priority_order_holds_across_claims_when_the_backlog_exceeds_the_prefetch_window",),
        "transport_claim takes the lowest priority first",
    ),
    Mutation(
        "claim-fifo", CLAIM,
        "         ORDER BY t.priority DESC, t.sequence\n         LIMIT p_limit\n",
        "         ORDER BY t.priority DESC, t.sequence DESC\n         LIMIT p_limit\n",
        (f"{MESSAGES}::test_priority_order_holds_across_claims_when_the_backlog_exceeds_the_prefetch_window",),
        "transport_claim is LIFO inside a priority",
    ),
    Mutation(
        "claim-visible-at", CLAIM,
        "AND t.visible_at <= now() AND (t.expires_at IS NULL OR t.expires_at > now())\n         ORDER BY",
        "AND (t.expires_at IS NULL OR t.expires_at > now())\n         ORDER BY",
        (f"{MESSAGES}::test_reject_without_requeue_retries_after_a_backoff_that_doubles_per_attempt",),
        "transport_claim delivers rows before their backoff or ETA",
    ),
    Mutation(
        "claim-fetch-limit", "pg_broker/transport/channel.py",
        "        return max(min(room, batch_max), 0)",
        "        return batch_max",
        (f"{MESSAGES}::test_consumer_claims_a_batch_sized_to_its_prefetch_window",),
        "a claim ignores the free prefetch window",
    ),
    Mutation(
        "claim-batch-max", "pg_broker/transport/channel.py",
        "        if estimate is None:\n            return batch_max",
        "        if estimate is None:\n            return 1000",
        (f"{MESSAGES}::test_an_unlimited_prefetch_window_claims_at_most_claim_batch_max",),
        "claim_batch_max is ignored",
    ),
    # Lease fencing on every settle -----------------------------------------------
    Mutation(
        "fence-ack-delete", CLAIM,
        "           AND t.lease_token = p_ack_tokens[array_position(p_ack_ids, t.id)]\n",
        "",
        (_fence("ack"),),
        "an ack with a lost lease deletes another worker's row",
    ),
    Mutation(
        "fence-ack-complete", CLAIM,
        "         WHERE t.id = held.id AND t.lease_token = held.lease_token\n"
        "           AND t.status IN ('claimed', 'processing', 'cancelled')\n           AND NOT (t.job_id",
        "         WHERE t.id = held.id\n"
        "           AND t.status IN ('claimed', 'processing', 'cancelled')\n           AND NOT (t.job_id",
        (_fence("ack-kept"),),
        "an ack with a lost lease completes another worker's row",
    ),
    Mutation(
        "fence-requeue", QUERIES,
        " WHERE t.id = held.id AND t.lease_token = held.lease_token\n"
        "   AND t.status IN ('claimed', 'processing')\nRETURNING t.id;",
        " WHERE t.id = held.id\n"
        "   AND t.status IN ('claimed', 'processing')\nRETURNING t.id;",
        (_fence("requeue"),),
        "a requeue with a lost lease requeues another worker's row",
    ),
    Mutation(
        "fence-fail", LEASES_OWNERS,
        "     WHERE id = p_task_id\n       AND lease_token = p_lease_token\n"
        "       AND status IN ('claimed', 'processing')\n    RETURNING status INTO v_status;\n"
        "    IF v_status IS NULL THEN\n        RAISE NOTICE 'fail_task(%)",
        "     WHERE id = p_task_id\n"
        "       AND status IN ('claimed', 'processing')\n    RETURNING status INTO v_status;\n"
        "    IF v_status IS NULL THEN\n        RAISE NOTICE 'fail_task(%)",
        (_fence("reject"),
         f"{FUNCTIONS}::test_complete_and_fail_with_a_stale_lease_token_change_nothing"),
        "fail_task with a lost lease fails another worker's row",
    ),
    Mutation(
        "fence-bury", QUERIES,
        " WHERE t.id = held.id AND t.lease_token = held.lease_token\nRETURNING t.id;",
        " WHERE t.id = held.id\nRETURNING t.id;",
        (f"{MESSAGES}::test_burying_a_malformed_row_is_fenced_by_its_lease_token",),
        "burying with a lost lease buries another worker's row",
    ),
    Mutation(
        "fence-renew", RENEW_START,
        "       SET lease_expires_at = now() + p_lease, last_heartbeat = now()\n"
        "      FROM unnest(p_ids, p_tokens) AS held(id, lease_token)\n"
        "     WHERE t.id = held.id AND t.lease_token = held.lease_token",
        "       SET lease_expires_at = now() + p_lease, last_heartbeat = now()\n"
        "      FROM unnest(p_ids, p_tokens) AS held(id, lease_token)\n"
        "     WHERE t.id = held.id",
        (_fence("renew"),),
        "a renewal with a lost lease extends another worker's lease",
    ),
    Mutation(
        "fence-start", RENEW_START,
        "           last_heartbeat = now()\n"
        "      FROM unnest(p_ids, p_tokens) AS held(id, lease_token)\n"
        "     WHERE t.id = held.id AND t.lease_token = held.lease_token",
        "           last_heartbeat = now()\n"
        "      FROM unnest(p_ids, p_tokens) AS held(id, lease_token)\n"
        "     WHERE t.id = held.id",
        ("tests/integration/test_lifecycle_fencing.py::"
         "test_a_stale_delivery_cannot_mark_processing_or_record_an_error",),
        "a stale delivery marks another worker's row processing",
    ),
    # Attempt counting and refunds ------------------------------------------------------
    Mutation(
        "attempts-claim", CLAIM,
        "claimed_at = now(), attempts = t.attempts + 1",
        "claimed_at = now(), attempts = t.attempts",
        (f"{MESSAGES}::test_requeue_returns_the_row_to_pending_at_once",),
        "a claim does not count a delivery",
    ),
    Mutation(
        "attempts-release-max", RELEASE,
        "      FROM (SELECT p_attempts - p_refund < p_max_attempts AS left_over) AS d",
        "      FROM (SELECT p_attempts - p_refund <= p_max_attempts AS left_over) AS d",
        (f"{MESSAGES}::test_requeue_after_the_last_attempt_buries_the_row",
         f"{FUNCTIONS}::test_reclaim_past_max_attempts_dead_letters_the_task"),
        "a requeue or a lease lost after the last delivery is not dead",
    ),
    Mutation(
        "attempts-fail-max", LEASES_OWNERS,
        "       SET status = CASE WHEN v_retry AND attempts < max_attempts\n"
        "                         THEN 'pending' ELSE 'failed' END,",
        "       SET status = CASE WHEN v_retry AND attempts <= max_attempts\n"
        "                         THEN 'pending' ELSE 'failed' END,",
        (f"{MESSAGES}::test_reject_on_the_last_attempt_fails_the_row",),
        "a reject after the last delivery retries again",
    ),
    Mutation(
        "refund-sql", RELEASE,
        "           greatest(p_attempts - p_refund, 0),",
        "           p_attempts,",
        (f"{MESSAGES}::test_closing_the_channel_returns_unacked_messages_without_counting_them",),
        "transport_requeue ignores its refund",
    ),
    Mutation(
        "refund-restore-unacked", "pg_broker/transport/qos.py",
        '            self.settlements.settle("requeue", returned, refund=1)',
        '            self.settlements.settle("requeue", returned, refund=0)',
        (f"{MESSAGES}::test_closing_the_channel_returns_unacked_messages_without_counting_them",),
        "unsettled deliveries given back at close are counted",
    ),
    Mutation(
        "refund-return-buffered", "pg_broker/transport/delivery.py",
        '            self._settlements.settle("requeue", held, refund=1)',
        '            self._settlements.settle("requeue", held, refund=0)',
        (f"{EVENT_LOOP}::test_claimed_messages_never_delivered_go_back_uncounted_when_the_consumer_cancels",),
        "claimed, never-delivered messages given back are counted",
    ),
    Mutation(
        "redelivered-flag", "pg_broker/transport/channel.py",
        '["redelivered"] = attempts > 1',
        '["redelivered"] = False',
        (f"{MESSAGES}::test_requeue_returns_the_row_to_pending_at_once",),
        "a redelivery is not marked redelivered",
    ),
    # Backoff ----------------------------------------------------------------------------
    Mutation(
        "backoff-option", QUERIES,
        "fail_task(held.id, held.lease_token, NULL, true, %(backoff)s::interval)",
        "fail_task(held.id, held.lease_token, NULL, true)",
        (f"{MESSAGES}::test_reject_without_requeue_retries_after_a_backoff_that_doubles_per_attempt",),
        "the retry_backoff option is ignored",
    ),
    Mutation(
        "backoff-doubling", LEASES_OWNERS,
        "                            ELSE now() + v_backoff\n"
        "                                 * power(2::float8, least(greatest(attempts - 1, 0), 200))",
        "                            ELSE now() + v_backoff",
        (f"{MESSAGES}::test_reject_without_requeue_retries_after_a_backoff_that_doubles_per_attempt",
         f"{FUNCTIONS}::test_fail_task_retries_with_exponential_backoff_then_fails_keeping_the_error"),
        "the backoff does not double per attempt",
    ),
    # TTL --------------------------------------------------------------------------------
    Mutation(
        "ttl-claim", CLAIM,
        "AND t.visible_at <= now() AND (t.expires_at IS NULL OR t.expires_at > now())\n         ORDER BY",
        "AND t.visible_at <= now()\n         ORDER BY",
        (f"{MESSAGES}::test_expired_message_is_never_delivered",),
        "an expired message is delivered",
    ),
    Mutation(
        "ttl-queue", QUERIES,
        "now() + least(%(ttl)s::interval, q.message_ttl) AS expires_at",
        "now() + %(ttl)s::interval AS expires_at",
        (f"{MESSAGES}::test_queue_message_ttl_applies_to_every_message",),
        "a queue's x-message-ttl is ignored",
    ),
    # Leases, purge, queues ----------------------------------------------------------------
    Mutation(
        "lease-renewal", "pg_broker/transport/leases.py",
        "        renewed = set(self._store.renew_leases(held, timedelta(seconds=self.lease)))",
        "        renewed = set(held)",
        (f"{RECOVERY}::test_held_message_keeps_its_lease_past_the_lease_length",),
        "held leases are not renewed",
    ),
    Mutation(
        "hand-off-refund", HAND_OFF,
        "                                    THEN 1 ELSE 0 END,",
        "                                    THEN 0 ELSE 0 END,",
        (f"{HANDED}::test_an_ack_from_a_stale_owner_is_refused_and_the_reclaim_does_not_count",
         f"{HANDED}::test_a_killed_worker_s_hand_off_is_reclaimed_without_counting"),
        "a hand-off whose worker never renewed it counts as a delivery when reclaimed",
    ),
    Mutation(
        "hand-off-give-back", "pg_broker/transport/poller.py",
        "self._give_back([self._tokens.pop(queue) for queue in queues if queue in self._tokens])",
        "self._give_back([])",
        (f"{HANDED}::test_a_consumer_closed_before_it_heard_its_hand_off_gives_it_back",),
        "a consumer that stops waiting leaves its hand-offs held until their leases end",
    ),
    Mutation(
        "hand-off-withdraw", "pg_broker/transport/poller.py",
        "            self._store.wake_only(full, self._waiter)",
        "            self._store.wake_only([], self._waiter)",
        (f"{HANDED}::test_a_consumer_whose_window_fills_withdraws_its_other_offers",),
        "a consumer whose prefetch window is full is still handed rows",
    ),
    Mutation(
        "reclaim-live-lease", HAND_OFF,
        "         WHERE status IN ('claimed', 'processing')\n           AND lease_expires_at < now()\n",
        "         WHERE status IN ('claimed', 'processing')\n           AND lease_expires_at < now() + interval '10 minutes'\n",
        (f"{RECOVERY}::test_held_message_keeps_its_lease_past_the_lease_length",),
        "the watchdog takes back live leases",
    ),
    Mutation(
        "purge-held", QUERIES,
        "     WHERE queue = %(name)s AND status = 'pending'\n       FOR UPDATE SKIP LOCKED\n), transient AS (",
        "     WHERE queue = %(name)s\n       FOR UPDATE SKIP LOCKED\n), transient AS (",
        (f"{MESSAGES}::test_purge_removes_ready_messages_only_and_returns_their_count",),
        "a purge takes messages workers hold",
    ),
    Mutation(
        "queue-keep-alive", "pg_broker/transport/leases.py",
        "        self._store.touch_queues(list(expiring))",
        "        list(expiring)",
        (f"{ROUTING}::test_consumed_queue_outlives_its_expiry_while_the_consumer_is_busy",),
        "a busy consumer's expiring queue is swept",
    ),
    Mutation(
        "exclusive-queue", "pg_broker/transport/channel.py",
        "            if auto_delete or exclusive:",
        "            if auto_delete:",
        (f"{MESSAGES}::test_an_exclusive_queue_goes_away_with_its_channel",),
        "an exclusive queue outlives its channel",
    ),
    # Publishing ---------------------------------------------------------------------------
    Mutation(
        "transient-pipelined", "pg_broker/transport/channel.py",
        "            if transient or not options.confirm_publish:",
        "            if not options.confirm_publish:",
        (f"{PIPELINE}::test_transient_messages_are_pipelined_even_with_confirms_on",),
        "transient messages wait for their commit",
    ),
    Mutation(
        "pipeline-resend", "pg_broker/transport/pipeline.py",
        "        again = [e for e in (*self._unflushed, *self._in_flight) if e.durable]",
        "        again = []",
        (f"{PIPELINE}::test_no_message_is_lost_when_the_sessions_are_dropped_mid_stream",),
        "unconfirmed messages are not sent again after a lost connection",
    ),
    Mutation(
        "pipeline-unflushed-resend", "pg_broker/transport/pipeline.py",
        "        again = [e for e in (*self._unflushed, *self._in_flight) if e.durable]",
        "        again = [e for e in self._in_flight if e.durable]",
        (f"{FLUSH}::test_a_pipelined_message_committed_but_not_flushed_is_sent_again_after_a_lost_session",),
        "a message committed asynchronously is not sent again before its flush",
    ),
    Mutation(
        "pipeline-confirm-before-flush", "pg_broker/transport/pipeline.py",
        "            elif entry.awaits_flush:\n                self._unflushed.append(entry)",
        "            elif False:\n                self._unflushed.append(entry)",
        (f"{FLUSH}::test_a_pipelined_publish_is_claimable_at_once_and_confirmed_only_by_a_flush",),
        "a pipelined message is confirmed by its asynchronous commit",
    ),
    Mutation(
        "publish-synchronous-commit", QUERIES,
        "THEN set_config('synchronous_commit', %(synchronous_commit)s::text, true)",
        "THEN NULL",
        (f"{MESSAGES}::test_the_synchronous_commit_option_applies_to_publishes",),
        "the synchronous_commit option is ignored",
    ),
    Mutation(
        "publish-flush", "pg_broker/transport/store.py",
        "            then.send(pgconn, values[1], prepared)\n",
        "",
        (f"{FLUSH}::test_a_publish_is_claimable_before_its_flush_and_returns_only_after_it",),
        "a confirmed publish returns before its WAL flush",
    ),
    Mutation(
        "claim-asynchronous-commit", CLAIM,
        "    PERFORM set_config('synchronous_commit', 'off', true);\n",
        "",
        (f"{MESSAGES}::test_claims_settlements_and_renewals_commit_asynchronously",),
        "claims wait for their WAL flush",
    ),
    # Acks under a worker's event loop -------------------------------------------------------
    Mutation(
        "ack-rides-claim", "pg_broker/transport/settlement.py",
        "        elif self._wake is not None:\n            self._acks.append(held)",
        "        elif False:\n            self._acks.append(held)",
        (f"{EVENT_LOOP}::test_an_ack_rides_in_the_statement_of_the_next_claim",),
        "under a hub every ack is a statement of its own",
    ),
    Mutation(
        "ack-idle-flush", "pg_broker/transport/poller.py",
        "            self._ack_timer = self.loop.call_later(ACK_WAIT, self._flush_acks_later)",
        "            pass",
        (f"{EVENT_LOOP}::test_an_ack_on_an_idle_loop_goes_out_on_its_own_without_waiting_for_the_poll",),
        "an ack on an idle loop waits for the safety poll",
    ),
    # Wake-ups (issue 12) ------------------------------------------------------------------------
    Mutation(
        "wake-dead-waiter", WAKE,
        "        CONTINUE WHEN v_lock IS NOT NULL\n",
        "        CONTINUE WHEN false AND v_lock IS NOT NULL\n",
        (f"{WAITERS}::test_a_consumer_killed_while_waiting_takes_no_wake_up",),
        "a killed consumer's waiter record takes a publish's wake-up",
    ),
    Mutation(
        "listen-session-per-transport", "pg_broker/transport/listener.py",
        "    return _sessions.get(conninfo, connect_kwargs, response_timeout)\n",
        "    return ListenSession(conninfo, connect_kwargs, response_timeout)\n",
        (f"{SHARED_LISTEN}::test_consuming_connections_of_a_process_share_one_listen_session",),
        "every kombu connection of a process opens a LISTEN connection of its own",
    ),
    Mutation(
        "kick-ignores-inbox", "pg_broker/transport/poller.py",
        "        self._notified(self._listener.take())\n",
        "",
        (f"{SHARED_LISTEN}::test_a_hub_and_a_draining_thread_of_one_process_are_each_woken_whoever_reads",),
        "a hub is not woken for its notification read by another thread of the process",
    ),
    # Row-level security -----------------------------------------------------------------------
    *(Mutation(
        f"rls-{table}", SUPABASE,
        f"CREATE POLICY {table}_select_own ON {table} FOR SELECT TO authenticated\n"
        "    USING (user_id = (SELECT auth.uid()));",
        f"CREATE POLICY {table}_select_own ON {table} FOR SELECT TO authenticated\n"
        "    USING (true);",
        (f"{RLS}::test_a_user_sees_exactly_their_own_jobs_tasks_and_artifacts",),
        f"a user sees every user's {table}",
    ) for table in ("jobs", "job_tasks", "job_artifacts")),
    Mutation(
        "rls-service-role", SUPABASE,
        "CREATE POLICY job_tasks_service_all ON job_tasks TO service_role USING (true) WITH CHECK (true);",
        "",
        (f"{RLS}::test_a_service_role_without_bypassrls_gets_everything_through_its_policies",),
        "service_role without BYPASSRLS sees no task",
    ),
    # Operating it ---------------------------------------------------------------------------------
    Mutation(
        "dead-list", QUERIES,
        "  FROM job_tasks WHERE status IN ('dead', 'failed')\n ORDER BY completed_at DESC",
        "  FROM job_tasks WHERE status = 'dead'\n ORDER BY completed_at DESC",
        (f"{CLI}::test_dead_list_shows_failed_and_dead_tasks_newest_first",),
        "'pg-broker dead list' leaves out failed tasks",
    ),
    # Bounded storage: the partitioned history and the workers' vacuum ---------------------------
    Mutation(
        "history-unfinished-jobs", HISTORY,
        "               AND j.status IN ('completed', 'failed', 'cancelled')\n"
        "               AND j.completed_at IS NOT NULL\n",
        "",
        (f"{PARTITIONED}::test_rows_of_unfinished_jobs_and_plain_messages_stay",),
        "the move takes the finished rows of jobs still running",
    ),
    Mutation(
        "history-partition-grants", HISTORY,
        "            EXECUTE format('REVOKE ALL ON %s FROM %s', v_rel, v_grantee);\n",
        "            NULL;\n",
        (f"{PARTITIONED}::test_users_see_only_their_own_jobs_history",),
        "a new partition keeps the grants of default privileges (read past RLS)",
    ),
    Mutation(
        "history-rls", HISTORY_LAYER,
        "    USING (user_id = (SELECT auth.uid()));",
        "    USING (true);",
        (f"{PARTITIONED}::test_users_see_only_their_own_jobs_history",),
        "a user sees every user's history",
    ),
    Mutation(
        "tasks-of-job-history", QUERIES,
        "        UNION ALL\n        SELECT id, sequence, task_id, task_type, queue, status, attempts,"
        " max_attempts,\n               worker_id, error, result, created_at, started_at,"
        " completed_at\n          FROM job_tasks_history WHERE job_id = %(job_id)s) t\n",
        ") t\n",
        (f"{PARTITIONED}::test_a_finished_jobs_completed_rows_move_to_the_day_they_may_go",),
        "a job's page loses the tasks moved to the history",
    ),
    Mutation(
        "retention-failed-unlocked", QUERIES,
        "     LIMIT %(batch)s\n       FOR UPDATE SKIP LOCKED\n), of_jobs AS MATERIALIZED (",
        "     LIMIT %(batch)s\n), of_jobs AS MATERIALIZED (",
        ("tests/integration/test_retention_races.py::"
         "test_retention_racing_claims_acks_and_dead_retry_deletes_only_finished_rows",),
        "retention deletes a dead message dead retry is re-queueing",
    ),
    Mutation(
        "worker-vacuum", QUERIES,
        "SELECT coalesce((SELECT n_dead_tup > %(threshold)s FROM pg_stat_user_tables\n",
        "SELECT coalesce((SELECT n_dead_tup > %(threshold)s * 1000 FROM pg_stat_user_tables\n",
        (f"{PARTITIONED}::test_a_worker_vacuums_job_tasks_when_autovacuum_is_off",
         f"{PARTITIONED}::test_a_worker_vacuums_job_tasks_past_the_threshold_though_autovacuum_just_did"),
        "workers never vacuum job_tasks",
    ),
    Mutation(
        "worker-vacuum-backoff", "pg_broker/transport/leases.py",
        "        self._next_vacuum = time.monotonic() + self._vacuum_retry\n",
        "        self._next_vacuum = time.monotonic()\n",
        (f"{PARTITIONED}::test_a_vacuum_an_old_snapshot_defeats_is_not_repeated_every_maintenance",),
        "a vacuum an open snapshot defeats runs again every maintenance turn",
    ),
    # Results notify only their waiters (core 200) ----------------------------------
    Mutation(
        "result-notify-always", AWAITED,
        "       OR EXISTS (SELECT 1 FROM task_result_waiters w WHERE w.key = p_key) THEN\n",
        "       OR true THEN\n",
        (f"{RESULTS}::test_a_result_no_session_awaits_is_written_without_a_notification",),
        "every result write notifies, awaited or not",
    ),
    Mutation(
        "result-await-unlocked", AWAITED,
        "        PERFORM pg_advisory_xact_lock(1885823602, v_lock);\n",
        "        NULL;\n",
        (f"{RESULTS}::test_a_waiter_recording_itself_while_a_write_commits_reads_that_write",),
        "a waiter records itself without waiting for a write in flight, and misses it",
    ),
    Mutation(
        "result-set-unlocked", AWAITED,
        "    PERFORM pg_advisory_xact_lock_shared(1885823602, hashtext(p_key));\n",
        "",
        (f"{RESULTS}::test_a_write_while_a_waiter_records_itself_notifies_it",),
        "a write misses a waiter recording itself, and notifies nobody",
    ),
    Mutation(
        "result-ready-recorded", AWAITED,
        "                        WHERE r.key = k AND r.state IN ('SUCCESS', 'FAILURE', 'REVOKED')\n",
        "                        WHERE r.key = k AND false\n",
        (f"{RESULTS}::test_a_result_ready_before_its_wait_is_read_without_a_record",),
        "a waiter records (and locks) keys whose results are ready already",
    ),
    Mutation(
        "result-ended-waiters", QUERIES,
        "     WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.session)\n",
        "     WHERE false\n",
        (f"{RESULTS}::test_records_of_ended_waiting_sessions_leave_with_the_retention",),
        "records of ended waiting sessions stay for ever",
    ),
    Mutation(
        "chord-part-apart", "pg_broker/results/backend.py",
        "        if (not store_result or request is None or not request.chord or not request.group\n",
        "        if (True or request is None or not request.chord or not request.group\n",
        (f"{RESULTS}::test_a_header_part_stores_its_result_and_counts_itself_in_one_statement",),
        "a chord's header task stores its result and counts its part in two statements",
    ),
)


def apply(mutation: Mutation, root: Path) -> str:
    """Write ``mutation`` into the copy at ``root``; returns the file's original text."""
    path = root / mutation.path
    text = path.read_text()
    found = text.count(mutation.old)
    if found != 1:
        raise TargetMissing(
            f"mutation {mutation.name}: its text occurs {found} times in {mutation.path} "
            f"(expected once); update the mutation to the code as it is now:\n{mutation.old}")
    path.write_text(text.replace(mutation.old, mutation.new))
    return text


def missing_targets(root: Path = REPO_ROOT) -> list[str]:
    """What is wrong with the list against the tree at ``root`` (empty: nothing)."""
    problems = []
    names = [m.name for m in MUTATIONS]
    problems += [f"mutation {n} is listed twice" for n in sorted(set(names)) if names.count(n) > 1]
    for mutation in MUTATIONS:
        path = root / mutation.path
        if not path.is_file():
            problems.append(f"mutation {mutation.name}: no file {mutation.path}")
            continue
        found = path.read_text().count(mutation.old)
        if found != 1:
            problems.append(f"mutation {mutation.name}: its text occurs {found} times in "
                            f"{mutation.path} (expected once)")
        if mutation.old == mutation.new:
            problems.append(f"mutation {mutation.name} changes nothing")
        for test in mutation.tests:
            file, _, function = test.partition("::")
            source = root / file
            if not source.is_file():
                problems.append(f"mutation {mutation.name}: no test file {file}")
            elif function and f"def {function.split('[')[0]}(" not in source.read_text():
                problems.append(f"mutation {mutation.name}: no test {test}")
    return problems


def copy_tree(destination: Path) -> None:
    """The files git knows (tracked and new, not ignored), as in the working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def pytest_run(root: Path, env: dict[str, str], tests: list[str]) -> tuple[int, str, float]:
    """Run ``tests`` in the copy; (pytest's exit code, its last lines, seconds)."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
             f"--timeout={TEST_TIMEOUT}", *tests],
            cwd=root, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return -1, f"no result within {RUN_TIMEOUT} s", time.monotonic() - started
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    return done.returncode, tail, time.monotonic() - started


def copy_environment(root: Path, test_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["PG_BROKER_TEST_URL"] = test_url
    imported = subprocess.run(
        [sys.executable, "-c", "import pg_broker, tasks; print(pg_broker.__file__); "
         "print(tasks.__file__)"],
        cwd=root, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()
    if not all(Path(path).is_relative_to(root) for path in imported):
        raise SystemExit(f"the copy's packages are not the ones imported: {imported}")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"no mutation named {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {m.path}: {m.breaks}\n{'':28} tests: {', '.join(m.tests)}")
        return 0
    problems = missing_targets()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2

    from pg_broker.database import embedded_url, stop_embedded

    with tempfile.TemporaryDirectory(prefix="pg_broker_mutations_") as scratch:
        root = Path(scratch) / "tree"
        copy_tree(root)
        data_dir = None
        test_url = os.environ.get("PG_BROKER_TEST_URL", "").strip()
        if not test_url:
            data_dir = Path(scratch) / "pgdata"
            test_url = embedded_url(data_dir)
        try:
            env = copy_environment(root, test_url)
            tests = sorted({test for m in chosen for test in m.tests})
            code, tail, seconds = pytest_run(root, env, tests)
            print(f"baseline: {len(tests)} test(s) on the unmutated copy, {seconds:.0f} s: "
                  f"{'pass' if code == 0 else 'FAIL'}", flush=True)
            if code != 0:
                print(tail, file=sys.stderr)
                return 2
            survivors = unjudged = 0
            for mutation in chosen:
                original = apply(mutation, root)
                try:
                    code, tail, seconds = pytest_run(root, env, list(mutation.tests))
                finally:
                    (root / mutation.path).write_text(original)
                verdict = {0: "SURVIVED", 1: "caught"}.get(code, f"not judged (exit {code})")
                survivors += code == 0
                unjudged += code not in (0, 1)
                print(f"{mutation.name:28} {verdict:10} {seconds:5.0f} s  {mutation.breaks}",
                      flush=True)
                if code not in (1,):
                    print(tail, file=sys.stderr)
        finally:
            if data_dir is not None:
                stop_embedded(data_dir)
    print(f"{len(chosen)} mutation(s): {len(chosen) - survivors - unjudged} caught, "
          f"{survivors} survived, {unjudged} not judged")
    return 0 if survivors == unjudged == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
