"""Server settings: one object built by the CLI (or a test) and handed to `create_app`."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

from sllm.paths import storage_path

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON: a job config or a long chat, not a dataset
DEFAULT_MAX_UPLOAD_BYTES = 1 << 30  # 1 GiB: an uploaded training file (the Files API)


class Settings(BaseModel):
    host: str = Field("127.0.0.1", description="Bind address; loopback unless asked otherwise.")
    port: int = Field(8343, description="HTTP port of the API server.")
    storage_path: Path = Field(default_factory=lambda: storage_path())
    num_cpus: int | None = Field(None, description="CPU cores to hand out; default: all cores.")
    num_gpus: int | None = Field(None, description="GPUs to hand out; default: all visible.")
    data_roots: list[Path] = Field(
        default_factory=list,
        description="Where local datasets may be read from; default: storage path and cwd.",
    )
    starvation_s: float = Field(600.0, description="Wait after which a job reserves resources.")
    kill_grace_s: float = Field(5.0, description="SIGTERM-to-SIGKILL grace when stopping a job.")
    max_restarts: int = Field(
        1,
        description="Re-queues of a running job after a crash (server or node); a clean "
        "shutdown does not count.",
    )
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="On a clean shutdown (SIGTERM, Ctrl-C): how long running jobs get to save a "
        "checkpoint at their next step boundary before their workers are killed.",
    )
    log_retention_days: float = Field(
        7.0,
        ge=0,
        description="Days the files of an ended job (`_jobs/<id>/`, its worker log) are kept.",
    )
    ray_address: str | None = Field(
        None,
        description="Run jobs and instances on this Ray cluster (`host:port`, `auto`, `local`).",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys every route but /health requires; empty: no authentication.",
    )
    metrics_unauthenticated: bool = Field(
        False, description="Serve GET /metrics without the API key (for a Prometheus scraper)."
    )
    warm_pool: int = Field(
        2,
        ge=0,
        le=64,
        description="Pre-started processes that have imported torch, transformers and peft, "
        "taken by the next job worker or instance (`sllm.procpool`); 0: every one starts fresh.",
    )
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1024, description="Largest request body accepted (413 above)."
    )

    max_upload_bytes: int = Field(
        DEFAULT_MAX_UPLOAD_BYTES,
        ge=1024,
        description="Largest file `POST /v1/files` accepts (413 above); streamed to disk.",
    )
    openai_num_cpus: int = Field(
        1, ge=1, description="CPU cores of a job created through the OpenAI surface."
    )
    openai_num_gpus: int | None = Field(
        None,
        ge=0,
        description="GPUs of a job created through the OpenAI surface; default 1 when the server "
        "has a GPU, else 0.",
    )
    openai_timeout_s: float = Field(
        24 * 3600.0, gt=0, description="Timeout of a job created through the OpenAI surface."
    )

    def resolved_data_roots(self) -> list[Path]:
        roots = self.data_roots or [self.storage_path, Path(os.getcwd())]
        return [Path(r).expanduser().resolve() for r in roots]

    def cpu_capacity(self) -> int:
        return self.num_cpus if self.num_cpus is not None else (os.cpu_count() or 1)

    def gpu_ids(self) -> list[int]:
        """All visible CUDA devices, or ids 0..N-1 when `--num-gpus N` declares them."""
        from sllm.jobs.resources import detect_gpu_ids

        return detect_gpu_ids() if self.num_gpus is None else list(range(self.num_gpus))
