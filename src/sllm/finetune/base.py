"""The contract between the job system and a fine-tuning backend, plus the backend registry.

A backend validates a `backend_config` inside the API server (cheaply, before a job exists) and
trains inside the job's own worker process, reporting through a `Reporter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sllm.errors import SllmError
from sllm.jobs.states import ErrorKind


@dataclass
class JobSpec:
    """Everything a worker needs to run one job; built by the job system from the record."""

    job_id: str
    model: str
    storage_path: Path
    backend_config: dict[str, Any]
    num_cpus: int = 1
    num_gpus: int = 0


@dataclass
class ValidationContext:
    """What `validate` may check a config against (the server's view of the world)."""

    storage_path: Path
    data_roots: list[Path] = field(default_factory=list)
    model: str = ""
    num_cpus: int | None = None  # the job's CPUs; None: not known (no per-job CPU limits checked)
    # Set by `validate`: (a sentence, data) for the job's first event (rows, tokens, steps).
    created_note: tuple[str, dict[str, Any]] | None = None


class TrainingDivergedError(SllmError):
    """The loss or the trained weights became NaN/Infinity: the run ends `failed` (error kind
    `diverged`) and saves nothing, rather than `completed` with an adapter that outputs NaN."""

    error_kind = ErrorKind.DIVERGED.value


@dataclass
class TrainResult:
    adapter_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


class Reporter(Protocol):
    """How a running backend talks back to the job system (durably, from the worker process)."""

    def progress(self, **fields: Any) -> None:
        """Fields: step, total_steps, epoch, loss, learning_rate, trained_tokens,
        tokens_per_second, eta_seconds, train_mean_token_accuracy, valid_loss,
        valid_mean_token_accuracy."""

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None: ...


class Backend(Protocol):
    name: str

    def validate(self, backend_config: dict[str, Any], ctx: ValidationContext) -> dict[str, Any]:
        """Raise `InvalidRequestError` for what a run would reject; return the normalised config."""

    def run(self, spec: JobSpec, reporter: Reporter) -> TrainResult: ...

    # Optional: `warm_up()` pays one-time costs of `validate` (imports, caches) ahead of the
    # first request; the server calls it at startup when a backend has it.


_REGISTRY: dict[str, str] = {"peft_lora": "sllm.finetune.peft_lora:PeftLoraBackend"}


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def register_backend(name: str, target: str) -> None:
    """Plug a backend in by "module:Class" so it is imported only when used."""
    _REGISTRY[name] = target


def get_backend(name: str) -> Backend:
    import importlib

    from sllm.errors import InvalidRequestError

    if name not in _REGISTRY:
        raise InvalidRequestError(
            f"Unknown `ft_backend` {name!r}; supported: {', '.join(available_backends())}.",
            param="ft_backend",
        )
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()
