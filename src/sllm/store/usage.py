"""What still uses a stored model: deployments and pending or running fine-tuning jobs.

Read from the server's database (`$STORAGE_PATH/sllm.db`, opened read-only; no server needed), so
that `sllm-store delete` can refuse to pull a model out from under them, and say what breaks
when told to anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sllm.errors import InvalidRequestError
from sllm.paths import db_path
from sllm.store import layout


@dataclass(frozen=True)
class ModelUser:
    """One thing that uses a model: what it is, and what deleting the model does to it."""

    what: str
    breaks: str


def _canonical(storage: Path, model: str) -> str | None:
    try:
        return layout.resolve_model(storage, model)[0]
    except InvalidRequestError:
        return None


def _inside(rel: str, name: str) -> bool:
    return rel == name or rel.startswith(name + "/")


def model_users(storage: Path, model: str) -> list[ModelUser]:
    """Deployments of `model` (or serving an adapter stored inside its directory) and the
    pending or running jobs that fine-tune it, in that order."""
    from sllm.jobs.db import output_key, read_active_jobs
    from sllm.serve.registry import read_deployments

    storage = Path(storage)
    name = layout.resolve_model(storage, model)[0]
    db = db_path(storage)
    users: list[ModelUser] = []
    for config in read_deployments(db):
        if _canonical(storage, config.model) == name:
            users.append(
                ModelUser(
                    f"deployment {config.model!r}",
                    "instances running now keep serving from memory until they scale to zero; "
                    "every later cold start answers 404 until the model is saved again",
                )
            )
        for adapter, rel in sorted(config.lora_adapters.items()):
            if _inside(output_key(rel), name):
                users.append(
                    ModelUser(
                        f"adapter {adapter!r} of deployment {config.model!r} (at {rel}, inside "
                        "the model's directory)",
                        "its files are kept (only the model's own files are removed), but it "
                        "now lies in a directory that no longer holds a model",
                    )
                )
    for job in read_active_jobs(db):
        if _canonical(storage, job.model) != name:
            continue
        if job.status.value == "running":
            breaks = (
                "it keeps training on the weights it loaded, but if it is re-queued (a server "
                "restart) it fails"
            )
        else:
            breaks = "it fails when it starts: its base model is gone"
        users.append(ModelUser(f"fine-tuning job {job.id} ({job.status.value})", breaks))
    return users
