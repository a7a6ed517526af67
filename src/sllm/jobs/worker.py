"""The isolated fine-tuning instance: one process per job, run as `python -m sllm.jobs.worker`.

It runs the backend and reports progress, events and its result (or the reason it failed). It
never writes the job's status: its exit code tells the supervisor how it ended. It dies with its
parent (PR_SET_PDEATHSIG), so no orphan trains on. Two ways to run it:

    python -m sllm.jobs.worker --db PATH JOB_ID             # local: reads and writes SQLite
    python -m sllm.jobs.worker --report-fd N JOB_ID < spec  # Ray node: spec as JSON on stdin,
                                                            # reports as JSON lines on fd N
"""

from __future__ import annotations

import argparse
import ctypes
import json
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


class ThrottledReporter:
    """Progress is throttled (the last one always lands); subclasses say where reports go."""

    def __init__(self, job_id: str) -> None:
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
            self._write_progress(self._pending)
            self._pending = None
            self._last_write = time.monotonic()

    def _write_progress(self, fields: dict[str, Any]) -> None:
        raise NotImplementedError

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        raise NotImplementedError

    def result(self, adapter_path: str) -> None:
        raise NotImplementedError

    def error(self, message: str, kind: str) -> None:
        raise NotImplementedError


class DbReporter(ThrottledReporter):
    """Writes progress, events, the result and the error to the job record."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        super().__init__(job_id)
        self.store = store

    def _write_progress(self, fields: dict[str, Any]) -> None:
        self.store.set_progress(self.job_id, fields)

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.store.add_event(self.job_id, kind, message, data)

    def result(self, adapter_path: str) -> None:
        self.store.set_result(self.job_id, adapter_path)

    def error(self, message: str, kind: str) -> None:
        self.store.set_error(self.job_id, message, kind)


class PipeReporter(ThrottledReporter):
    """Sends the same reports as JSON lines down a pipe, to a parent that owns the database.

    Used on Ray nodes: the job's actor passes the lines on and the head writes them to SQLite,
    so no node but the head ever opens the database (see `sllm.cluster.runner`).
    """

    def __init__(self, fd: int, job_id: str) -> None:
        super().__init__(job_id)
        self._out = os.fdopen(fd, "w", buffering=1)

    def _send(self, kind: str, **body: Any) -> None:
        self._out.write(json.dumps({"kind": kind, **body}, default=str) + "\n")
        self._out.flush()

    def _write_progress(self, fields: dict[str, Any]) -> None:
        self._send("progress", fields=fields)

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._send("event", type=kind, message=message, data=data)

    def result(self, adapter_path: str) -> None:
        self._send("result", adapter_path=adapter_path)

    def error(self, message: str, kind: str) -> None:
        self._send("error", message=message, error_kind=kind)


def run_spec(spec, ft_backend: str, reporter: ThrottledReporter) -> int:
    """Run one job's backend; every outcome is reported before the exit code is returned."""
    from sllm.finetune.base import get_backend

    try:
        backend = get_backend(ft_backend)
        result = backend.run(spec, reporter)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the record
        traceback.print_exc()
        reporter.flush()
        kind = getattr(exc, "error_kind", ErrorKind.WORKER_ERROR.value)  # e.g. diverged
        reporter.error(f"{type(exc).__name__}: {exc}", kind)
        return 1
    reporter.flush()
    reporter.result(str(result.adapter_path))
    reporter.event("result", f"Adapter saved to {result.adapter_path}", result.metrics)
    return 0


def run_job(store: JobStore, job_id: str) -> int:
    from sllm.finetune.base import JobSpec

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
    return run_spec(spec, record.ft_backend, DbReporter(store, job_id))


def run_piped(fd: int, job_id: str, raw_spec: str) -> int:
    """Ray mode: the spec comes from the parent; reports go back to it through `fd`."""
    from sllm.finetune.base import JobSpec

    data = json.loads(raw_spec)
    spec = JobSpec(
        job_id=job_id,
        model=data["model"],
        storage_path=Path(data["storage_path"]),
        backend_config=data["backend_config"],
        num_cpus=data["num_cpus"],
        num_gpus=data["num_gpus"],
    )
    return run_spec(spec, data["ft_backend"], PipeReporter(fd, job_id))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sllm-worker")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", type=Path, help="Job database (local mode).")
    where.add_argument("--report-fd", type=int, help="Pipe for reports; spec on stdin (Ray mode).")
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    die_with_parent()
    if args.report_fd is not None:
        return run_piped(args.report_fd, args.job_id, sys.stdin.read())
    store = JobStore(args.db)
    try:
        return run_job(store, args.job_id)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
