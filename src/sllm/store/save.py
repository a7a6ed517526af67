"""Put a base model into the store: from the HF hub, a transformers directory or a GGUF file.

Every save goes through one path: load the model and tokenizer with transformers, `save_pretrained`
them as safetensors into a scratch directory next to the target, hash every file, write the manifest
last, then rename the scratch directory into place (moving an older copy aside first). A crash at
any point leaves at worst a dot-named scratch directory, which listings ignore and the next save
removes; it never leaves a directory that holds a manifest but not the files it names.

torch and transformers are imported inside the functions that need them, never at import time.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sllm.errors import ConflictError, InvalidRequestError, NotFoundError, SllmError
from sllm.paths import backend_root
from sllm.store import layout
from sllm.store.loader import MANIFEST_NAME

Progress = Callable[[str], None]

HUB_TIMEOUT_ENV = "SLLM_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT_S = 10.0
# Top-level files worth downloading from a hub repo; weights are picked separately.
_HUB_META_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


class HubUnreachableError(SllmError):
    """The Hugging Face hub could not be reached and the model is not in the local HF cache."""

    status_code = 502
    error_type = "hub_unreachable_error"


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


# --- sources -------------------------------------------------------------------------------------


def _hub_timeout() -> float:
    try:
        return float(os.environ.get(HUB_TIMEOUT_ENV, DEFAULT_HUB_TIMEOUT_S))
    except ValueError:
        return DEFAULT_HUB_TIMEOUT_S


def _unreachable(model: str, why: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"could not reach the Hugging Face hub to download {model} ({why}); "
        "pass --local-model-path with a transformers directory or a .gguf file instead.",
        param="model",
    )


def download_from_hub(model: str, progress: Progress | None = None) -> tuple[Path, dict[str, Any]]:
    """Snapshot `model` from the hub (or the local HF cache when offline); (dir, source)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(
        os.environ.get("TRANSFORMERS_OFFLINE")
    )
    info = None
    why = "HF_HUB_OFFLINE is set" if offline else ""
    if not offline:
        _say(progress, f"contacting the Hugging Face hub for {model}")
        try:
            # A short, explicit timeout: the hub client's own metadata calls have none, so an
            # unreachable (not refused) network would otherwise hang.
            info = HfApi().model_info(model, timeout=_hub_timeout(), files_metadata=False)
        except HFValidationError as e:
            raise InvalidRequestError(
                f"`model`={model!r} is not a valid hub repo id: {e}", param="model"
            ) from e
        except GatedRepoError as e:
            raise InvalidRequestError(
                f"{model} is gated on the hub; log in with a token that has access, or pass "
                "--local-model-path.",
                param="model",
            ) from e
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise NotFoundError(
                f"{model} was not found on the Hugging Face hub (or is private).", param="model"
            ) from e
        except (TypeError, AttributeError, NameError):
            raise  # our bug or an incompatible huggingface_hub, not the network
        except Exception as e:  # connection refused, DNS, timeouts, 5xx: all "unreachable"
            why = f"{type(e).__name__}: {e}".strip().rstrip(":")

    if info is not None:
        names = [s.rfilename for s in (info.siblings or [])]
        weights = "*.safetensors" if any(n.endswith(".safetensors") for n in names) else "*.bin"
        _say(progress, f"downloading {model} ({weights} weights)")
        try:
            path = snapshot_download(
                model,
                allow_patterns=[*_HUB_META_PATTERNS, weights],
                ignore_patterns=["*/*"],
                revision=info.sha,
                etag_timeout=_hub_timeout(),
            )
        except Exception as e:
            raise _unreachable(model, f"download failed: {type(e).__name__}: {e}") from e
        return Path(path), {"kind": "hub", "repo_id": model, "revision": info.sha}

    # Offline or unreachable: a previous download in the local HF cache still works.
    try:
        path = snapshot_download(model, local_files_only=True)
    except Exception as e:
        raise _unreachable(model, why or "offline") from e
    _say(progress, f"hub unreachable; using the cached snapshot of {model}")
    revision = Path(path).name
    return Path(path), {"kind": "hub", "repo_id": model, "revision": revision, "cached": True}


def _load_error(source: str, e: Exception) -> InvalidRequestError:
    return InvalidRequestError(
        f"could not load {source} as a transformers causal language model: {type(e).__name__}: {e}",
        param="local_model_path",
    )


