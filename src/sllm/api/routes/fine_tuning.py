"""Fine-tuning routes, exactly as the seed documents them, under both spellings."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from sllm.jobs.models import (
    FineTuningJob,
    FineTuningJobRequest,
    JobEventList,
    JobList,
    SubmitResponse,
)
from sllm.jobs.service import JobService

router = APIRouter(tags=["fine-tuning"])


def _jobs(request: Request) -> JobService:
    return request.app.state.services.jobs


def _both(path: str) -> list[str]:
    return [f"/v1/fine-tuning{path}", f"/v1/fine_tuning{path}"]


def _route(method: str, path: str, **kwargs):
    """Register one handler under both spellings (`fine-tuning`, `fine_tuning`)."""

    def decorate(fn):
        for spelling, p in zip(("dash", "underscore"), _both(path), strict=True):
            op = f"{fn.__name__}_{spelling}"
            router.add_api_route(p, fn, methods=[method], operation_id=op, **kwargs)
        return fn

    return decorate


@_route("POST", "/jobs", response_model=SubmitResponse)
def submit_job(body: FineTuningJobRequest, request: Request) -> SubmitResponse:
    """Submit a fine-tuning job; it starts when its CPUs and GPUs are free."""
    return SubmitResponse(job_id=_jobs(request).submit(body))


@_route("GET", "/jobs", response_model=JobList)
def list_jobs(
    request: Request,
    limit: int = Query(20),
    after: str | None = Query(None),
    status: str | None = Query(None),
) -> JobList:
    """List jobs, newest first; page with `after` (last id seen), filter by `status`."""
    return _jobs(request).list(limit=limit, after=after, status=status)


@_route("GET", "/jobs/{fine_tuning_job_id}", response_model=FineTuningJob)
def get_job(fine_tuning_job_id: str, request: Request) -> FineTuningJob:
    """A job's configuration, status, progress, error and adapter path."""
    return _jobs(request).get(fine_tuning_job_id)


@_route("GET", "/jobs/{fine_tuning_job_id}/events", response_model=JobEventList)
def job_events(
    fine_tuning_job_id: str,
    request: Request,
    limit: int = Query(100),
    after: int | None = Query(None),
) -> JobEventList:
    """State changes, loss points and errors of a job, oldest first."""
    return _jobs(request).events(fine_tuning_job_id, limit=limit, after=after)


@_route("POST", "/jobs/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
def cancel_job(fine_tuning_job_id: str, request: Request) -> FineTuningJob:
    """Cancel a pending or running job; its worker is killed and its resources freed."""
    return _jobs(request).cancel(fine_tuning_job_id)
