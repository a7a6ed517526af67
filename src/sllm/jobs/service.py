"""The fine-tuning job service: plain Python that the HTTP layer (and tests) call directly."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from sllm.config import Settings
from sllm.errors import ConflictError, InvalidRequestError, NotFoundError
from sllm.finetune.base import ValidationContext, get_backend
from sllm.jobs import logs as worker_logs
from sllm.jobs.db import FileGone, JobRecord, JobStore, OutputDirInUse, output_key
from sllm.jobs.models import (
    FineTuningJob,
    FineTuningJobRequest,
    JobError,
    JobEvent,
    JobEventList,
    JobList,
    JobLogs,
    JobProgress,
    JobStatusBody,
)
from sllm.jobs.resources import ResourcePool, require_fit
from sllm.jobs.states import ACTIVE, TERMINAL, JobStatus
from sllm.jobs.supervisor import Supervisor
from sllm.paths import jobs_dir

log = logging.getLogger(__name__)


def validation_message(exc: ValidationError, prefix: str = "") -> tuple[str, str | None]:
    """One readable sentence (and the field path) from pydantic's first error."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    param = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or None)
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    return (f"`{param}`: {msg}." if param else f"{msg}."), param


def to_wire(rec: JobRecord, pending_reason: str | None = None) -> FineTuningJob:
    error = (
        JobError(message=rec.error_message, kind=rec.error_kind or "error")
        if rec.error_message and rec.status is JobStatus.FAILED
        else None
    )
    return FineTuningJob(
        id=rec.id,
        status=JobStatusBody(
            config=rec.config,
            status=rec.status,
            created_time=rec.created_time,
            updated_time=rec.updated_time,
            priority=rec.priority,
            started_time=rec.started_time,
            finished_time=rec.finished_time,
            error=error,
            progress=JobProgress(**rec.progress) if rec.progress else None,
            adapter_path=rec.adapter_path,
            pending_reason=pending_reason if rec.status is JobStatus.PENDING else None,
        ),
    )


def _output_conflict(busy: OutputDirInUse, mine: str | None) -> ConflictError:
    param = "backend_config.output_dir"
    exact = mine is None or output_key(busy.output_dir) == output_key(mine)
    same = "the same" if exact else "an overlapping"
    return ConflictError(
        f"`{param}`={mine!r}: job {busy.job_id} ({busy.status.value}) writes {same} adapter "
        f"directory ({busy.output_dir!r}); two jobs would overwrite each other's adapter. Wait "
        f"for {busy.job_id} to finish, cancel it, or choose another output_dir.",
        param=param,
    )


