"""The task and job life cycles, mirrored from the check constraints in
``migrations/core/100_broker_schema.sql`` (where the state machine is drawn)."""

from enum import StrEnum


class TaskStatus(StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_TASK_STATES


FINAL_TASK_STATES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED}
)
HELD_TASK_STATES = frozenset({TaskStatus.CLAIMED, TaskStatus.PROCESSING})


# What pg-broker dead lists and retries: tasks that failed or died for good.
DEAD_LETTER_STATES = frozenset({TaskStatus.FAILED, TaskStatus.DEAD})


class JobStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_JOB_STATES


FINAL_JOB_STATES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
