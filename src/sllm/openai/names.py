"""Fine-tuned model names: `ft:<base model>:<suffix or "sllm">:<job id>`, and a checkpoint's
`ft:<base model>:<suffix>:<job id>:ckpt-step-<N>`.

The job id is always the last component before the optional checkpoint one, so a base model or
a suffix holding `:` still parses; the name is rebuilt from the job's row (its model and the
suffix the OpenAI request gave), never stored twice.
"""

from __future__ import annotations

import re
from typing import Any

DEFAULT_SUFFIX = "sllm"
CHECKPOINT_PREFIX = "ckpt-step-"
_JOB_ID = re.compile(r"^job-[0-9a-f]{8,64}$")
_STEP = re.compile(rf"^{CHECKPOINT_PREFIX}(\d{{1,12}})$")


def suffix_of(job: Any) -> str:
    """The suffix the job was created with (OpenAI surface), else `sllm`."""
    openai = getattr(job, "openai", None) or {}
    return openai.get("suffix") or DEFAULT_SUFFIX


def model_name(model: str, suffix: str, job_id: str, step: int | None = None) -> str:
    name = f"ft:{model}:{suffix}:{job_id}"
    return name if step is None else f"{name}:{CHECKPOINT_PREFIX}{step}"


def fine_tuned_model_name(job: Any) -> str | None:
    """The servable name of a completed job's adapter (a `JobRecord`), or None before then."""
    status = getattr(job.status, "value", job.status)
    if status != "completed" or not job.adapter_path:
        return None
    return model_name(job.model, suffix_of(job), job.id)


def checkpoint_model_name(job: Any, step: int) -> str:
    """The servable name of one of a job's epoch checkpoints."""
    return model_name(job.model, suffix_of(job), job.id, step)


def parse_fine_tuned_model(name: str) -> tuple[str, int | None] | None:
    """(job id, checkpoint step or None) of a fine-tuned model name; None if it is not one."""
    if not isinstance(name, str) or not name.startswith("ft:"):
        return None
    parts = name.split(":")
    step = None
    match = _STEP.match(parts[-1])
    if match:
        step = int(match.group(1))
        parts = parts[:-1]
    if len(parts) < 4 or not _JOB_ID.match(parts[-1]):  # ft, model, suffix, job id
        return None
    return parts[-1], step
