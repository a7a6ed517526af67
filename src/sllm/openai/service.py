"""OpenAI's fine-tuning API over the same `JobService` as the seed's routes: one job store, one
scheduler, two wire shapes.

An OpenAI request becomes a `peft_lora` job with these documented defaults:

- data: `training_file` -> `dataset_config: {dataset_source: file, file_id, split: train}`, read
  as its rows' format (text rows train on `text`; chat and prompt/completion rows set
  `dataset_config.format`); `validation_file` -> `validation_dataset_config` the same way.
- LoRA: r=8, lora_alpha=16, lora_dropout=0.05, bias none, the model's default target modules.
- training: `n_epochs` (auto: 3), `batch_size` (auto: 8, at most the file's rows),
  learning rate `BASE_LEARNING_RATE` (2e-4) x `learning_rate_multiplier` (auto: 1), `seed`
  (default 42), one loss event per step, no Trainer checkpoints of its own (the job's periodic
  and epoch checkpoints still apply).
- resources: `sllm start --openai-num-cpus` (1), `--openai-num-gpus` (1 when the server has a
  GPU, else 0), `--openai-timeout-seconds` (a day).
- the adapter: `ft/<base model>/<suffix or sllm>-<12 hex>` under the store's `transformers/`.

Statuses: pending -> `queued`, running -> `running`, completed -> `succeeded`, failed,
cancelled, paused (a value OpenAI's SDK does not list; it tolerates it).
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sllm.config import Settings
from sllm.errors import InvalidRequestError, NotFoundError
from sllm.files.store import FileStore
from sllm.finetune import epochs
from sllm.jobs.db import JobRecord
from sllm.jobs.service import JobService, validation_message
from sllm.jobs.states import JobStatus
from sllm.openai.names import checkpoint_model_name, fine_tuned_model_name
from sllm.openai.protocol import (
    CheckpointMetrics,
    CreateJobRequest,
    Hyperparameters,
    HyperparametersOut,
    JobErrorOut,
    MethodOut,
    OpenAICheckpoint,
    OpenAICheckpointList,
    OpenAIEvent,
    OpenAIEventList,
    OpenAIJob,
    OpenAIJobList,
    SupervisedOut,
)
from sllm.paths import jobs_dir

BASE_LEARNING_RATE = 2e-4
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEED = 42  # TrainingArguments' own default
TRAINER_DEFAULTS = {"num_train_epochs": 3, "per_device_train_batch_size": 8, "learning_rate": 5e-5}
_STATUS = {
    JobStatus.PENDING: "queued",
    JobStatus.RUNNING: "running",
    JobStatus.COMPLETED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.PAUSED: "paused",
}
# Per row format of the uploaded file: the dataset_config keys it trains with.
_ROW_DATA = {
    "text": {"tokenization_field": "text"},
    "chat": {"format": "chat"},
    "prompt_completion": {"format": "prompt_completion"},
}


def _epoch_seconds(iso: str | None) -> int | None:
    if not iso:
        return None
    return int(datetime.fromisoformat(iso).replace(tzinfo=timezone.utc).timestamp())


def _resolved(hp: Hyperparameters, rows: int) -> dict[str, Any]:
    """`auto` (or absent) values replaced by the documented defaults."""

    def pick(value, default):
        return default if value in (None, "auto") else value

    return {
        "n_epochs": pick(hp.n_epochs, DEFAULT_EPOCHS),
        "batch_size": pick(hp.batch_size, max(1, min(DEFAULT_BATCH_SIZE, rows))),
        "learning_rate_multiplier": float(pick(hp.learning_rate_multiplier, 1.0)),
    }


class OpenAIFineTuning:
    def __init__(self, settings: Settings, jobs: JobService, files: FileStore) -> None:
        self.settings = settings
        self.jobs = jobs
        self.files = files

    # --- create ---------------------------------------------------------------------------
    def create(self, payload: dict[str, Any] | CreateJobRequest) -> OpenAIJob:
        req = self._parse(payload)
        hp = self._hyperparameters(req)
        train = self._file_data(req.training_file, "training_file")
        resolved = _resolved(hp, train["rows"])
        backend_config: dict[str, Any] = {
            "output_dir": f"ft/{req.model}/{req.suffix or 'sllm'}-{uuid.uuid4().hex[:12]}",
            "dataset_config": train["config"],
            "lora_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none"},
            "training_config": {
                "num_train_epochs": resolved["n_epochs"],
                "per_device_train_batch_size": resolved["batch_size"],
                "learning_rate": BASE_LEARNING_RATE * resolved["learning_rate_multiplier"],
                "seed": req.seed if req.seed is not None else DEFAULT_SEED,
                "logging_steps": 1,
                "save_strategy": "no",
                "report_to": "none",
            },
        }
        if req.validation_file is not None:
            backend_config["validation_dataset_config"] = self._validation(req.validation_file)
        num_gpus = self.settings.openai_num_gpus
        if num_gpus is None:
            num_gpus = 1 if self.jobs.pool.total_gpus > 0 else 0
        seed_request = {
            "model": req.model,
            "ft_backend": "peft_lora",
            "num_cpus": min(self.settings.openai_num_cpus, self.jobs.pool.total_cpus),
            "num_gpus": num_gpus,
            "timeout": self.settings.openai_timeout_s,
            "backend_config": backend_config,
        }
        openai = {
            "training_file": req.training_file,
            "validation_file": req.validation_file,
            "suffix": req.suffix,
            "metadata": req.metadata,
            "seed": backend_config["training_config"]["seed"],
            "hyperparameters": resolved,
        }
        job_id = self.jobs.submit(seed_request, openai=openai)
        return self.retrieve(job_id)

    @staticmethod
    def _parse(payload: dict[str, Any] | CreateJobRequest) -> CreateJobRequest:
        if isinstance(payload, CreateJobRequest):
            return payload
        try:
            return CreateJobRequest.model_validate(payload)
        except ValidationError as exc:
            message, param = validation_message(exc)
            raise InvalidRequestError(message, param=param) from None

    @staticmethod
    def _hyperparameters(req: CreateJobRequest) -> Hyperparameters:
        """`method.supervised.hyperparameters`, else the deprecated top-level ones."""
        method = req.method
        if method is not None:
            if method.type != "supervised":
                raise InvalidRequestError(
                    f"`method.type` {method.type!r} is not supported; this server trains "
                    "`supervised` (LoRA) jobs only.",
                    param="method.type",
                )
            if method.dpo is not None or method.reinforcement is not None:
                raise InvalidRequestError(
                    "`method` of type supervised takes only `supervised`.", param="method"
                )
            given = method.supervised.hyperparameters if method.supervised else None
            if given is not None and req.hyperparameters is not None:
                raise InvalidRequestError(
                    "Give hyperparameters in `method.supervised.hyperparameters` or the "
                    "deprecated top-level `hyperparameters`, not both.",
                    param="hyperparameters",
                )
            if given is not None:
                return given
        return req.hyperparameters or Hyperparameters()

    def _file_data(self, file_id: str, param: str) -> dict[str, Any]:
        """The dataset_config for an uploaded file, from the row format recorded at upload."""
        try:
            rec = self.files.get(file_id)
        except NotFoundError:
            raise InvalidRequestError(
                f"`{param}`: no uploaded file with id {file_id!r}; upload it first "
                "(`POST /files` with purpose `fine-tune`).",
                param=param,
            ) from None
        if rec.purpose != "fine-tune":
            raise InvalidRequestError(
                f"`{param}`: file {file_id} has purpose {rec.purpose!r}, not 'fine-tune'.",
                param=param,
            )
        data = dict(_ROW_DATA.get(rec.row_format or "text", _ROW_DATA["text"]))
        config = {"dataset_source": "file", "file_id": file_id, "split": "train", **data}
        return {"config": config, "rows": rec.rows or 1}

    def _validation(self, file_id: str) -> dict[str, Any]:
        return self._file_data(file_id, "validation_file")["config"]

    # --- reads ----------------------------------------------------------------------------
    def retrieve(self, job_id: str) -> OpenAIJob:
        return self.to_wire(self.jobs.record(job_id))

    def list(
        self, after: str | None = None, limit: int = 20, metadata: dict[str, str] | None = None
    ) -> OpenAIJobList:
        """Newest first; `metadata` keeps the jobs created with all of these pairs."""
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("`limit` must be between 1 and 1000.", param="limit")
        if after is not None and not self.jobs.store.exists(after):
            raise InvalidRequestError(f"`after`: no job with id {after!r}.", param="after")
        records, more = self.jobs.store.list(limit=limit, after=after, metadata=metadata)
        return OpenAIJobList(data=[self.to_wire(r) for r in records], has_more=more)

    def cancel(self, job_id: str) -> OpenAIJob:
        self.jobs.cancel(job_id)
        return self.retrieve(job_id)

    def pause(self, job_id: str) -> OpenAIJob:
        self.jobs.pause(job_id)
        return self.retrieve(job_id)

    def resume(self, job_id: str) -> OpenAIJob:
        self.jobs.resume(job_id)
        return self.retrieve(job_id)

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> OpenAIEventList:
        """Newest first, as OpenAI lists them; `after` is the last event id seen."""
        self.jobs.record(job_id)
        if not 1 <= limit <= 10000:
            raise InvalidRequestError("`limit` must be between 1 and 10000.", param="limit")
        before = None
        if after is not None:
            before = _event_seq(after)
        rows, more = self.jobs.store.events_newest_first(job_id, limit=limit, before=before)
        return OpenAIEventList(data=[_event(r) for r in rows], has_more=more)

    def checkpoints(
        self, job_id: str, after: str | None = None, limit: int = 10
    ) -> OpenAICheckpointList:
        """The job's epoch checkpoints (the last few and the final one), newest first."""
        rec = self.jobs.record(job_id)
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("`limit` must be between 1 and 1000.", param="limit")
        root = self._checkpoint_root(rec)
        items = epochs.read_checkpoints(root) if root is not None else []
        if after is not None:
            step = _checkpoint_step(after, job_id)
            items = [i for i in items if i["step_number"] < step]
        page = items[:limit]
        data = [_checkpoint(rec, i) for i in page]
        return OpenAICheckpointList(
            data=data,
            has_more=len(items) > limit,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    def _checkpoint_root(self, rec: JobRecord) -> Path | None:
        if rec.status is JobStatus.COMPLETED:
            return Path(rec.adapter_path) / epochs.DIR_NAME if rec.adapter_path else None
        return jobs_dir(self.settings.storage_path) / rec.id / epochs.SCRATCH_NAME

    # --- the job object -------------------------------------------------------------------
    def to_wire(self, rec: JobRecord) -> OpenAIJob:
        meta = rec.openai or {}
        training = rec.backend_config.get("training_config") or {}
        hp = meta.get("hyperparameters") or _hyperparameters_of(training)
        hp_out = HyperparametersOut(**hp)
        progress = rec.progress or {}
        error = None
        if rec.status is JobStatus.FAILED and rec.error_message:
            error = JobErrorOut(code=rec.error_kind or "error", message=rec.error_message)
        eta = progress.get("eta_seconds")
        ds = rec.backend_config.get("dataset_config") or {}
        return OpenAIJob(
            id=rec.id,
            model=rec.model,
            status=_STATUS[rec.status],
            created_at=_epoch_seconds(rec.created_time) or 0,
            finished_at=_epoch_seconds(rec.finished_time),
            fine_tuned_model=fine_tuned_model_name(rec),
            trained_tokens=progress.get("trained_tokens"),
            training_file=meta.get("training_file") or ds.get("file_id"),
            validation_file=meta.get("validation_file"),
            hyperparameters=hp_out,
            method=MethodOut(supervised=SupervisedOut(hyperparameters=hp_out)),
            seed=meta.get("seed", training.get("seed", DEFAULT_SEED)),
            suffix=meta.get("suffix"),
            metadata=meta.get("metadata"),
            error=error,
            estimated_finish=(
                int(time.time() + eta) if rec.status is JobStatus.RUNNING and eta else None
            ),
        )


def _dataset_key(name: str) -> bool:
    from sllm.finetune.config import DatasetConfig

    return name in DatasetConfig.model_fields


def _hyperparameters_of(training: dict[str, Any]) -> dict[str, Any]:
    """What a job submitted in the seed's shape trains with, in OpenAI's terms."""
    lr = training.get("learning_rate", TRAINER_DEFAULTS["learning_rate"])
    return {
        "n_epochs": training.get("num_train_epochs", TRAINER_DEFAULTS["num_train_epochs"]),
        "batch_size": training.get(
            "per_device_train_batch_size", TRAINER_DEFAULTS["per_device_train_batch_size"]
        ),
        "learning_rate_multiplier": lr / BASE_LEARNING_RATE
        if isinstance(lr, int | float)
        else None,
    }


def _event(row: dict[str, Any]) -> OpenAIEvent:
    data = row.get("data")
    kind = "message"
    if row["type"] == "loss" and isinstance(data, dict):
        kind = "metrics"
        data = {"step": data.get("step"), "train_loss": data.get("loss")}
    level = {"warning": "warn", "error": "error"}.get(row["level"], "info")
    return OpenAIEvent(
        id=f"ftevent-{row['id']}",
        created_at=_epoch_seconds(row["created_time"]) or 0,
        level=level,
        message=row["message"],
        type=kind,
        data=data if isinstance(data, dict) else None,
    )


def _event_seq(event_id: str) -> int:
    try:
        seq = int(event_id.removeprefix("ftevent-"))
        if event_id.startswith("ftevent-") and seq > 0:
            return seq
    except ValueError:
        pass
    raise InvalidRequestError(
        f"`after` must be an event id (`ftevent-...`), got {event_id!r}.", param="after"
    )


def _checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt-{job_id.removeprefix('job-')}-{step}"


def _checkpoint_step(checkpoint_id: str, job_id: str) -> int:
    prefix = _checkpoint_id(job_id, 0)[:-1]
    tail = checkpoint_id.removeprefix(prefix)
    if checkpoint_id.startswith(prefix) and tail.isdigit() and len(tail) <= 12:
        return int(tail)
    raise InvalidRequestError(
        f"`after` must be a checkpoint id of this job ({prefix}<step>), got {checkpoint_id!r}.",
        param="after",
    )


def _checkpoint(rec: JobRecord, info: dict[str, Any]) -> OpenAICheckpoint:
    step = int(info["step_number"])
    raw = info.get("metrics") if isinstance(info.get("metrics"), dict) else {}
    known = set(CheckpointMetrics.model_fields)
    metrics = CheckpointMetrics(**{k: v for k, v in raw.items() if k in known})
    return OpenAICheckpoint(
        id=_checkpoint_id(rec.id, step),
        created_at=info.get("created_at") or 0,
        fine_tuned_model_checkpoint=checkpoint_model_name(rec, step),
        fine_tuning_job_id=rec.id,
        step_number=step,
        metrics=metrics,
    )