def load_source(path: Path, gguf_file: str | None = None):
    """(model, tokenizer) from a transformers dir, or from `path/gguf_file`, on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    what = str(path / gguf_file) if gguf_file else str(path)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {"dtype": "auto"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise _load_error(what, e) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, **({"gguf_file": gguf_file} if gguf_file else {})
        )
    except Exception as e:
        raise InvalidRequestError(
            f"could not load a tokenizer from {what}: {type(e).__name__}: {e}",
            param="local_model_path",
        ) from e
    if gguf_file:
        # GGUF weights come back dequantized, but the model still claims to be quantized and
        # save_pretrained refuses ("quantized with gguf"). It is a plain model now: say so.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
    return model, tokenizer


def _classify_local(local_model_path: str | Path) -> tuple[Path, str | None, dict[str, Any]]:
    """(dir, gguf file name or None, source) for a --local-model-path value."""
    p = Path(local_model_path).expanduser()
    if not p.exists():
        raise InvalidRequestError(
            f"`local_model_path`={str(local_model_path)!r} does not exist.",
            param="local_model_path",
        )
    p = p.resolve()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise InvalidRequestError(
                f"`local_model_path`={str(p)!r} is a file but not a .gguf file; pass a .gguf file "
                "or a transformers model directory.",
                param="local_model_path",
            )
        return p.parent, p.name, {"kind": "gguf", "path": str(p)}
    if not (p / "config.json").is_file():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        hint = f" It holds {', '.join(ggufs)}: pass that file instead." if ggufs else ""
        raise InvalidRequestError(
            f"`local_model_path`={str(p)!r} is not a transformers model directory "
            f"(no config.json).{hint}",
            param="local_model_path",
        )
    return p, None, {"kind": "local_dir", "path": str(p)}


# --- checks on the target ------------------------------------------------------------------------


def _check_target(root: Path, target: Path, name: str) -> None:
    """Refuse targets that would nest a model inside another or clobber foreign content."""
    for parent in target.parents:
        if parent == root or root not in parent.parents:
            break
        if parent.exists() and not parent.is_dir():
            raise ConflictError(f"cannot save {name}: {parent} is a file.", param="model")
        if layout.has_manifest(parent):
            raise ConflictError(
                f"cannot save {name} inside the stored model "
                f"{parent.relative_to(root).as_posix()}.",
                param="model",
            )
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise ConflictError(f"cannot save {name}: {target} exists and is not a directory.")
    if (target / layout.ADAPTER_CONFIG).is_file() and not layout.has_manifest(target):
        raise ConflictError(f"cannot save {name}: {target} holds a LoRA adapter.", param="model")
    subdirs = sorted(c.name for c in target.iterdir() if c.is_dir())
    if subdirs:
        raise ConflictError(
            f"cannot save {name}: {target} already holds other entries "
            f"({', '.join(subdirs[:5])}); move or delete them first.",
            param="model",
        )


def _commit(root: Path, tmp: Path, target: Path, name: str) -> None:
    """Rename the finished scratch dir into place, moving any older copy aside first."""
    with layout.store_lock(root):
        _check_target(root, target, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            aside = layout.scratch_dir(root, layout.OLD_PREFIX)
            os.replace(target, aside)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(aside, target)
                raise
            layout.fsync_dir(target.parent)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, target)
            layout.fsync_dir(target.parent)


# --- the save ------------------------------------------------------------------------------------


def _write_model(model, tokenizer, out: Path) -> None:
    from transformers import GenerationConfig

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not (out / "generation_config.json").is_file():
        GenerationConfig.from_model_config(model.config).save_pretrained(out)


def _dtype_name(model) -> str:
    dtype = getattr(model, "dtype", None)
    if dtype is None:
        dtype = next(model.parameters()).dtype
    return str(dtype).removeprefix("torch.")


def build_manifest(
    directory: Path,
    *,
    name: str,
    backend: str,
    source: dict[str, Any],
    dtype: str,
    parameter_count: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    files = layout.file_entries(directory, fsync=True)
    manifest: dict[str, Any] = {
        "name": name,
        "backend": backend,
        "format_version": layout.FORMAT_VERSION,
        "created_time": datetime.now(timezone.utc).isoformat(),
        "source": source,
        "dtype": dtype,
        "parameter_count": int(parameter_count),
        "size_bytes": sum(f["size"] for f in files),
        "files": files,
        "checksum": layout.combined_checksum(files),
    }
    if extra:
        manifest.update(extra)
    return manifest


def save_model(
    model: str,
    storage: Path,
    backend: str = "transformers",
    local_model_path: str | Path | None = None,
    progress: Progress | None = None,
    *,
    source: dict[str, Any] | None = None,
) -> Path:
    """Store `model` as `<storage>/<backend>/<model>/` and return that directory.

    Without `local_model_path` the model is downloaded from the Hugging Face hub (failing fast
    with `HubUnreachableError` when offline). `local_model_path` may be a transformers model
    directory or a `.gguf` file (dequantized and saved as safetensors). `source` overrides the
    manifest's record of where the model came from (used for cached conversions). An existing
    model of the same name is replaced atomically.
    """
    storage = Path(storage)
    name, target = layout.resolve_model(storage, model, backend)
    root = backend_root(storage, backend).resolve()
    _check_target(root, target, name)  # fail before the expensive part; checked again at commit
    root.mkdir(parents=True, exist_ok=True)
    layout.clean_stale(root)

    if local_model_path is None:
        src_dir, recorded = download_from_hub(name, progress)
        gguf_file = None
    else:
        src_dir, gguf_file, recorded = _classify_local(local_model_path)
    if source is not None:
        recorded = source

    what = "converting GGUF" if gguf_file else "loading"
    _say(progress, f"{what} {src_dir / gguf_file if gguf_file else src_dir}")
    lm, tokenizer = load_source(src_dir, gguf_file)
    parameter_count = sum(p.numel() for p in lm.parameters())
    dtype = _dtype_name(lm)

    extra: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        _say(progress, f"writing safetensors ({parameter_count:,} parameters, {dtype})")
        _write_model(lm, tokenizer, tmp)
        # after save_pretrained, which fills in `architectures` for GGUF-loaded configs
        extra["architectures"] = list(getattr(lm.config, "architectures", None) or [])
        extra["model_type"] = getattr(lm.config, "model_type", None)

    _finish(root, target, name, fill, backend, recorded, dtype, parameter_count, extra, progress)
    return target


def save_prepared_dir(
    model: str,
    storage: Path,
    src_dir: Path,
    *,
    source: dict[str, Any],
    dtype: str,
    parameter_count: int,
    extra: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Store an already-converted transformers directory by copying its top-level files verbatim.

    For directories this package wrote itself (the converted-GGUF cache): no torch import, no
    re-serialisation, just copy, hash and commit. Files starting with '.' or `sllm_` are skipped.
    """
    storage = Path(storage)
    name, target = layout.resolve_model(storage, model)
    root = backend_root(storage, "transformers").resolve()
    _check_target(root, target, name)
    root.mkdir(parents=True, exist_ok=True)
    layout.clean_stale(root)
    files = sorted(
        p for p in Path(src_dir).iterdir() if p.is_file() and not p.name.startswith((".", "sllm_"))
    )
    if not any(p.suffix == ".safetensors" for p in files):
        raise InvalidRequestError(f"{src_dir} holds no safetensors weights.")

    def fill(tmp: Path) -> None:
        _say(progress, f"copying {len(files)} files from {src_dir}")
        for p in files:
            shutil.copyfile(p, tmp / p.name)

    _finish(
        root, target, name, fill, "transformers", source, dtype, parameter_count, extra, progress
    )
    return target


def _finish(
    root: Path,
    target: Path,
    name: str,
    fill: Callable[[Path], None],
    backend: str,
    source: dict[str, Any],
    dtype: str,
    parameter_count: int,
    extra: dict[str, Any] | None,
    progress: Progress | None,
) -> None:
    """Fill a scratch dir, hash it, write the manifest last and rename it into place."""
    started = time.monotonic()
    tmp = layout.scratch_dir(root)
    try:
        tmp.mkdir()
        fill(tmp)
        layout.normalise_permissions(tmp)
        _say(progress, "hashing files")
        manifest = build_manifest(
            tmp,
            name=name,
            backend=backend,
            source=source,
            dtype=dtype,
            parameter_count=parameter_count,
            extra=extra,
        )
        # The manifest goes in last: until it exists nothing treats the directory as a model.
        layout.write_json_durably(tmp / MANIFEST_NAME, manifest)
        layout.fsync_dir(tmp)
        _say(progress, f"moving into place at {target} ({time.monotonic() - started:.1f}s)")
        _commit(root, tmp, target, name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
