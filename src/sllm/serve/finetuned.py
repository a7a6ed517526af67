"""Fine-tuned models served on demand: a completed job's adapter is a model, with no deploy.

Names (the convention every surface shares):

    ft:<base model>:<suffix or "sllm">:<job id>                 the job's final adapter
    ft:<base model>:<suffix or "sllm">:<job id>:ckpt-step-<N>   one of its checkpoints,
                                                                <adapter dir>/checkpoints/step-<N>/

The job id is the last component before any checkpoint part; the base may contain '/' (and ':').
Inside instances the adapter is named `ft:<job id>[:ckpt-step-<N>]` (short, and free of '/').

`FineTunedModels` turns a name into the adapter's files, reading the job store (no torch): an
unknown job, a job that has not completed, a name whose base or suffix is not the job's, a
missing checkpoint or a deleted adapter are each a 404 that says which.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from sllm.errors import ConflictError, InvalidRequestError, NotFoundError
from sllm.jobs.db import JobRecord, JobStore
from sllm.jobs.states import JobStatus
from sllm.openai.names import PREFIX, FineTunedName, model_name, suffix_of
from sllm.openai.names import parse_name as parse_fine_tuned_model
from sllm.serve.adapters import adapter_fingerprint, check_adapter_dir, check_fits_base
from sllm.serve.protocol import ModelCard

__all__ = ["FineTunedModels", "OnDemandAdapter", "parse_fine_tuned_model", "PREFIX"]


def fine_tuned_model_name(rec: JobRecord) -> str:
    """The name a completed job's adapter is served under (the one rule, `sllm.openai.names`:
    the suffix an OpenAI request gave, else `sllm`)."""
    return model_name(rec.model, suffix_of(rec), rec.id)


@dataclass(frozen=True)
class OnDemandAdapter:
    name: str  # what the client asked for
    base: str
    job_id: str
    key: str  # its name inside instances
    path: Path
    fingerprint: str


class FineTunedModels:
    def __init__(self, jobs: JobStore, root: Path) -> None:
        self.jobs = jobs
        self.root = Path(root).resolve()
        self._checked: dict[str, str] = {}  # path -> fingerprint that passed the checks

    def resolve(self, name: str) -> OnDemandAdapter:
        """The adapter files a fine-tuned model name stands for, checked to fit its base."""
        ft = parse_fine_tuned_model(name)
        if ft is None:
            raise NotFoundError(f"{name!r} is not a fine-tuned model name.", param="model")
        rec = self._completed(name, ft)
        path = self._adapter_dir(name, rec)
        if ft.step is not None:
            path = self._checkpoint(name, path, ft.step)
        fingerprint = adapter_fingerprint(path)
        if self._checked.get(str(path)) != fingerprint:
            try:
                check_fits_base(self.root / rec.model, path, check_adapter_dir(path))
            except InvalidRequestError as exc:
                raise InvalidRequestError(exc.message, param="model") from None
            self._checked[str(path)] = fingerprint
        return OnDemandAdapter(name, rec.model, rec.id, ft.key, path, fingerprint)

    def _completed(self, name: str, ft: FineTunedName) -> JobRecord:
        rec = self.jobs.get(ft.job_id)
        if rec is None:
            raise NotFoundError(
                f"The model {name!r} does not exist: no fine-tuning job {ft.job_id!r}.",
                param="model",
            )
        if rec.status is not JobStatus.COMPLETED:
            raise NotFoundError(
                f"The model {name!r} is not available: job {rec.id} is {rec.status.value}; "
                "a fine-tuned model is served once its job has completed.",
                param="model",
            )
        canonical = fine_tuned_model_name(rec)
        if name.removesuffix(ft.checkpoint_part) != canonical:
            raise NotFoundError(
                f"The model {name!r} does not exist; job {rec.id}'s model is {canonical!r}.",
                param="model",
            )
        return rec

    def _adapter_dir(self, name: str, rec: JobRecord) -> Path:
        raw = rec.adapter_path or str(rec.backend_config.get("output_dir") or "")
        path = (self.root / raw).resolve() if raw else self.root
        if path == self.root or not path.is_relative_to(self.root) or not path.is_dir():
            raise NotFoundError(
                f"The model {name!r} was deleted: job {rec.id}'s adapter is no longer in the "
                "store.",
                param="model",
            )
        owner = _written_by(path)
        if owner not in (None, rec.id):
            raise NotFoundError(
                f"The model {name!r} is gone: job {owner} wrote its own adapter to the same "
                "output_dir since.",
                param="model",
            )
        return path

    def _checkpoint(self, name: str, adapter_dir: Path, step: int) -> Path:
        path = adapter_dir / "checkpoints" / f"step-{step}"
        if not path.is_dir():
            steps = sorted(
                int(p.name.removeprefix("step-"))
                for p in (adapter_dir / "checkpoints").glob("step-*")
                if p.name.removeprefix("step-").isdigit()
            )
            have = ", ".join(f"ckpt-step-{s}" for s in steps) or "none"
            raise NotFoundError(
                f"The model {name!r} does not exist: the job has no checkpoint at step {step} "
                f"(checkpoints: {have}).",
                param="model",
            )
        return path

    def cards(self) -> list[ModelCard]:
        """The final model of every completed job whose adapter is still in the store."""
        cards = []
        for rec in self.jobs.with_status(JobStatus.COMPLETED):
            name = fine_tuned_model_name(rec)
            try:
                path = self._adapter_dir(name, rec)
            except NotFoundError:
                continue
            created = int(path.stat().st_mtime)
            root = path.relative_to(self.root).as_posix()
            cards.append(ModelCard(id=name, created=created, root=root, parent=rec.model))
        return cards

    def check_unused(self, adapter: OnDemandAdapter) -> None:
        """409 when a pending or running job starts from this adapter (`init_adapter`)."""
        for status in (JobStatus.PENDING, JobStatus.RUNNING):
            for rec in self.jobs.with_status(status):
                init = rec.backend_config.get("init_adapter")
                if not init:
                    continue
                init = str(init)
                used = init == adapter.name or (
                    not init.startswith(PREFIX)
                    and (self.root / init).resolve().is_relative_to(adapter.path)
                )
                if used:
                    raise ConflictError(
                        f"The model {adapter.name!r} is the `init_adapter` of job {rec.id} "
                        f"({status.value}); wait for it to finish or cancel it first.",
                        param="model",
                    )

    def remove(self, adapter: OnDemandAdapter) -> None:
        """Delete the adapter's files: moved aside in one rename (no request loads a torn
        directory), then removed."""
        aside = adapter.path.with_name(f".tmp-delete-{uuid.uuid4().hex[:8]}")
        adapter.path.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
        self._checked.pop(str(adapter.path), None)


def _written_by(adapter_dir: Path) -> str | None:
    """The job id in the adapter's training_metadata.json (None: not recorded)."""
    try:
        meta = json.loads((adapter_dir / "training_metadata.json").read_text())
    except (OSError, ValueError):
        return None
    job_id = meta.get("job_id") if isinstance(meta, dict) else None
    return str(job_id) if job_id else None
