"""Fine-tuned model names: `ft:<base model>:<suffix or "sllm">:<job id>`, and a checkpoint's
`ft:<base model>:<suffix>:<job id>:ckpt-step-<N>`.

The job id is always the last component before the optional checkpoint one, so a base model or
a suffix holding `:` still parses; the name is rebuilt from the job's row (its model and the
suffix the OpenAI request gave), never stored twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PREFIX = "ft:"
DEFAULT_SUFFIX = "sllm"
CHECKPOINT_PREFIX = "ckpt-step-"
_JOB_ID = re.compile(r"^job-[0-9a-f]{8,64}$")
_CKPT = re.compile(rf":{CHECKPOINT_PREFIX}(\d{{1,12}})$")


@dataclass(frozen=True)
class FineTunedName:
    base: str
    suffix: str
    job_id: str
    step: int | None = None

    @property
    def key(self) -> str:
        """The adapter's name inside instances (short, and free of '/')."""
        return f"{PREFIX}{self.job_id}" + self.checkpoint_part

    @property
    def checkpoint_part(self) -> str:
        return f":{CHECKPOINT_PREFIX}{self.step}" if self.step is not None else ""


def parse_name(name: str | None) -> FineTunedName | None:
    """The parts of `ft:<base>:<suffix>:<job id>[:ckpt-step-<N>]`, or None for any other name."""
    if not isinstance(name, str) or not name.startswith(PREFIX):
        return None
    rest, step = name[len(PREFIX) :], None
    ckpt = _CKPT.search(rest)
    if ckpt:
        rest, step = rest[: ckpt.start()], int(ckpt.group(1))
    parts = rest.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        return None
    base, suffix, job_id = parts
    return FineTunedName(base, suffix, job_id, step)


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
    """(job id, checkpoint step or None) of a fine-tuned model name whose job id has the shape
    sllm gives them; None if it is not one."""
    ft = parse_name(name)
    if ft is None or not _JOB_ID.match(ft.job_id):
        return None
    return ft.job_id, ft.step
