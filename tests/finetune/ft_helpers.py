"""Helpers shared by the fine-tuning backend tests (imported by name; conftest holds fixtures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PIRATE_DATA = REPO_ROOT / "examples" / "fine_tuning" / "data" / "pirate_prompts.jsonl"


def pirate_dataset() -> dict[str, Any]:
    """`dataset_config` for the demo's pirate prompts (121 rows)."""
    return {
        "dataset_source": "local",
        "data_files": str(PIRATE_DATA),
        "extension_type": "json",
        "tokenization_field": "prompt",
    }


class RecordingReporter:
    """A `Reporter` that keeps every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def progress(self, **fields: Any) -> None:
        self.calls.append(("progress", fields))

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.calls.append(("event", {"kind": kind, "message": message, "data": data}))

    @property
    def progress_calls(self) -> list[dict[str, Any]]:
        return [c for k, c in self.calls if k == "progress"]

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [c for k, c in self.calls if k == "event" and (kind is None or c["kind"] == kind)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hub_cache_entry(cache: Path, repo_id: str, rows: list[dict]) -> None:
    """Put `repo_id` into the datasets cache the way an earlier online load would have."""
    import datasets

    src_dir = cache.parent / f"src-{repo_id.replace('/', '_')}"
    src_dir.mkdir(parents=True, exist_ok=True)
    src = write_jsonl(src_dir / "train.jsonl", rows)
    work = cache.parent / f"build-{repo_id.replace('/', '_')}"  # one per repo: globbed below
    datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=str(work))
    built = next(work.glob("json/*/0.0.0/*/dataset_info.json")).parent
    owner, name = repo_id.split("/")
    target = cache / f"{owner}___{name}" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(built, target, dirs_exist_ok=True)
    (target / "json-train.arrow").rename(target / f"{name}-train.arrow")


def store_nan_model(storage: Path, name: str, scratch: Path) -> None:
    """Save a tiny llama as `name` whose one base weight is NaN (a corrupt checkpoint): its loss
    is NaN from the first step, and so are the LoRA weights after it."""
    import torch
    from safetensors.torch import load_file, save_file

    from sllm.store import save_model
    from sllm.testing import make_tiny_model_dir

    src = make_tiny_model_dir(scratch / "nan-model", arch="llama")
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(shard)
    key = next(k for k in tensors if "down_proj" in k)
    tensors[key][0, 0] = torch.nan
    save_file(tensors, shard, metadata={"format": "pt"})
    save_model(name, storage, local_model_path=src)
