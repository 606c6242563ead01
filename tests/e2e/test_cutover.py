"""Moving from Redis to pgbroker without losing a task (the README's cutover
recipe): workers on both brokers, producers switched by a rollout percentage
(``SUPABASE_QUEUE_ROLLOUT_PERCENT``) with both brokers live, then Celery's
own ``celery migrate`` moving what is left in Redis into pgbroker, where it
runs. Uses the shared Redis on 127.0.0.1:6379 with a queue of its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import cutover_app
import pytest
import redis
from celery_workers import REPO_ROOT, process_environment, wait_for

from pg_broker.cutover import Rollout
from pg_broker.processes import Supervised, celery_command, worker_command
from pg_broker.urls import broker_url

pytestmark = pytest.mark.slow

REDIS = "redis://127.0.0.1:6379/0"
APP = "tests.cutover_app"


@pytest.fixture
def redis_queue() -> Iterator[str]:
    """A queue name of this test's own on the shared Redis; its keys go at the end."""
    client = redis.Redis.from_url(REDIS)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS} ({exc}): the cutover test needs a live old broker")
    queue = f"cutover-{uuid.uuid4().hex[:8]}"
    try:
        yield queue
    finally:
        client.delete(queue, f"_kombu.binding.{queue}")
        client.close()


def _worker(env: dict[str, str], broker: str, label: str, queue: str, log_dir: Path) -> Supervised:
    command = worker_command(APP, hostname=f"{label}-{uuid.uuid4().hex[:6]}@%h", pool="solo",
                             queues=(queue,), extra_args=("--without-mingle", "--without-gossip"))
    worker = Supervised(command, env={**env, "CUTOVER_BROKER": broker, "CUTOVER_LABEL": label},
                        log_file=log_dir / f"{label}.log", cwd=REPO_ROOT).start()
    worker.wait_for_log(" ready.", 90)
    return worker


def _ran(record: Path) -> dict[str, list[str]]:
    """token -> the labels of the brokers that delivered it (once each, if all is well)."""
    ran: dict[str, list[str]] = {}
    if record.exists():
        for line in record.read_text().splitlines():
            label, token = line.split()
            ran.setdefault(token, []).append(label)
    return ran


def test_a_cutover_from_redis_to_pgbroker_loses_no_task(
    database_url: str, redis_queue: str, tmp_path: Path
) -> None:
    record = tmp_path / "ran.txt"
    env = process_environment(database_url, PYTHONPATH=str(REPO_ROOT))
    new_broker = broker_url(database_url)
    old_worker = _worker(env, REDIS, "redis", redis_queue, tmp_path)
    new_worker = _worker(env, new_broker, "pgbroker", redis_queue, tmp_path)
    try:
        # Step 1: both brokers live, 30 % of new tasks to pgbroker.
        rollout = Rollout(cutover_app.app, new_broker, percent=30)
        tokens = [str(uuid.uuid4()) for _ in range(60)]
        for token in tokens:
            rollout.apply_async(cutover_app.record, (str(record), token), task_id=token,
                                queue=redis_queue)
        # A job's tasks follow its key: all on one broker.
        job = str(uuid.uuid4())
        job_tokens = [f"{job}-{n}" for n in range(5)]
        for token in job_tokens:
            rollout.apply_async(cutover_app.record, (str(record), token), key=job,
                                queue=redis_queue)
        wait_for(lambda: len(_ran(record)) == 65, 90,
                 lambda: f"65 tasks to run; ran {len(_ran(record))}:\n"
                         + old_worker.log_tail() + "\n" + new_worker.log_tail())
        ran = _ran(record)
        expected = {t: ["pgbroker" if rollout.to_new(t) else "redis"] for t in tokens}
        assert {t: ran[t] for t in tokens} == expected
        assert 0 < sum(v == ["pgbroker"] for v in expected.values()) < len(tokens)
        assert {tuple(ran[t]) for t in job_tokens} == {("pgbroker",) if rollout.to_new(job)
                                                       else ("redis",)}

        # Step 2: the Redis workers stop; tasks still sent to Redis wait there.
        old_worker.stop()
        stuck = [str(uuid.uuid4()) for _ in range(20)]
        everything_old = Rollout(cutover_app.app, new_broker, percent=0)
        for token in stuck:
            everything_old.apply_async(cutover_app.record, (str(record), token), task_id=token,
                                       queue=redis_queue)
        assert redis.Redis.from_url(REDIS).llen(redis_queue) == 20

        # Step 3: celery migrate moves them into pgbroker, where they run.
        migrate = Supervised(
            celery_command(APP, "migrate", REDIS, new_broker, "--queues", redis_queue,
                           "--ack-messages", "--timeout", "5"),
            env=env, log_file=tmp_path / "migrate.log", cwd=REPO_ROOT).start()
        assert migrate.wait(120) == 0, migrate.describe("celery migrate failed")
        assert "Migrating task 20/" in migrate.log()
        wait_for(lambda: all(t in _ran(record) for t in stuck), 90,
                 lambda: "the migrated tasks to run:\n" + new_worker.log_tail())
        ran = _ran(record)
        assert {t: ran[t] for t in stuck} == {t: ["pgbroker"] for t in stuck}
        assert redis.Redis.from_url(REDIS).llen(redis_queue) == 0
        assert len(ran) == 85 and all(len(labels) == 1 for labels in ran.values())
    finally:
        old_worker.kill()
        new_worker.kill()
