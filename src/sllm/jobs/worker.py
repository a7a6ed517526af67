"""The isolated fine-tuning instance: one process per job, run as `python -m sllm.jobs.worker`.

It runs the backend and reports progress, events and its result (or the reason it failed). It
never writes the job's status: its exit code tells the supervisor how it ended. It dies with its
parent (PR_SET_PDEATHSIG), so no orphan trains on. It usually runs in a process taken from the
server's warm pool (`sllm.procpool`), which imported torch, transformers and peft beforehand.
Two ways to run it:

    python -m sllm.jobs.worker --db PATH JOB_ID             # local: reads and writes SQLite
    python -m sllm.jobs.worker --report-path FIFO JOB_ID < spec  # Ray node: spec as JSON on
                                                                 # stdin, reports as JSON lines
                                                                 # to the FIFO

SIGTERM (a clean server shutdown) makes it save a checkpoint at the next step boundary and exit
with `EXIT_STOPPED` (see `sllm.finetune.checkpoints.GracefulStop`). What it writes besides the
adapter stays in the job's directory `_jobs/<id>/` of the store, deleted with the job's scratch:
the datasets cache of a local dataset (`datasets/`) and temporary files (`tmp/`); its output goes
to `_jobs/<id>/worker.log`, which keeps the traceback of a failure while the job's `error.message`
is one line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from sllm.errors import SllmError
from sllm.finetune.checkpoints import StopRequested, graceful_stop
from sllm.jobs.db import JobStore
from sllm.jobs.messages import exception_reason, log_hint
from sllm.jobs.states import ErrorKind, JobStatus
from sllm.paths import jobs_dir

PROGRESS_MIN_INTERVAL_S = 0.25
EXIT_STOPPED = 75  # stopped on request (SIGTERM), checkpoint saved: not a failure
# Loss events: a step is written when at least `last written step // LOSS_STRIDE_DIVISOR` steps
# have passed since the last one written: every logged step up to step 200, then ever fewer, so a
# run of S steps writes about 200 + 100 * ln(S / 200) rows (1,050 for a million steps). The last
# step is always written.
LOSS_STRIDE_DIVISOR = 100


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


class LossThinner:
    """Which loss events to keep: every one early on, then a stride that grows with the step, so
    the event count grows with the log of the run's length (the progress field and the adapter's
    `training_metadata.json` still get every point)."""

    def __init__(self, divisor: int = LOSS_STRIDE_DIVISOR) -> None:
        self.k = divisor
        self.last: int | None = None
        self.total: int | None = None
        self.skipped = 0

    def keep(self, step: int) -> bool:
        last = self.last
        if last is None or step - last >= last // self.k or (self.total and step >= self.total):
            self.last = step
            return True
        self.skipped += 1
        return False


class ThrottledReporter:
    """Progress is throttled (the last one always lands), loss events thinned (`LossThinner`);
    subclasses say where reports go."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._last_write = 0.0
        self._pending: dict[str, Any] | None = None
        self.thinner = LossThinner()
        self.metric_thinner = LossThinner()  # validation metrics, when evaluated that often

    def progress(self, **fields: Any) -> None:
        self._pending = {k: v for k, v in fields.items() if v is not None}
        if self._pending.get("total_steps"):
            self.thinner.total = self.metric_thinner.total = int(self._pending["total_steps"])
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
        step = (data or {}).get("step")
        thinner = {"loss": self.thinner, "metric": self.metric_thinner}.get(kind)
        if thinner is not None and isinstance(step, int) and not thinner.keep(step):
            if thinner.skipped == 1:
                self._event(
                    "info",
                    f"From step {step} on, {kind} events are thinned (one per step/"
                    f"{LOSS_STRIDE_DIVISOR} steps, and the last); the progress field follows "
                    f"every step and the adapter's training_metadata.json keeps the whole {kind} "
                    "history.",
                    {"step": step},
                )
            return
        self._event(kind, message, data)

    def _event(self, kind: str, message: str, data: dict[str, Any] | None) -> None:
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

    def _event(self, kind: str, message: str, data: dict[str, Any] | None) -> None:
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

    def _event(self, kind: str, message: str, data: dict[str, Any] | None) -> None:
        self._send("event", type=kind, message=message, data=data)

    def result(self, adapter_path: str) -> None:
        self._send("result", adapter_path=adapter_path)

    def error(self, message: str, kind: str) -> None:
        self._send("error", message=message, error_kind=kind)


