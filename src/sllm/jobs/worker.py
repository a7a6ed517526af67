"""The isolated fine-tuning instance: one process per job, run as `python -m sllm.jobs.worker`.

It reads its job from the database, runs the backend, and writes progress, events and its result
(or the reason it failed) back. It never writes the job's status: its exit code tells the
supervisor how it ended. It dies with the server (PR_SET_PDEATHSIG), so no orphan trains on.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from sllm.jobs.db import JobStore
from sllm.jobs.states import ErrorKind

PROGRESS_MIN_INTERVAL_S = 0.25


def die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the server dies, then close the race where it already has."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    expected = os.environ.get("SLLM_PARENT_PID")
    if expected and os.getppid() != int(expected):
        os._exit(1)


class DbReporter:
    """Writes progress (throttled; the last one always lands) and events to the job record."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self._last_write = 0.0
        self._pending: dict[str, Any] | None = None

    def progress(self, **fields: Any) -> None:
        self._pending = {k: v for k, v in fields.items() if v is not None}
        now = time.monotonic()
        if now - self._last_write >= PROGRESS_MIN_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self._pending is not None:
            self.store.set_progress(self.job_id, self._pending)
            self._pending = None
            self._last_write = time.monotonic()

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.store.add_event(self.job_id, kind, message, data)


def run_job(store: JobStore, job_id: str) -> int:
    from sllm.finetune.base import JobSpec, get_backend

    record = store.get(job_id)
    if record is None:
        print(f"job {job_id} not found", file=sys.stderr)
        return 2
    spec = JobSpec(
        job_id=job_id,
        model=record.model,
        storage_path=store.path.parent,
        backend_config=record.backend_config,
        num_cpus=record.num_cpus,
        num_gpus=record.num_gpus,
    )
    reporter = DbReporter(store, job_id)
    try:
        backend = get_backend(record.ft_backend)
        result = backend.run(spec, reporter)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the record
        traceback.print_exc()
        reporter.flush()
        store.set_error(job_id, f"{type(exc).__name__}: {exc}", ErrorKind.WORKER_ERROR.value)
        return 1
    reporter.flush()
    store.set_result(job_id, str(result.adapter_path))
    reporter.event("result", f"Adapter saved to {result.adapter_path}", result.metrics)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sllm-worker")
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    die_with_parent()
    store = JobStore(args.db)
    try:
        return run_job(store, args.job_id)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
