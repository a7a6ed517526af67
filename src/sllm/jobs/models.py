"""Wire models of the fine-tuning API: what clients send and what they get back."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

from sllm.jobs.states import JobStatus

DEFAULT_TIMEOUT_S = 3600
MAX_TIMEOUT_S = 30 * 24 * 3600  # a month: longer is a mistake, and infinity is not a deadline
INT64_MAX = 2**63 - 1  # what SQLite's INTEGER holds
MAX_CONFIG_STRING = 4096


class FineTuningJobRequest(BaseModel):
    """The seed's `fine_tuning_config.json`, plus an optional `priority`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1, max_length=512, description="Base model, as saved by `sllm-store save`."
    )
    ft_backend: str = Field(
        "peft_lora", max_length=64, description="Fine-tuning backend; `peft_lora` today."
    )
    num_gpus: StrictInt = Field(
        0, ge=0, le=INT64_MAX, description="GPUs the job holds while it runs."
    )
    num_cpus: StrictInt = Field(
        1, ge=1, le=INT64_MAX, description="CPU cores the job holds while it runs."
    )
    timeout: StrictInt | StrictFloat = Field(
        DEFAULT_TIMEOUT_S,
        gt=0,
        le=MAX_TIMEOUT_S,
        allow_inf_nan=False,
        description="Seconds from start after which the job is stopped (at most 30 days).",
    )
    priority: StrictInt = Field(
        0,
        ge=-INT64_MAX,
        le=INT64_MAX,
        description="Higher runs first; equal priorities run FIFO.",
    )
    backend_config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("backend_config")
    @classmethod
    def _short_strings(cls, value: dict[str, Any]) -> dict[str, Any]:
        """A config is settings and paths, not text: every string in it is at most
        MAX_CONFIG_STRING characters (it is stored and echoed in every read of the job)."""
        stack: list[tuple[Any, str]] = [(value, "backend_config")]
        while stack:
            item, where = stack.pop()
            if isinstance(item, str) and len(item) > MAX_CONFIG_STRING:
                raise ValueError(
                    f"the string at `{where}` is {len(item)} characters long; at most "
                    f"{MAX_CONFIG_STRING}"
                )
            if isinstance(item, dict):
                stack += [(v, f"{where}.{k}") for k, v in item.items()]
            elif isinstance(item, list):
                stack += [(v, f"{where}.{i}") for i, v in enumerate(item)]
        return value


class JobError(BaseModel):
    message: str
    kind: str


class JobProgress(BaseModel):
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    trained_tokens: int | None = None  # tokens that carried loss
    processed_tokens: int | None = None  # every token through the model (prompts included)
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None  # the last evaluation's (jobs with validation data)
    valid_mean_token_accuracy: float | None = None


class JobStatusBody(BaseModel):
    config: dict[str, Any]
    status: JobStatus
    created_time: str
    updated_time: str
    priority: int
    started_time: str | None = None
    finished_time: str | None = None
    error: JobError | None = None
    progress: JobProgress | None = None
    adapter_path: str | None = None
    pending_reason: str | None = Field(
        None, description="While pending: what the job waits for (CPUs, GPUs, jobs ahead)."
    )


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    status: JobStatusBody


class SubmitResponse(BaseModel):
    job_id: str


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class JobEvent(BaseModel):
    id: int
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_time: str
    level: Literal["info", "warning", "error"]
    type: str
    message: str
    data: dict[str, Any] | None = None


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class JobLogs(BaseModel):
    """A page of a job's worker log; offsets are bytes into the log file."""

    object: Literal["fine_tuning.job.logs"] = "fine_tuning.job.logs"
    job_id: str
    offset: int = Field(description="Byte offset of the first byte of `text`.")
    next_offset: int = Field(description="Ask again from here for what follows.")
    size: int = Field(description="The log's size in bytes when it was read.")
    text: str