def use_job_dirs(spec) -> None:
    """Keep what `datasets` and temporary files write under the job's directory in the store.

    A local dataset's Arrow copy and its tokenization caches (also those of an `hf_hub` dataset
    that is a repository directory on disk) go to `_jobs/<id>/datasets` (kept across re-queues,
    so a resumed job does not convert again). A hub dataset is read from the
    server's datasets cache, where a download belongs (and where an offline server finds it);
    its transforms are not cached there but written to `_jobs/<id>/tmp`, like any temp file.
    `datasets` reads the environment once, at import: a fresh worker calls this first; in a warm
    pool process, which imported it already, `datasets.config` is pointed at the job's cache.
    """
    job_dir = jobs_dir(Path(spec.storage_path)) / spec.job_id
    tmp = job_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # re-read TMPDIR
    dataset = spec.backend_config.get("dataset_config") or {}
    source = dataset.get("dataset_source", "local")
    if source == "local" or os.path.isabs(str(dataset.get("hf_dataset_name") or "")):
        os.environ["HF_DATASETS_CACHE"] = str(job_dir / "datasets")  # a file or repo on disk
        if "datasets" in sys.modules:  # imported by a warm pool process before the job came
            point_datasets_cache(job_dir / "datasets")
    else:
        import datasets

        datasets.disable_caching()


def process_info() -> dict[str, Any]:
    """Where this worker runs and what it got, and `process_s`: seconds from the launch call
    until torch, transformers and peft were imported (about zero in a warm pool process)."""
    import peft  # noqa: F401 - imported here so a fresh process's import cost is counted
    import torch
    import transformers  # noqa: F401

    from sllm.procpool import process_wait_s

    return {
        "pid": os.getpid(),
        "pooled": os.environ.get("SLLM_POOLED") == "1",
        "process_s": process_wait_s() or 0.0,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "torch_threads": torch.get_num_threads(),
    }


def point_datasets_cache(cache: Path) -> None:
    """What `datasets.config` would have computed at import with `HF_DATASETS_CACHE=cache`."""
    import datasets.config as cfg

    cfg.HF_DATASETS_CACHE = cache
    if not os.environ.get("HF_DATASETS_DOWNLOADED_DATASETS_PATH"):
        cfg.DOWNLOADED_DATASETS_PATH = cache / cfg.DOWNLOADED_DATASETS_DIR
    if not os.environ.get("HF_DATASETS_EXTRACTED_DATASETS_PATH"):
        cfg.EXTRACTED_DATASETS_PATH = cfg.DOWNLOADED_DATASETS_PATH / cfg.EXTRACTED_DATASETS_DIR


def run_spec(spec, ft_backend: str, reporter: ThrottledReporter) -> int:
    """Run one job's backend; every outcome is reported before the exit code is returned.

    A failure is reported as one line (the client's mistake as the backend worded it; anything
    else as `Type: first line` and where the log is); the traceback goes to the log."""
    from sllm.finetune.base import get_backend

    try:
        use_job_dirs(spec)
        info = process_info()
        where = "a warm process from the pool" if info["pooled"] else "a fresh process"
        reporter.event(
            "info",
            f"Worker started in {where} (pid {info['pid']}), ready {info['process_s']:.2f}s "
            f"after launch; CUDA_VISIBLE_DEVICES={info['cuda_visible_devices']!r}, "
            f"{info['torch_threads']} torch thread(s).",
            info,
        )
        backend = get_backend(ft_backend)
        result = backend.run(spec, reporter)
    except StopRequested as exc:
        graceful_stop.phase = "finishing"
        reporter.flush()
        reporter.event(
            "info", f"{exc} The server re-queues the job (or pauses it).", {"stopped": True}
        )
        print(f"sllm worker: {exc}", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the record
        graceful_stop.phase = "finishing"
        traceback.print_exc()
        sys.stderr.flush()
        reporter.flush()
        if isinstance(exc, SllmError):  # a reason of ours: invalid data, diverged, ...
            message = f"{exc.message.rstrip('.')}; {log_hint(spec.job_id)}."
        else:
            reason = exception_reason(exc, Path(spec.storage_path))
            message = f"{reason.rstrip('.')}; {log_hint(spec.job_id)}."
        reporter.error(message, getattr(exc, "error_kind", ErrorKind.WORKER_ERROR.value))
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
    where.add_argument("--report-path", type=Path, help="FIFO for reports; spec on stdin (Ray).")
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    die_with_parent()
    if args.report_path is not None:  # the node's runner holds the FIFO's reading end open
        graceful_stop.install()  # no database on a Ray node: every SIGTERM stops cleanly
        fd = os.open(args.report_path, os.O_WRONLY)
        return run_piped(fd, args.job_id, sys.stdin.read())
    store = JobStore(args.db)
    graceful_stop.install(job_ended=lambda: store.status_of(args.job_id) is not JobStatus.RUNNING)
    try:
        return run_job(store, args.job_id)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