class JobService:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        pool: ResourcePool,
        supervisor: Supervisor,
        files: Any = None,  # sllm.files.store.FileStore: uploaded data a job may train on
    ) -> None:
        self.settings = settings
        self.store = store
        self.pool = pool
        self.supervisor = supervisor
        self.files = files

    def submit(
        self,
        payload: dict[str, Any] | FineTuningJobRequest,
        *,
        openai: dict[str, Any] | None = None,
    ) -> str:
        """Validate everything a run would reject, then record the job as pending. `openai`:
        what the OpenAI surface was asked beyond the config (suffix, metadata, file ids)."""
        if isinstance(payload, FineTuningJobRequest):
            req = payload
        else:
            try:
                req = FineTuningJobRequest.model_validate(payload)
            except ValidationError as exc:
                message, param = validation_message(exc)
                raise InvalidRequestError(message, param=param) from None
        from sllm.store import has_model

        if not has_model(self.settings.storage_path, req.model):
            raise InvalidRequestError(
                f"Model {req.model!r} is not in the store at {self.settings.storage_path}; save "
                f"it first: sllm-store save --model {req.model} --backend transformers",
                param="model",
            )
        require_fit(self.pool, req.num_cpus, req.num_gpus, "The job")
        backend = get_backend(req.ft_backend)
        ctx = ValidationContext(
            storage_path=self.settings.storage_path,
            data_roots=self.settings.resolved_data_roots(),
            model=req.model,
            num_cpus=req.num_cpus,
        )
        normalised = backend.validate(dict(req.backend_config), ctx)
        config = req.model_dump(exclude={"priority"})
        from sllm.files.store import file_ids

        try:
            rec = self.store.create(
                model=req.model,
                ft_backend=req.ft_backend,
                num_cpus=req.num_cpus,
                num_gpus=req.num_gpus,
                timeout=float(req.timeout),
                priority=req.priority,
                config=config,
                backend_config=normalised,
                exclusive_output=True,
                created=ctx.created_note,
                files=file_ids(normalised),
                openai=openai,
            )
        except OutputDirInUse as busy:
            raise _output_conflict(busy, normalised.get("output_dir")) from None
        except FileGone as gone:
            raise InvalidRequestError(
                f"The uploaded file {gone.file_id} was deleted while the job was submitted.",
                param="backend_config.dataset_config.file_id",
            ) from None
        log.info(
            "job %s submitted: model %s, %d CPUs, %d GPUs, priority %d",
            rec.id,
            req.model,
            req.num_cpus,
            req.num_gpus,
            req.priority,
        )
        self.supervisor.wake()
        return rec.id

    def record(self, job_id: str) -> JobRecord:
        """The stored job (404 when unknown), for the other wire shapes (the OpenAI surface)."""
        return self._get(job_id)

    def _get(self, job_id: str) -> JobRecord:
        rec = self.store.get(job_id)
        if rec is None:
            raise NotFoundError(f"No fine-tuning job with id {job_id!r}.", param="job_id")
        return rec

    def get(self, job_id: str) -> FineTuningJob:
        rec = self._get(job_id)
        return to_wire(rec, self._reasons([rec]).get(rec.id))

    def _reasons(self, records: list[JobRecord]) -> dict[str, str]:
        """Why the pending ones of `records` wait."""
        pending = [r for r in records if r.status is JobStatus.PENDING]
        return self.supervisor.pending_reasons(pending) if pending else {}

    def list(self, limit: int = 20, after: str | None = None, status: str | None = None) -> JobList:
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("`limit` must be between 1 and 1000.", param="limit")
        try:
            wanted = JobStatus(status) if status else None
        except ValueError:
            allowed = ", ".join(s.value for s in JobStatus)
            raise InvalidRequestError(
                f"Unknown status {status!r}; use one of {allowed}.", param="status"
            ) from None
        if after is not None and not self.store.exists(after):
            raise InvalidRequestError(f"`after`: no job with id {after!r}.", param="after")
        records, more = self.store.list(limit=limit, after=after, status=wanted)
        reasons = self._reasons(records)
        return JobList(data=[to_wire(r, reasons.get(r.id)) for r in records], has_more=more)

    def events(self, job_id: str, limit: int = 100, after: int | None = None) -> JobEventList:
        self._get(job_id)
        if not 1 <= limit <= 10000:
            raise InvalidRequestError("`limit` must be between 1 and 10000.", param="limit")
        rows, more = self.store.events(job_id, limit=limit, after=after)
        return JobEventList(data=[JobEvent(**r) for r in rows], has_more=more)

    def logs(
        self,
        job_id: str,
        tail: int | None = None,
        offset: int | None = None,
        limit: int | None = None,
    ) -> JobLogs:
        """The worker's log: its last `tail` lines (default), or `limit` bytes from `offset`."""
        self._get(job_id)
        path = jobs_dir(self.settings.storage_path) / job_id / "worker.log"
        if tail is not None and (offset is not None or limit is not None):
            raise InvalidRequestError(
                "`tail` reads the end of the log; `offset`/`limit` page through it: send one or "
                "the other.",
                param="tail",
            )
        if offset is None and limit is None:
            lines = worker_logs.DEFAULT_TAIL_LINES if tail is None else tail
            _check_range("tail", lines, 1, worker_logs.MAX_TAIL_LINES)
            page = worker_logs.read_tail(path, lines)
        else:
            offset = 0 if offset is None else offset
            limit = worker_logs.DEFAULT_LIMIT_BYTES if limit is None else limit
            _check_range("offset", offset, 0, 2**63 - 1)
            _check_range("limit", limit, 1, worker_logs.MAX_LIMIT_BYTES)
            page = worker_logs.read_range(path, offset, limit)
        return JobLogs(
            job_id=job_id,
            offset=page.offset,
            next_offset=page.next_offset,
            size=page.size,
            text=page.data.decode("utf-8", "replace"),
        )

    def cancel(self, job_id: str) -> FineTuningJob:
        """Pending jobs end at once; running ones are marked and their worker group killed."""
        rec = self._get(job_id)
        if rec.status is JobStatus.CANCELLED:
            return to_wire(rec)
        if rec.status in TERMINAL:
            raise ConflictError(
                f"Job {job_id} already {rec.status.value}; only pending or running jobs can be "
                "cancelled.",
                param="job_id",
            )
        if not self.store.transition(job_id, JobStatus.CANCELLED, message="Cancelled by user."):
            return self.cancel(job_id)  # it moved under us: answer for its new state
        if rec.status in (JobStatus.PENDING, JobStatus.PAUSED):  # no worker to reap: drop a
            self.supervisor.discard_scratch(job_id)  # re-queued or paused job's checkpoints
            log.info("job %s cancelled while %s", job_id, rec.status.value)
        self.supervisor.wake()
        return to_wire(self._get(job_id))

    def pause(self, job_id: str) -> FineTuningJob:
        """A pending job is paused at once; a running one checkpoints at its next step boundary
        and stops (as on a clean shutdown), then it is `paused`. Paused jobs keep their
        checkpoints, files and output dir; `resume` queues them again."""
        rec = self._get(job_id)
        if rec.status is JobStatus.PAUSED or (
            rec.status is JobStatus.RUNNING and rec.pause_requested
        ):
            return to_wire(rec)
        if rec.status is JobStatus.PENDING:
            if not self.store.transition(job_id, JobStatus.PAUSED, message="Paused by user."):
                return self.pause(job_id)
        elif rec.status is JobStatus.RUNNING:
            if not self.store.request_pause(job_id):
                return self.pause(job_id)
            self.supervisor.wake()
        else:
            raise ConflictError(
                f"Job {job_id} already {rec.status.value}; only pending or running jobs can be "
                "paused.",
                param="job_id",
            )
        return to_wire(self._get(job_id))

    def resume(self, job_id: str) -> FineTuningJob:
        """A paused job goes back to the queue; it continues from its checkpoint."""
        rec = self._get(job_id)
        if rec.status is not JobStatus.PAUSED:
            if rec.status in ACTIVE and not rec.pause_requested:
                return to_wire(rec)  # already queued or running: nothing to resume
            raise ConflictError(
                f"Job {job_id} is {rec.status.value}"
                f"{' (pausing)' if rec.pause_requested and rec.status in ACTIVE else ''}; only a "
                "paused job can be resumed.",
                param="job_id",
            )
        if not self.store.transition(
            job_id, JobStatus.PENDING, message="Resumed by user; queued.", progress_json=None
        ):
            return self.resume(job_id)
        self.supervisor.wake()
        return to_wire(self._get(job_id))


def _check_range(param: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidRequestError(
            f"`{param}` must be between {low} and {high}, got {value}.", param=param
        )
