"""The supervisor: one thread that starts, watches and stops job workers.

It wakes on events (a submit, a cancel, a worker exit) rather than on a timer, plus at the next
deadline, so a job submitted to an idle server starts in milliseconds. Each pass:

1. reap workers that exited (completed / failed with the worker's reason or its last log lines;
   a worker whose cluster node died is re-queued once, like a job caught by a server restart);
2. stop workers whose job was cancelled or ran past its timeout (SIGTERM, then SIGKILL);
3. start pending jobs in order (priority, then age) while they fit; a job that does not fit is
   skipped (backfill) unless it has waited longer than `starvation_s`, in which case nothing
   behind it starts until it has run.

Stopping the server cleanly (`stop`) is not a crash: each running job is marked `clean_stop`, its
worker is asked (SIGTERM) to save a checkpoint at the next step boundary and exit, and the job goes
back to `pending` without using up its crash re-queue (`max_restarts` counts only crashes: a
server found dead, a lost node). A pause (`JobStore.request_pause`) is the same stop for one job,
with the same grace, but the job then goes to `paused` and waits for a resume. Once an hour, and
at start, the files of jobs that ended more than `log_retention_s` ago (`_jobs/<id>/`, their
worker log) are deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sllm.jobs.db import JobRecord, JobStore, QueuedJob
from sllm.jobs.launcher import Launcher, WorkerHandle, kill_stale_worker
from sllm.jobs.messages import log_hint
from sllm.jobs.resources import ResourcePool, wait_reason
from sllm.jobs.states import TERMINAL, WORKER_REPORTED, ErrorKind, JobStatus
from sllm.jobs.worker import EXIT_STOPPED

log = logging.getLogger(__name__)

MAX_WAIT_S = 1.0
REASON_TTL_S = 1.0  # a cached pending_reason is at most this old
SWEEP_EVERY_S = 3600.0
# What a job's scratch holds besides its worker log: checkpoints, the datasets cache, temp files,
# epoch checkpoints (copied into the adapter when it is saved).
SCRATCH_PARTS = ("trainer", "datasets", "tmp", "epochs")


@dataclass
class Running:
    job_id: str
    handle: WorkerHandle
    deadline: float
    timeout: float
    stop_reason: str | None = None  # "cancel" | "timeout" | "shutdown" | "pause"
    term_sent_at: float | None = None
    kill_sent: bool = False
    extra: dict = field(default_factory=dict)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _log_end(rec: JobRecord, rc: int) -> None:
    """One INFO line for the operator when a job's worker is gone: how it ended, how long it
    ran (a re-queued job says so: it runs again)."""
    ran = _seconds_between(rec.started_time, rec.finished_time or rec.updated_time)
    took = f" after {ran:.1f} s" if ran is not None else ""
    if rec.status is JobStatus.PENDING:
        log.info("job %s re-queued%s (worker exit code %s)", rec.id, took, rc)
    elif rec.status is JobStatus.FAILED:
        kind = rec.error_kind or "error"
        log.info("job %s failed (%s)%s: %s", rec.id, kind, took, rec.error_message or "")
    else:
        step = (rec.progress or {}).get("step")
        log.info("job %s %s%s at step %s", rec.id, rec.status.value, took, step)


def _age_seconds(created_time: str) -> float:
    created = datetime.fromisoformat(created_time)
    return (datetime.now(timezone.utc).replace(tzinfo=None) - created).total_seconds()


class Supervisor:
    def __init__(
        self,
        store: JobStore,
        launcher: Launcher,
        pool: ResourcePool,
        *,
        starvation_s: float = 600.0,
        kill_grace_s: float = 5.0,
        max_restarts: int = 1,
        scratch_root: Path | None = None,
        shutdown_grace_s: float = 30.0,
        log_retention_s: float | None = None,
    ) -> None:
        self.store = store
        self.scratch_root = scratch_root  # `_jobs`: per job, its scratch and its worker log
        self.shutdown_grace_s = shutdown_grace_s
        self.log_retention_s = log_retention_s  # None: keep job logs forever
        self._last_sweep: float | None = None
        self._grace = shutdown_grace_s
        self.launcher = launcher
        self.pool = pool
        self.starvation_s = starvation_s
        self.kill_grace_s = kill_grace_s
        self.max_restarts = max_restarts
        self._running: dict[str, Running] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._reasons_lock = threading.Lock()
        self._reasons: tuple[tuple, dict[str, str]] = ((), {})

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="sllm-supervisor", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float | None = None) -> None:
        """Stop the loop, then the workers: a clean shutdown, not a crash.

        Each running job is marked `clean_stop` first (so even a server killed during the wait
        re-queues it uncharged), then its worker gets SIGTERM: it saves a checkpoint at the next
        step boundary and exits. After `grace_s` (default `shutdown_grace_s`) the rest are
        killed. Jobs whose worker finished meanwhile complete; the others go back to `pending`
        without using up their crash re-queue, and resume from the checkpoint on the next start.

        The loop's thread does this itself before it ends: the workers it spawned get
        PR_SET_PDEATHSIG (SIGKILL) when the thread that forked them exits, not only the process.
        """
        self._grace = self.shutdown_grace_s if grace_s is None else grace_s
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=self._grace + max(self.kill_grace_s, 5.0) + 30)
        else:
            self._stop_workers(self._grace)

    def _stop_workers(self, grace: float) -> None:
        with self._lock:
            for job_id, run in self._running.items():
                if run.stop_reason is not None:
                    continue  # cancelled or timed out: already being stopped
                run.stop_reason = "shutdown"
                self.store.mark_clean_stop(
                    job_id,
                    "Server shutting down: the worker was asked to save a checkpoint and stop; "
                    "the job will resume on the next start.",
                )
                run.handle.terminate()
            self._wait_reaped(grace)
            for run in self._running.values():
                run.handle.kill()
            self._wait_reaped(max(self.kill_grace_s, 5.0))
            for job_id in self._running:  # still there: the next start re-queues them
                log.warning("worker of %s did not exit; it is left to the next start", job_id)

    def _wait_reaped(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            if not self._running or time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def wake(self) -> None:
        self._wake.set()

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # the loop must outlive any one bad pass
                log.exception("supervisor pass failed")
            self._wake.wait(timeout=self._next_wait())
        try:
            self._stop_workers(self._grace)  # see `stop`: before this thread ends
        except Exception:
            log.exception("stopping the workers failed")

    def _next_wait(self) -> float:
        now = time.monotonic()
        waits = [MAX_WAIT_S]
        with self._lock:
            for run in self._running.values():
                waits.append(run.deadline - now)
                if run.term_sent_at is not None:
                    waits.append(run.term_sent_at + self._stop_grace(run) - now)
        return max(0.01, min(waits))

    # --- recovery after a restart -------------------------------------------------------
    def recover(self) -> None:
        """Jobs found running: the last server stopped without re-queueing them. Kill leftover
        workers; a job marked `clean_stop` (its shutdown began cleanly) is re-queued uncharged,
        any other (a crash) is re-queued up to `max_restarts` times, then failed."""
        for rec in self.store.with_status(JobStatus.RUNNING):
            if kill_stale_worker(rec.worker_pid, rec.id):
                log.warning("killed leftover worker %s of %s", rec.worker_pid, rec.id)
            if rec.pause_requested:
                self.store.transition(
                    rec.id,
                    JobStatus.PAUSED,
                    message="Paused (the server stopped while the pause was under way); resume "
                    "it to run again from its last checkpoint.",
                    worker_pid=None,
                    progress_json=None,
                )
            elif rec.clean_stop:
                self.store.transition(
                    rec.id,
                    JobStatus.PENDING,
                    message="The server was stopped cleanly while the job ran; re-queued (a "
                    "clean stop does not count as a crash).",
                    worker_pid=None,
                    progress_json=None,
                )
            elif rec.crash_requeues < self.max_restarts:
                self.store.transition(
                    rec.id,
                    JobStatus.PENDING,
                    message="Server restarted while the job ran; re-queued.",
                    crash_requeues=rec.crash_requeues + 1,
                    worker_pid=None,
                    progress_json=None,
                )
            else:
                self.store.transition(
                    rec.id,
                    JobStatus.FAILED,
                    message="Server restarted while the job ran, and it was already re-queued "
                    f"{rec.crash_requeues} time(s) after a crash; giving up.",
                    error_kind=ErrorKind.SERVER_RESTART.value,
                )
                self.discard_scratch(rec.id)
        self.sweep_logs()

    # --- one pass -----------------------------------------------------------------------
    def tick(self) -> None:
        with self._lock:
            self._reap()
            self._enforce_stops()
            self._schedule()
        if self._last_sweep is None or time.monotonic() - self._last_sweep >= SWEEP_EVERY_S:
            self.sweep_logs()

    def _reap(self) -> None:
        for job_id, run in list(self._running.items()):
            rc = run.handle.poll()
            if rc is None:
                continue
            del self._running[job_id]
            self.pool.release(job_id)
            self._finish(run, rc)
            rec = self.store.get(job_id)
            if rec is None or rec.status in TERMINAL:
                self.discard_scratch(job_id)
            if rec is not None:
                _log_end(rec, rc)

    def discard_scratch(self, job_id: str) -> None:
        """A job that will not run again needs no checkpoints (it resumes only when re-queued),
        nor its datasets cache or temp files; its worker log stays until `sweep_logs` deletes
        it. Called for every way a job can end: its worker reaped, a restart or lost node once
        too often, cancelled while pending (by the service), never fitting."""
        if self.scratch_root is not None:
            for part in SCRATCH_PARTS:
                shutil.rmtree(self.scratch_root / job_id / part, ignore_errors=True)

    def sweep_logs(self) -> int:
        """Delete `_jobs/<id>/` of jobs that ended more than `log_retention_s` ago (and of
        directories no job owns any more, by age); returns how many went."""
        self._last_sweep = time.monotonic()
        if self.scratch_root is None or self.log_retention_s is None:
            return 0
        try:
            dirs = [d for d in self.scratch_root.iterdir() if d.is_dir()]
        except OSError:
            return 0
        ended = self.store.finished_times([d.name for d in dirs])
        cutoff = time.time() - self.log_retention_s
        removed = 0
        for d in dirs:
            if d.name in ended:
                finished = ended[d.name]
                if finished is None:
                    continue  # pending or running: its files are in use
                when = datetime.fromisoformat(finished).replace(tzinfo=timezone.utc).timestamp()
            else:
                try:  # no such job (a deleted database): go by the files' age
                    when = max(p.stat().st_mtime for p in [d, *d.iterdir()])
                except (OSError, ValueError):
                    continue
            if when <= cutoff:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed

    def _finish(self, run: Running, rc: int) -> None:
        rec = self.store.get(run.job_id)
        if rec is None or rec.status is not JobStatus.RUNNING:
            return  # cancelled or timed out: the status was already written
        if rc == 0 and rec.adapter_path:
            self.store.transition(run.job_id, JobStatus.COMPLETED, message="Job completed.")
            return
        step = (rec.progress or {}).get("step")
        at = f" at step {step}" if step else ""
        reported = rc != EXIT_STOPPED and rec.error_message and rec.error_kind in WORKER_REPORTED
        if run.stop_reason == "pause" and not reported:
            saved = "saved a checkpoint" if rc == EXIT_STOPPED else "was stopped"
            self.store.transition(
                rec.id,
                JobStatus.PAUSED,
                message=f"Paused{at}: the worker {saved}; resume the job to continue from its "
                "last checkpoint.",
                worker_pid=None,
            )
            return
        if run.stop_reason == "shutdown" and not reported:  # the shutdown stopped it; a real
            # failure the worker reported during the grace period (diverged, bad data) stands
            self.store.transition(
                rec.id,
                JobStatus.PENDING,
                message=f"Stopped{at} by a clean server shutdown; re-queued, it resumes from its "
                "last checkpoint on the next start (a clean stop does not count as a crash).",
                worker_pid=None,
                progress_json=None,
            )
            return
        if rc == EXIT_STOPPED:  # SIGTERM from elsewhere (a service manager stopping the whole
            # group before the server): it saved a checkpoint, so it just runs again from there
            self.store.transition(
                rec.id,
                JobStatus.PENDING,
                message=f"The worker was stopped{at} by a SIGTERM that did not come from the "
                "server (e.g. a service manager stopping every process); it saved a checkpoint "
                "and the job is re-queued (not counted as a crash).",
                worker_pid=None,
                progress_json=None,
            )
            return
        lost = getattr(run.handle, "node_lost", None)  # only cluster handles have it
        if lost:
            self._node_lost(rec, lost)
            return
        if rec.error_message and rec.error_kind in WORKER_REPORTED:
            kind, message = rec.error_kind, rec.error_message
        else:
            kind = ErrorKind.WORKER_CRASHED.value
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            message = f"The worker {how}; {log_hint(rec.id)}."
        last = run.handle.log_tail(20)
        if last:  # for the operator; the API answer stays one line
            log.warning("job %s failed: %s\nlast worker log lines:\n%s", rec.id, message, last)
        self.store.transition(
            run.job_id, JobStatus.FAILED, message=message, error_kind=kind, error_message=message
        )

    def _node_lost(self, rec: JobRecord, reason: str) -> None:
        """The node running the job died: re-queue it, as a server restart would, or fail it."""
        kind = ErrorKind.NODE_LOST.value
        if rec.crash_requeues < self.max_restarts:
            self.store.transition(
                rec.id,
                JobStatus.PENDING,
                message=f"{reason} Re-queued.",
                error_kind=kind,
                crash_requeues=rec.crash_requeues + 1,
                worker_pid=None,
                progress_json=None,
            )
            return
        message = (
            f"{reason} The job was already re-queued {rec.crash_requeues} time(s) after a crash; "
            "giving up."
        )
        self.store.transition(
            rec.id, JobStatus.FAILED, message=message, error_kind=kind, error_message=message
        )

    def _enforce_stops(self) -> None:
        now = time.monotonic()
        ids = list(self._running)
        statuses = self.store.statuses(ids)
        pauses = self.store.pause_requests(ids)
        for job_id in ids:
            run = self._running[job_id]
            if run.stop_reason is None:
                if statuses.get(job_id) is JobStatus.CANCELLED:
                    run.stop_reason = "cancel"
                elif job_id in pauses:
                    run.stop_reason = "pause"
                elif now >= run.deadline:
                    run.stop_reason = "timeout"
                    self.store.transition(
                        job_id,
                        JobStatus.FAILED,
                        message=f"Job exceeded its timeout of {run.timeout:g} s and was stopped.",
                        error_kind=ErrorKind.TIMEOUT.value,
                    )
            if run.stop_reason is None:
                continue
            if run.term_sent_at is None:
                run.handle.terminate()
                run.term_sent_at = now
            elif not run.kill_sent and now - run.term_sent_at >= self._stop_grace(run):
                run.handle.kill()
                run.kill_sent = True

    def _stop_grace(self, run: Running) -> float:
        """A paused worker gets the shutdown's grace to reach a step boundary and checkpoint; a
        cancelled or timed-out one only `kill_grace_s` (nothing of it is kept)."""
        return self.shutdown_grace_s if run.stop_reason == "pause" else self.kill_grace_s

    def _schedule(self) -> None:
        # Every job needs at least one CPU: with none free nothing can start, so the queue is not
        # read at all (a pass per submission over a long queue would otherwise cost O(queue)).
        # Jobs that can never fit are still failed on the first pass that has room.
        if self.pool.free()[0] < 1:
            return
        for job in self.store.pending_in_order():
            if not self.pool.fits_ever(job.num_cpus, job.num_gpus):
                self.store.transition(
                    job.id,
                    JobStatus.FAILED,
                    message=f"Job needs {job.num_cpus} CPUs and {job.num_gpus} GPUs, more than the "
                    f"capacity ({self.pool.total_cpus} CPUs, {self.pool.total_gpus} GPUs).",
                    error_kind=ErrorKind.UNSCHEDULABLE.value,
                )
                log.info("job %s failed: it can never fit this server's capacity", job.id)
                self.discard_scratch(job.id)  # a re-queued job may have checkpoints
                continue
            alloc = self.pool.try_acquire(job.id, job.num_cpus, job.num_gpus)
            if alloc is None:
                if _age_seconds(job.created_time) >= self.starvation_s:
                    return  # reserve: nothing behind a starving job may take its resources
                continue
            rec = self.store.get(job.id)
            if rec is None or not self._launch(rec, alloc):  # gone, or no longer pending (CAS)
                self.pool.release(job.id)
            if self.pool.free()[0] < 1:
                return

    def pending_reasons(self, records: list[JobRecord]) -> dict[str, str]:
        """`pending_reason` of each of `records` (pending ones), cached until the queue or the
        pool changes (or a second passes: a job may start starving), so a pending job polled by
        many clients costs a dictionary lookup, not a look at the queue per poll."""
        key = (
            self.store.write_count,
            self.pool.generation,
            self.starvation_s,
            int(time.monotonic() / REASON_TTL_S),
        )
        with self._reasons_lock:
            if self._reasons[0] != key:
                self._reasons = (key, {})
            cached = self._reasons[1]
            missing = [rec for rec in records if rec.id not in cached]
        if missing:
            fresh = self._compute_reasons(missing)
            with self._reasons_lock:
                if self._reasons[0] == key:
                    self._reasons[1].update(fresh)
            cached = {**cached, **fresh}
        return {rec.id: cached[rec.id] for rec in records if rec.id in cached}

    def _compute_reasons(self, records: list[JobRecord]) -> dict[str, str]:
        """A few jobs are looked up on the index; a page of many reads the queue once."""
        if len(records) <= 8:
            return {rec.id: self.pending_reason(rec) for rec in records}
        wanted = {rec.id for rec in records}
        free_cpus, free_gpu_ids = self.pool.free()
        reasons: dict[str, str] = {}
        starving: QueuedJob | None = None
        for ahead, job in enumerate(self.store.pending_in_order()):
            if job.id in wanted:
                reasons[job.id] = self._reason(job, ahead, free_cpus, len(free_gpu_ids), starving)
            fits = job.num_cpus <= free_cpus and job.num_gpus <= len(free_gpu_ids)
            if (
                starving is None
                and not fits
                and _age_seconds(job.created_time) >= self.starvation_s
            ):
                starving = job
        return reasons

    def pending_reason(self, rec: JobRecord) -> str:
        """Why a pending job waits, by the rules `_schedule` applies: what it needs against what
        is free now, how many jobs are ahead of it in the queue, and whether a starving job
        ahead (waited over `starvation_s`, does not fit) reserves the next free resources."""
        free_cpus, free_gpu_ids = self.pool.free()
        ahead, heads = self.store.queue_ahead(rec.priority, rec.seq)
        starving = None
        for job in heads:
            fits = job.num_cpus <= free_cpus and job.num_gpus <= len(free_gpu_ids)
            if not fits and _age_seconds(job.created_time) >= self.starvation_s:
                starving = job
                break
        return self._reason(rec, ahead, free_cpus, len(free_gpu_ids), starving)

    def _reason(self, job, ahead: int, free_cpus: int, free_gpus: int, starving) -> str:
        if not self.pool.fits_ever(job.num_cpus, job.num_gpus):
            return (
                f"needs {job.num_cpus} CPUs and {job.num_gpus} GPUs, more than the capacity "
                f"({self.pool.total_cpus} CPUs, {self.pool.total_gpus} GPUs); it fails on the "
                "next scheduling pass"
            )
        reason = wait_reason(job.num_cpus, job.num_gpus, free_cpus, free_gpus, ahead)
        if starving is not None:
            reason += (
                f"; {starving.id} ahead has waited over {self.starvation_s:g} s and reserves the "
                "next free resources"
            )
        return reason

    def _launch(self, rec: JobRecord, alloc) -> bool:
        if not self.store.transition(
            rec.id,
            JobStatus.RUNNING,
            message=f"Job started with {alloc.cpus} CPUs and GPUs {list(alloc.gpu_ids)}.",
            attempts=rec.attempts + 1,
            resources_json=json.dumps(alloc.as_dict()),
        ):
            return False
        try:
            handle = self.launcher.launch(rec.id, alloc, on_exit=self.wake)
        except Exception as exc:
            log.exception("could not launch %s", rec.id)
            self.store.transition(
                rec.id,
                JobStatus.FAILED,
                message=f"Could not start the worker: {type(exc).__name__}: {exc}",
                error_kind=ErrorKind.WORKER_CRASHED.value,
            )
            return False
        self.store.set_worker(rec.id, handle.pid, handle.host)
        log.info(
            "job %s started: %d CPUs, GPUs %s, worker pid %s, after %.1f s in the queue",
            rec.id,
            alloc.cpus,
            list(alloc.gpu_ids),
            handle.pid,
            _age_seconds(rec.created_time),
        )
        self._running[rec.id] = Running(
            job_id=rec.id,
            handle=handle,
            deadline=time.monotonic() + rec.timeout,
            timeout=rec.timeout,
        )
        return True
