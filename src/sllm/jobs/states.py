"""Job states, the transitions allowed between them, and the terminal set: the one table of truth.

pending ──► running ──► completed
   │          │  └────► failed      (error, crash, timeout)
   │          ├───────► cancelled
   │          ├───────► pending     (re-queued once after a server restart)
   │          └───────► paused      (paused by the user: checkpoint saved at a step boundary)
   ├──► cancelled
   ├──► paused ──► pending          (resumed: runs again from its checkpoint)
   │      └──────► cancelled
   └──► failed                      (could never run, e.g. its model vanished)
"""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"


TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
)

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset(
        {JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.PAUSED}
    ),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.COMPLETED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.PENDING,
            JobStatus.PAUSED,
        }
    ),
    JobStatus.PAUSED: frozenset({JobStatus.PENDING, JobStatus.CANCELLED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


# Jobs that will still run (or run again): they hold their output dir, model and files.
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.PENDING, JobStatus.RUNNING, JobStatus.PAUSED})


def sources_of(target: JobStatus) -> list[JobStatus]:
    """The states from which `target` may be entered."""
    return [s for s, targets in TRANSITIONS.items() if target in targets]


class ErrorKind(str, Enum):
    TIMEOUT = "timeout"
    WORKER_ERROR = "worker_error"
    WORKER_CRASHED = "worker_crashed"
    SERVER_RESTART = "server_restart"
    NODE_LOST = "node_lost"
    UNSCHEDULABLE = "unschedulable"
    DIVERGED = "diverged"  # the loss or the LoRA weights became NaN/Infinity; nothing was saved


# Kinds a worker reports itself (its message is the job's error); any other exit is a crash.
WORKER_REPORTED: frozenset[str] = frozenset(
    {ErrorKind.WORKER_ERROR.value, ErrorKind.DIVERGED.value}
)
