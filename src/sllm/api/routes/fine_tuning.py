"""Fine-tuning routes, exactly as the seed documents them, under both spellings.

The read routes are `async`: they are one indexed SQLite read each, so they run on the event loop
instead of taking a hop through the threadpool (which, with 100 clients polling on two cores, was
most of their latency), and they answer with JSON serialised once by pydantic (`_json`), skipping
FastAPI's re-validation of a model the service has just built. Submit and cancel stay sync: a
submit validates the config with transformers/peft, which would block the loop. (The server
imports those at startup and then freezes its objects for the garbage collector: see
`sllm.api.app`; the first submission freezes again what it left alive, e.g. the worker launcher's
and the routes' lazily built state.)
"""

from __future__ import annotations

import gc
import json

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel

from sllm.api.errors import error_responses
from sllm.jobs.models import (
    INT64_MAX,
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


def _json(body: BaseModel) -> Response:
    try:
        return Response(body.model_dump_json(), media_type="application/json")
    except ValueError:  # a lone surrogate stored before the edge refused them: send it escaped
        text = json.dumps(body.model_dump(mode="python"), ensure_ascii=True)
        return Response(text, media_type="application/json")


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


@_route("POST", "/jobs", response_model=SubmitResponse, responses=error_responses(409, 413))
def submit_job(body: FineTuningJobRequest, request: Request) -> SubmitResponse:
    """Submit a fine-tuning job; it starts when its CPUs and GPUs are free."""
    try:
        return SubmitResponse(job_id=_jobs(request).submit(body))
    finally:
        _freeze_once()


_frozen = False


def _freeze_once() -> None:
    global _frozen
    if not _frozen:
        _frozen = True
        gc.freeze()


@_route("GET", "/jobs", response_model=JobList, responses=error_responses())
async def list_jobs(
    request: Request,
    limit: int = Query(20, ge=-INT64_MAX - 1, le=INT64_MAX),
    after: str | None = Query(None),
    status: str | None = Query(None),
) -> Response:
    """List jobs, newest first; page with `after` (last id seen), filter by `status`."""
    return _json(_jobs(request).list(limit=limit, after=after, status=status))


@_route(
    "GET",
    "/jobs/{fine_tuning_job_id}",
    response_model=FineTuningJob,
    responses=error_responses(404),
)
async def get_job(fine_tuning_job_id: str, request: Request) -> Response:
    """A job's configuration, status, progress, error and adapter path."""
    return _json(_jobs(request).get(fine_tuning_job_id))


@_route(
    "GET",
    "/jobs/{fine_tuning_job_id}/events",
    response_model=JobEventList,
    responses=error_responses(404),
)
async def job_events(
    fine_tuning_job_id: str,
    request: Request,
    limit: int = Query(100, ge=-INT64_MAX - 1, le=INT64_MAX),
    after: int | None = Query(None, ge=-INT64_MAX - 1, le=INT64_MAX),
) -> Response:
    """State changes, loss points and errors of a job, oldest first."""
    return _json(_jobs(request).events(fine_tuning_job_id, limit=limit, after=after))


@_route(
    "POST",
    "/jobs/{fine_tuning_job_id}/cancel",
    response_model=FineTuningJob,
    responses=error_responses(404, 409),
)
def cancel_job(fine_tuning_job_id: str, request: Request) -> FineTuningJob:
    """Cancel a pending or running job; its worker is killed and its resources freed."""
    return _jobs(request).cancel(fine_tuning_job_id)
