"""Read-only views of what the server holds: the model store and the CPU/GPU pool.

GET /v1/store/models   models saved with `sllm-store save` (what a job or deployment can use)
GET /v1/capacity       CPUs and GPUs in the pool, and which job or instance holds which

Both are small reads the console polls; the store listing reads each model's manifest only.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from sllm.api.errors import error_responses
from sllm.store.catalog import list_models

router = APIRouter(tags=["server"])


class StoredModel(BaseModel):
    name: str = Field(description="The name a job's or deployment's `model` uses.")
    backend: str
    size_bytes: int | None = None
    parameter_count: int | None = None
    dtype: str | None = None
    created_time: str | None = None


class StoredModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[StoredModel]


class Holder(BaseModel):
    owner: str = Field(description="A job id, or `instance:<model>:<n>` for an inference instance.")
    kind: Literal["job", "instance"]
    cpus: int
    gpu_ids: list[int]
    node: str | None = Field(None, description="The Ray node, on a cluster.")


class Capacity(BaseModel):
    object: Literal["capacity"] = "capacity"
    total_cpus: int
    total_gpus: int
    free_cpus: int
    free_gpus: int
    holders: list[Holder] = Field(description="Who holds what, jobs first.")


@router.get("/v1/store/models", response_model=StoredModelList, responses=error_responses())
def stored_models(request: Request) -> StoredModelList:
    """Models in the store (transformers backend), sorted by name."""
    storage = request.app.state.services.settings.storage_path
    return StoredModelList(data=[StoredModel(**m) for m in list_models(storage)])


@router.get("/v1/capacity", response_model=Capacity, responses=error_responses())
async def capacity(request: Request) -> Capacity:
    """CPUs and GPUs in the pool, how many are free, and the job or instance holding each."""
    pool = request.app.state.services.pool
    free_cpus, free_gpus = pool.free()
    holders = [
        Holder(
            owner=owner,
            kind="instance" if owner.startswith("instance:") else "job",
            cpus=alloc.cpus,
            gpu_ids=list(alloc.gpu_ids),
            node=alloc.node,
        )
        for owner, alloc in pool.held().items()
    ]
    holders.sort(key=lambda h: (h.kind != "job", h.owner))
    return Capacity(
        total_cpus=pool.total_cpus,
        total_gpus=pool.total_gpus,
        free_cpus=free_cpus,
        free_gpus=len(free_gpus),
        holders=holders,
    )
