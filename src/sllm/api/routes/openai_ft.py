"""The OpenAI-shaped surface under `/openai/v1`, so `OpenAI(base_url=".../openai/v1")` works
unchanged: fine-tuning jobs in OpenAI's shapes (this module), files (`files.py`, on both
surfaces), and chat, completions and models (the `/v1` serving handlers, mirrored here).

POST /openai/v1/fine_tuning/jobs                     create (OpenAI's body)
GET  /openai/v1/fine_tuning/jobs                     list (`after`, `limit`)
GET  /openai/v1/fine_tuning/jobs/{id}                retrieve
POST /openai/v1/fine_tuning/jobs/{id}/cancel|pause|resume
GET  /openai/v1/fine_tuning/jobs/{id}/events         newest first (`after`, `limit`)
GET  /openai/v1/fine_tuning/jobs/{id}/checkpoints    epoch checkpoints, newest first
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.routing import APIRoute

from sllm.api.errors import error_responses
from sllm.jobs.models import INT64_MAX
from sllm.openai.protocol import (
    CreateJobRequest,
    OpenAICheckpointList,
    OpenAIEventList,
    OpenAIJob,
    OpenAIJobList,
)
from sllm.openai.service import OpenAIFineTuning

PREFIX = "/openai/v1"
JOBS = f"{PREFIX}/fine_tuning/jobs"
MIRRORED = ("/v1/chat/", "/v1/completions", "/v1/models")  # serving paths also under /openai
router = APIRouter(tags=["openai"])
_LIMIT = Query(20, ge=-INT64_MAX - 1, le=INT64_MAX)


def _service(request: Request) -> OpenAIFineTuning:
    services = request.app.state.services
    return OpenAIFineTuning(services.settings, services.jobs, services.files)


@router.post(JOBS, response_model=OpenAIJob, responses=error_responses(409, 413))
def create_job(body: CreateJobRequest, request: Request) -> OpenAIJob:
    """Create a LoRA fine-tuning job from OpenAI's request body."""
    return _service(request).create(body)


@router.get(JOBS, response_model=OpenAIJobList, responses=error_responses())
def list_jobs(request: Request, after: str | None = Query(None), limit: int = _LIMIT):
    """Jobs, newest first; page with `after` (the last id seen); `metadata[KEY]=VALUE` keeps
    the jobs created with that metadata."""
    metadata = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.multi_items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    return _service(request).list(after=after, limit=limit, metadata=metadata or None)


@router.get(
    JOBS + "/{fine_tuning_job_id}", response_model=OpenAIJob, responses=error_responses(404)
)
def retrieve_job(fine_tuning_job_id: str, request: Request) -> OpenAIJob:
    """One job in OpenAI's shape."""
    return _service(request).retrieve(fine_tuning_job_id)


@router.post(
    JOBS + "/{fine_tuning_job_id}/cancel",
    response_model=OpenAIJob,
    responses=error_responses(404, 409),
)
def cancel_job(fine_tuning_job_id: str, request: Request) -> OpenAIJob:
    """Cancel a queued, running or paused job."""
    return _service(request).cancel(fine_tuning_job_id)


@router.post(
    JOBS + "/{fine_tuning_job_id}/pause",
    response_model=OpenAIJob,
    responses=error_responses(404, 409),
)
def pause_job(fine_tuning_job_id: str, request: Request) -> OpenAIJob:
    """Pause: a running job checkpoints at its next step boundary, then it is `paused`."""
    return _service(request).pause(fine_tuning_job_id)


@router.post(
    JOBS + "/{fine_tuning_job_id}/resume",
    response_model=OpenAIJob,
    responses=error_responses(404, 409),
)
def resume_job(fine_tuning_job_id: str, request: Request) -> OpenAIJob:
    """Queue a paused job again; it continues from its checkpoint."""
    return _service(request).resume(fine_tuning_job_id)


@router.get(
    JOBS + "/{fine_tuning_job_id}/events",
    response_model=OpenAIEventList,
    responses=error_responses(404),
)
def job_events(
    fine_tuning_job_id: str,
    request: Request,
    after: str | None = Query(None),
    limit: int = _LIMIT,
) -> OpenAIEventList:
    """Status changes, messages and per-step metrics, newest first."""
    return _service(request).events(fine_tuning_job_id, after=after, limit=limit)


@router.get(
    JOBS + "/{fine_tuning_job_id}/checkpoints",
    response_model=OpenAICheckpointList,
    responses=error_responses(404),
)
def job_checkpoints(
    fine_tuning_job_id: str,
    request: Request,
    after: str | None = Query(None),
    limit: int = Query(10, ge=-INT64_MAX - 1, le=INT64_MAX),
) -> OpenAICheckpointList:
    """The last epochs' checkpoints and the final one, newest first, each with its metrics."""
    return _service(request).checkpoints(fine_tuning_job_id, after=after, limit=limit)


def serving_mirror(serving: APIRouter) -> APIRouter:
    """The `/v1` chat, completions and models routes again under `/openai/v1`: the same
    handlers, so both surfaces answer the same way (routes added to `serving` later are
    mirrored too, as long as their path starts with one of `MIRRORED`)."""
    mirror = APIRouter(tags=["openai"])
    for route in serving.routes:
        if not isinstance(route, APIRoute) or not route.path.startswith(MIRRORED):
            continue
        mirror.add_api_route(
            "/openai" + route.path,
            route.endpoint,
            methods=sorted(route.methods),
            response_model=route.response_model,
            responses=route.responses,
            operation_id=f"{route.unique_id}_openai",
            summary=route.summary,
            description=route.description,
        )
    return mirror
