"""Load a stored base model and its tokenizer onto a device, in the dtype asked for."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sllm.paths import model_dir

MANIFEST_NAME = "sllm_manifest.json"
log = logging.getLogger(__name__)


def read_manifest(storage: Path, model: str) -> dict[str, Any] | None:
    path = model_dir(storage, model) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def load_model(
    storage: Path,
    model: str,
    device: str = "cpu",
    dtype: Any = None,
    *,
    fast: bool | None = None,
    stats: dict[str, Any] | None = None,
):
    """(model, tokenizer) from `$STORAGE_PATH/transformers/<model>`; dtype defaults to stored.

    The weights go from the safetensors files straight into `dtype` on `device` (the model is
    built on the meta device, never materialised in float32 first). On an accelerator the fast
    path (`sllm.store.fastload`: large sequential reads into pinned buffers, copies overlapped
    with the reads) is used unless `fast=False` or `SLLM_FAST_LOAD=0`; what it cannot handle
    falls back to `from_pretrained` with a device map. `stats`, when given, receives the path
    taken, bytes, seconds and GB/s (`LoadStats.as_dict`)."""
    import torch
    from transformers import AutoTokenizer

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
    lm, load_stats = _load_weights(path, str(device), dtype, fast)
    if stats is not None:
        stats.update(load_stats.as_dict())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


def use_fast_path(device: str, fast: bool | None) -> bool:
    """Explicit `fast` wins; by default accelerators only (on CPU, `from_pretrained` maps the
    files and has nothing to copy), and `SLLM_FAST_LOAD=0` turns it off."""
    if fast is not None:
        return fast
    return device != "cpu" and os.environ.get("SLLM_FAST_LOAD", "1") != "0"


def _load_weights(path: Path, device: str, dtype: Any, fast: bool | None):
    from sllm.store import fastload

    reason = None
    if use_fast_path(device, fast):
        try:
            return fastload.fast_load(path, device, dtype)
        except fastload.Unsupported as exc:
            reason = str(exc)
            log.info("fast load of %s not possible (%s); using from_pretrained", path, reason)
        except Exception as exc:  # a bug or a device error: the model must still load
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("fast load of %s failed (%s); using from_pretrained", path, reason)
    return _from_pretrained(path, device, dtype, reason)


def _from_pretrained(path: Path, device: str, dtype: Any, fallback: str | None):
    from transformers import AutoModelForCausalLM

    from sllm.store.fastload import LoadStats

    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device == "cpu":
        lm = lm.to(device)  # a no-op unless the model was saved with a device map
    _sync(device)
    files = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    stats = LoadStats("from_pretrained", bytes=sum(f.stat().st_size for f in files),
                      files=len(files), fallback=fallback)  # fmt: skip
    stats.total_s = time.perf_counter() - t0
    return lm, stats


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
