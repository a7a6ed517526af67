"""Serving routes: OpenAI-compatible inference, the model list, and deployments.

POST   /v1/chat/completions               chat (messages); `stream: true` for SSE
POST   /v1/completions                    text completion (prompt); `stream: true` for SSE
GET    /v1/models                         deployed models, their adapters, and fine-tuned
                                          models of completed jobs (adapters have `parent`)
GET    /v1/models/{name}                  one of them
DELETE /v1/models/{name}                  a fine-tuned model (its adapter leaves the store)
POST   /v1/deployments                    deploy a model, or add/replace its adapters
GET    /v1/deployments                    every deployment: adapters, instances, state
GET    /v1/deployments/{model}            one deployment
DELETE /v1/deployments/{model}            the whole deployment (instances stop)
DELETE /v1/deployments/{model}?lora_adapters=a,b   only those adapters
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from sllm.api.errors import error_responses
from sllm.serve.completions import CompletionService
from sllm.serve.deployments import DeploymentService
from sllm.serve.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DeleteResponse,
    DeploymentList,
    DeploymentStatus,
    DeployRequest,
    ModelCard,
    ModelDeleted,
    ModelList,
)

router = APIRouter(tags=["serving"])
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _deployments(request: Request) -> DeploymentService:
    return request.app.state.services.deployments


def _completions(request: Request) -> CompletionService:
    return CompletionService(_deployments(request))


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=error_responses(404, 413, 429, 503),
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Chat with a deployed model, one of its adapters, or a fine-tuned model (no deploy)."""
    service = _completions(request)
    if body.stream:
        lines = await service.chat_stream(body)
        return StreamingResponse(lines, media_type="text/event-stream", headers=SSE_HEADERS)
    return await service.chat(body)


@router.post(
    "/v1/completions", response_model=Completion, responses=error_responses(404, 413, 429, 503)
)
async def completions(body: CompletionRequest, request: Request):
    """Continue a prompt with a deployed model or one of its adapters."""
    service = _completions(request)
    if body.stream:
        lines = await service.complete_stream(body)
        return StreamingResponse(lines, media_type="text/event-stream", headers=SSE_HEADERS)
    return await service.complete(body)


@router.get("/v1/models", response_model=ModelList, responses=error_responses())
def list_models(request: Request) -> ModelList:
    """Deployed models, their adapters and fine-tuned models (`parent`: the base model)."""
    return _deployments(request).list_models()


@router.get("/v1/models/{name:path}", response_model=ModelCard, responses=error_responses(404))
def get_model(name: str, request: Request) -> ModelCard:
    """One model of the list (a deployed model, an adapter, or a fine-tuned model)."""
    return _deployments(request).get_model(name)


@router.delete(
    "/v1/models/{name:path}", response_model=ModelDeleted, responses=error_responses(404, 409)
)
def delete_model(name: str, request: Request) -> ModelDeleted:
    """Delete a fine-tuned model (`ft:...`): its adapter leaves the store and every instance."""
    return _deployments(request).delete_model(name)


@router.post(
    "/v1/deployments", response_model=DeploymentStatus, responses=error_responses(404, 409, 413)
)
def deploy(body: DeployRequest, request: Request) -> DeploymentStatus:
    """Deploy a model; deploying again updates it and adds or replaces adapters in place."""
    return _deployments(request).deploy(body)


@router.get("/v1/deployments", response_model=DeploymentList, responses=error_responses())
def list_deployments(request: Request) -> DeploymentList:
    """Every deployment with its adapters, instances and state (cold, starting, warm)."""
    return _deployments(request).status()


@router.get(
    "/v1/deployments/{model:path}", response_model=DeploymentStatus, responses=error_responses(404)
)
def get_deployment(model: str, request: Request) -> DeploymentStatus:
    """One deployment's adapters, instances and state."""
    return _deployments(request).status(model).data[0]


@router.delete(
    "/v1/deployments/{model:path}", response_model=DeleteResponse, responses=error_responses(404)
)
def delete_deployment(
    model: str,
    request: Request,
    lora_adapters: list[str] | None = Query(None, description="Only these (comma-separated)."),
) -> DeleteResponse:
    """Delete a deployment, or with `lora_adapters` only those adapters."""
    names = [n for raw in lora_adapters or [] for n in raw.replace(",", " ").split() if n]
    return _deployments(request).delete(model, names or None)
