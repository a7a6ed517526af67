"""Load a stored base model and its tokenizer onto a device, in the dtype asked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sllm.paths import model_dir

MANIFEST_NAME = "sllm_manifest.json"


def read_manifest(storage: Path, model: str) -> dict[str, Any] | None:
    path = model_dir(storage, model) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def load_model(storage: Path, model: str, device: str = "cpu", dtype: Any = None):
    """(model, tokenizer) from `$STORAGE_PATH/transformers/<model>`; dtype defaults to stored.

    The weights go from the memory-mapped safetensors files straight into `dtype` on `device`
    (the model is built on the meta device, never materialised in float32 first; on an
    accelerator `device_map` places each tensor there as it is read, with no CPU copy of the
    whole model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(storage, model)
    if not (path / "config.json").is_file():
        from sllm.errors import NotFoundError

        raise NotFoundError(
            f"model {model} is not in the store at {path.parent}; save it first with "
            f"`sllm-store save --model {model} --backend transformers`.",
            param="model",
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
    if str(device) != "cpu":
        kwargs["device_map"] = {"": device}
    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if str(device) == "cpu":
        lm = lm.to(device)  # a no-op unless the model was saved with a device map
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer
