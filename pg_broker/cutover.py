"""Moving producers from an existing broker (Redis, RabbitMQ) to pgbroker, a
share at a time.

During a cutover workers run on both brokers and the app keeps its old
``broker_url``; producers send through a :class:`Rollout`, which sends a
share of new tasks — ``SUPABASE_QUEUE_ROLLOUT_PERCENT`` percent, the seed's
name — to pgbroker and the rest to the old broker. The choice is a hash of a
key (the task id, or a job id so every task of a job lands on one broker), so
it is the same in every process and on every retry, and raising the
percentage only moves keys from old to new, never back. At 100, what is left
in the old broker is moved with Celery's own ``celery migrate`` (see the
README's cutover recipe).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

from celery import Celery, Task
from celery.result import AsyncResult
from kombu import Connection
from kombu.pools import producers

PERCENT_VARIABLE = "SUPABASE_QUEUE_ROLLOUT_PERCENT"


def rollout_percent() -> float:
    """``SUPABASE_QUEUE_ROLLOUT_PERCENT`` (0–100; unset: 0)."""
    raw = os.environ.get(PERCENT_VARIABLE, "").strip()
    try:
        percent = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{PERCENT_VARIABLE}={raw!r} is not a number from 0 to 100") from None
    if not 0 <= percent <= 100:
        raise ValueError(f"{PERCENT_VARIABLE}={raw!r} is outside 0–100")
    return percent


def bucket(key: str) -> float:
    """Where ``key`` falls in [0, 100): the same everywhere, spread evenly."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10_000 / 100


class Rollout:
    """Publishes each task to the old broker (the app's) or to pgbroker."""

    def __init__(self, app: Celery, new_broker_url: str, percent: float | None = None) -> None:
        self.app = app
        self.new_broker = Connection(new_broker_url)
        self.percent = rollout_percent() if percent is None else percent

    def to_new(self, key: str) -> bool:
        return bucket(str(key)) < self.percent

    def apply_async(self, task: Task | str, args: tuple | list = (),
                    kwargs: dict[str, Any] | None = None, *, key: str | None = None,
                    **options: Any) -> AsyncResult:
        """``task.apply_async(args, kwargs, **options)`` on the broker ``key``
        (default: the task id) falls to."""
        name = task if isinstance(task, str) else task.name
        task_id = options.setdefault("task_id", str(uuid.uuid4()))
        if not self.to_new(key or task_id):
            return self.app.send_task(name, args, kwargs, **options)
        with producers[self.new_broker].acquire(block=True) as producer:
            return self.app.send_task(name, args, kwargs, producer=producer, **options)
