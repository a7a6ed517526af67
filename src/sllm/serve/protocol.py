"""Wire models of the serving API: OpenAI chat/completions, the model list, deployments.

Requests ignore unknown fields (OpenAI clients send extras such as `user`), but every field we
read is checked; options we cannot honour (`n` > 1, `logprobs`, `echo`, ...) are refused with a
400 that names them rather than silently ignored. Every float is finite, every integer bounded,
every string valid Unicode, and names and paths are length-limited and clean (`sllm.serve.fields`).

`temperature` below 1e-5 (including 0) decodes greedily, as in vLLM: a smaller divisor only
amplifies float noise, and one like 1e-300 would overflow the scores (`sllm.serve.decoding`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from sllm.serve.fields import (
    MAX_ADAPTERS,
    MAX_CONCURRENCY,
    MAX_CPUS,
    MAX_GPUS,
    MAX_INSTANCES,
    MAX_LORAS,
    MAX_QUEUE,
    MAX_QUEUE_SECONDS,
    MAX_SECONDS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    AdapterName,
    AdapterPath,
    FiniteFloat,
    MaxTokens,
    ModelName,
    Seed,
    Temperature,
    Text,
    TopP,
    check_text,
)

DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_MAX_LORAS = 8  # the engine's default too (sllm.serve.engine)
DEFAULT_COMPLETION_MAX_TOKENS = 16


# --- completions ---------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName = Field(description="A deployed model, or one of its adapters.")
    max_tokens: MaxTokens | None = Field(None, description="Tokens to generate at most.")
    temperature: Temperature = Field(1.0, description="0 (or below 1e-5) means greedy.")
    top_p: TopP = 1.0
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOPS} stop strings of {MAX_STOP_CHARS} characters."
    )
    seed: Seed | None = Field(None, description="Makes sampling reproducible (0 .. 2**63-1).")
    n: StrictInt = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    lora_adapter_name: AdapterName | None = Field(
        None, description="Adapter to use; absent: base model."
    )
    logprobs: Any = Field(None, description="Not supported; must be absent, null or false.")
    presence_penalty: FiniteFloat = Field(0.0, ge=0.0, le=0.0, description="Only 0 is supported.")
    frequency_penalty: FiniteFloat = Field(0.0, ge=0.0, le=0.0, description="Only 0 is supported.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        for stop in stops:
            check_text(stop)
        return stops or None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        return None

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _clean(cls, v: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        return check_text(v) if isinstance(v, str) else v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: MaxTokens | None = None

    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_MAX_TOKENS


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(description="One prompt string (a list of one is accepted).")
    echo: StrictBool = Field(False, description="Not supported.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: StrictInt | None = Field(None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt is supported per request")
            v = v[0]
        return check_text(v)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> None:
        if v:
            raise ValueError("suffix is not supported")
        return None

    def token_limit(self) -> int:
        return self.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    """Also the shape of each streamed chunk (OpenAI streams `text_completion` objects)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sllm"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelDeleted(BaseModel):
    """OpenAI's answer to deleting a model."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# --- deployments ---------------------------------------------------------------------------------


class DeployRequest(BaseModel):
    """Deploy a model, or update a deployment: fields left out keep their current values.

    Scaling fields apply at once; `num_cpus`, `num_gpus`, `max_batch_size` and `dtype` apply to
    instances started afterwards. `lora_adapters` are added to (or replace same-named) adapters.
    """

    model_config = ConfigDict(extra="forbid")

    model: ModelName = Field(description="Base model in the store.")
    backend: Literal["transformers"] = "transformers"
    num_cpus: StrictInt | None = Field(
        None, ge=1, le=MAX_CPUS, description="CPU cores per instance (1)."
    )
    num_gpus: StrictInt | None = Field(
        None, ge=0, le=MAX_GPUS, description="GPUs per instance (0)."
    )
    min_instances: StrictInt | None = Field(
        None, ge=0, le=MAX_INSTANCES, description="Instances kept warm (0)."
    )
    max_instances: StrictInt | None = Field(
        None, ge=1, le=MAX_INSTANCES, description="Instances at most (1)."
    )
    keep_alive: FiniteFloat | None = Field(
        None, ge=0, le=MAX_SECONDS, description="Idle seconds before exit (60; at most a week)."
    )
    target_concurrency: StrictInt | None = Field(
        None,
        ge=1,
        le=MAX_CONCURRENCY,
        description="Requests per instance before another starts (max_batch_size).",
    )
    max_batch_size: StrictInt | None = Field(None, ge=1, le=256, description="Rows per batch (8).")
    max_queue: StrictInt | None = Field(
        None,
        ge=0,
        le=MAX_QUEUE,
        description="Requests that may wait for a busy deployment before 429 (64).",
    )
    queue_timeout: FiniteFloat | None = Field(
        None,
        gt=0,
        le=MAX_QUEUE_SECONDS,
        description="Seconds a queued request waits before 503 (60; at most a day).",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = Field(
        None, description="Weights dtype; auto: float32 on CPU, stored dtype on GPU."
    )
    enable_lora: StrictBool | None = None
    max_loras: StrictInt | None = Field(
        None,
        ge=1,
        le=MAX_LORAS,
        description="Adapters loaded on demand that each instance keeps (LRU; 8).",
    )
    lora_adapters: dict[AdapterName, AdapterPath] = Field(
        default_factory=dict,
        max_length=MAX_ADAPTERS,
        description="name -> path under $STORAGE_PATH/transformers.",
    )


class DeploymentConfig(BaseModel):
    """The complete settings of a deployment (what `DeployRequest` fills in). Its numbers are
    finite, so its JSON (what the registry stores) never holds `null` for one."""

    model_config = ConfigDict(validate_assignment=True)

    model: str
    backend: str = "transformers"
    num_cpus: int = Field(1, ge=1)
    num_gpus: int = Field(0, ge=0)
    min_instances: int = Field(0, ge=0)
    max_instances: int = Field(1, ge=1)
    keep_alive: float = Field(60.0, ge=0, allow_inf_nan=False)
    target_concurrency: int | None = Field(None, ge=1)
    max_batch_size: int = Field(8, ge=1)
    max_queue: int = Field(64, ge=0)
    queue_timeout: float = Field(60.0, gt=0, allow_inf_nan=False)
    dtype: str = "auto"
    enable_lora: bool = False
    max_loras: int = Field(DEFAULT_MAX_LORAS, ge=1)
    lora_adapters: dict[str, str] = Field(default_factory=dict)

    def concurrency(self) -> int:
        return self.target_concurrency or self.max_batch_size


class AdapterStatus(BaseModel):
    name: str
    path: str
    state: Literal["deployed", "failed"] = "deployed"
    error: str | None = None


class InstanceStatus(BaseModel):
    id: str
    state: Literal["starting", "ready", "stopping", "failed"]
    pid: int | None = None
    port: int | None = None
    in_flight: int = 0
    cpus: int = 0
    gpu_ids: list[int] = Field(default_factory=list)
    started_time: float
    cold_start_seconds: float | None = None
    cold_start_phases: dict[str, float] = Field(
        default_factory=dict,
        description="Seconds of each cold-start step: `process_s` (launch call until torch, "
        "transformers and peft are imported: about 0 from the warm pool), `model_load_s` (and "
        "`model_load_gb_per_s`: the weights' GB/s onto the device, not seconds), "
        "`first_forward_s`, `adapters_s` (loading the deployment's adapters).",
    )
    idle_seconds: float | None = None
    adapters: list[str] = Field(default_factory=list)
    lora_cache: list[str] = Field(
        default_factory=list,
        description="Adapters loaded on demand (least recently used first), as last reported.",
    )
    lora_loads: int = Field(0, description="On-demand adapter loads so far (LRU misses).")


class DeploymentStatus(BaseModel):
    model: str
    object: Literal["deployment"] = "deployment"
    state: Literal["cold", "starting", "warm"]
    config: DeploymentConfig
    adapters: list[AdapterStatus]
    instances: list[InstanceStatus]
    queued: int = 0
    last_error: str | None = None
    on_demand: bool = Field(
        False, description="Made by a request for a fine-tuned model, not by a deploy."
    )


class DeploymentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeploymentStatus]


class DeleteResponse(BaseModel):
    model: str
    deleted: Literal["deployment", "adapters"]
    adapters: list[str] = Field(default_factory=list)
