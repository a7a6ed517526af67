"""Wire models of OpenAI's fine-tuning API, as `/openai/v1/fine_tuning/...` takes and answers
them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

MAX_SEED = 2**32 - 1
SUFFIX_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    """Each value may be `"auto"` (the server's documented default, see `sllm.openai.service`)."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | StrictInt | None = Field(None, description="Epochs, 1..50 (auto: 3).")
    batch_size: Auto | StrictInt | None = Field(
        None, description="Examples per step, 1..256 (auto: 8, at most the file's rows)."
    )
    learning_rate_multiplier: Auto | StrictFloat | StrictInt | None = Field(
        None,
        description="Times the base learning rate 2e-4, in (0, 10] (auto: 1).",
    )

    @field_validator("n_epochs", mode="before")
    @classmethod
    def _epochs(cls, v):
        return _auto_or_number(v, 1, 50, "an integer from 1 to 50", integer=True)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch(cls, v):
        return _auto_or_number(v, 1, 256, "an integer from 1 to 256", integer=True)

    @field_validator("learning_rate_multiplier", mode="before")
    @classmethod
    def _lr(cls, v):
        return _auto_or_number(v, 0, 10, "a number in (0, 10]", integer=False)


def _auto_or_number(value: Any, low: float, high: float, what: str, *, integer: bool) -> Any:
    """`auto`, null, or a number in range (an integer where asked), else one clear message."""
    if value is None or value == "auto":
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        number = number and float(value).is_integer()
    if not number or not (low < value <= high if low == 0 else low <= value <= high):
        raise ValueError(f"must be `auto` or {what}")
    return int(value) if integer else value


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    """Only `supervised` is trained today; `dpo` and `reinforcement` are a clear 400."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(max_length=64)
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class CreateJobRequest(BaseModel):
    """OpenAI's `POST /fine_tuning/jobs` body."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512, description="A base model in the store.")
    training_file: str = Field(min_length=1, max_length=128, description="An uploaded file id.")
    validation_file: str | None = Field(None, max_length=128)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(
        None, description="Deprecated by OpenAI in favour of `method`; still accepted."
    )
    suffix: str | None = Field(
        None,
        pattern=SUFFIX_PATTERN,
        description="Up to 64 letters, digits, `-` or `_`; part of `fine_tuned_model`.",
    )
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    metadata: dict[str, str] | None = Field(
        None, description="Up to 16 pairs; keys at most 64 characters, values at most 512."
    )
    integrations: list[dict[str, Any]] | None = Field(
        None, description="Not supported: must be empty (metrics stay on this server)."
    )

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None):
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 pairs")
        for key, value in v.items():
            if not 0 < len(key) <= 64 or len(value) > 512:
                raise ValueError("keys are 1 to 64 characters, values at most 512")
        return v

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, v):
        if v:
            raise ValueError("integrations are not supported by this server; leave it out")
        return v


class HyperparametersOut(BaseModel):
    n_epochs: int | float | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None


class SupervisedOut(BaseModel):
    hyperparameters: HyperparametersOut


class MethodOut(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedOut


class JobErrorOut(BaseModel):
    code: str
    message: str
    param: str | None = None


OpenAIStatus = Literal[
    "validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"
]


class OpenAIJob(BaseModel):
    """OpenAI's `fine_tuning.job` (`status` is a string; `paused` beside OpenAI's values)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    status: OpenAIStatus
    created_at: int
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    training_file: str | None = None
    validation_file: str | None = None
    hyperparameters: HyperparametersOut
    method: MethodOut
    seed: int
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    error: JobErrorOut | None = None
    estimated_finish: int | None = None
    result_files: list[str] = Field(default_factory=list)
    organization_id: str = "sllm"
    integrations: list[dict[str, Any]] = Field(default_factory=list)


class OpenAIJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIJob]
    has_more: bool


class OpenAIEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class OpenAIEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: int | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class OpenAICheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics


class OpenAICheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAICheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
