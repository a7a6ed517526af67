"""Read-only views the console shows: the model store, the CPU/GPU pool, a job's adapter files.

GET /v1/store/models                         models saved with `sllm-store save`
GET /v1/capacity                             CPUs and GPUs in the pool, and who holds which
GET /v1/fine_tuning/jobs/{id}/adapter        the saved adapter's file names and sizes
    (and /v1/fine-tuning/..., like every fine-tuning route)

All are small reads: the store listing reads each model's manifest only.
"""

from __future__ import annotations

import os
from pathlib import Path
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


MAX_ADAPTER_FILES = 1000


class AdapterFile(BaseModel):
    name: str = Field(description="Path relative to the adapter's directory.")
    size_bytes: int


class AdapterFiles(BaseModel):
    """The files a job's adapter directory holds (empty until the job has saved one)."""

    object: Literal["fine_tuning.job.adapter"] = "fine_tuning.job.adapter"
    job_id: str
    path: str | None = Field(description="The adapter's directory; null until it is saved.")
    files: list[AdapterFile]
    truncated: bool = False


def adapter_files(job_id: str, path: str | None) -> AdapterFiles:
    """Regular files under `path`, sorted; links are not followed (nothing outside is shown)."""
    files: list[AdapterFile] = []
    root = Path(path) if path else None
    if root is None or not root.is_dir():
        return AdapterFiles(job_id=job_id, path=path, files=[])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if full.is_symlink() or not full.is_file():
                continue
            if len(files) == MAX_ADAPTER_FILES:
                return AdapterFiles(job_id=job_id, path=path, files=files, truncated=True)
            rel = full.relative_to(root).as_posix()
            files.append(AdapterFile(name=rel, size_bytes=full.stat().st_size))
    return AdapterFiles(job_id=job_id, path=path, files=files)


def job_adapter(fine_tuning_job_id: str, request: Request) -> AdapterFiles:
    """The names and sizes of the files in a job's saved adapter (read-only)."""
    job = request.app.state.services.jobs.get(fine_tuning_job_id)
    return adapter_files(job.id, job.status.adapter_path)


for _spelling, _prefix in (("dash", "fine-tuning"), ("underscore", "fine_tuning")):
    router.add_api_route(
        f"/v1/{_prefix}/jobs/{{fine_tuning_job_id}}/adapter",
        job_adapter,
        methods=["GET"],
        operation_id=f"job_adapter_{_spelling}",
        response_model=AdapterFiles,
        responses=error_responses(404),
        tags=["fine-tuning"],
    )
