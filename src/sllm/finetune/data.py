"""Training data for the `peft_lora` backend: where it may come from, loading it, tokenizing it.

`check_*` functions run in the API server (no heavy imports); `load_training_dataset` and
`tokenize_dataset` run in the job's worker.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

from sllm.errors import InvalidRequestError
from sllm.finetune.config import (
    DatasetConfig,
    P,
    check_dataset_extras,
    normalise_extension,
)

DS = f"{P}.dataset_config"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _roots_text(roots: list[Path]) -> str:
    if not roots:
        return "none are configured"
    return ", ".join(str(r) for r in roots)


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _outside_roots_error(path: str, resolved: Path, roots: list[Path], param: str):
    return InvalidRequestError(
        f"`{param}`: {path!r} (resolved to {resolved}) is outside the data roots this server may "
        f"read from ({_roots_text(roots)}). Move the file under one of them, or start the server "
        "with `--data-root DIR` to allow another directory.",
        param=param,
    )


def resolve_local_files(
    data_files: str | list[str], roots: list[Path], *, cwd: Path | None = None
) -> list[str]:
    """Absolute, symlink-resolved files for `data_files`; each must exist inside `roots`.

    Relative paths resolve against `cwd` (default: the current working directory); globs are
    expanded (each must match at least one file).
    """
    param = f"{DS}.data_files"
    entries = [data_files] if isinstance(data_files, str) else list(data_files)
    entries = [e for e in entries if e and e.strip()]
    if not entries:
        raise InvalidRequestError(
            f"`{param}` must name at least one file for a local dataset.", param=param
        )
    base = Path(cwd) if cwd is not None else Path(os.getcwd())
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    out: list[str] = []
    for entry in entries:
        raw = Path(entry).expanduser()
        absolute = raw if raw.is_absolute() else base / raw
        if _GLOB_CHARS.search(entry):
            matches = sorted(glob.glob(str(absolute), recursive=True))
            candidates = [Path(m) for m in matches if Path(m).is_file()]
            if not candidates:
                raise InvalidRequestError(
                    f"`{param}`: the pattern {entry!r} matches no file (looked for {absolute}).",
                    param=param,
                )
        else:
            candidates = [absolute]
        for candidate in candidates:
            real = candidate.resolve()
            if not _inside(real, resolved_roots):
                raise _outside_roots_error(entry, real, resolved_roots, param)
            if not real.is_file():
                what = "is a directory" if real.is_dir() else "does not exist"
                raise InvalidRequestError(
                    f"`{param}`: {entry!r} {what} (looked for {real}); give the path of a data "
                    "file, absolute or relative to the server's working directory.",
                    param=param,
                )
            if real.stat().st_size == 0:
                raise InvalidRequestError(
                    f"`{param}`: {entry!r} is empty ({real}); nothing to train on.", param=param
                )
            out.append(str(real))
    return out


def check_hf_dataset_name(name: str | None, roots: list[Path], *, cwd: Path | None = None) -> str:
    """A Hub id stays as given; a local directory must be inside `roots` and becomes absolute."""
    param = f"{DS}.hf_dataset_name"
    if not name or not name.strip():
        raise InvalidRequestError(
            f"`{param}` is required when dataset_source is 'hf_hub' (e.g. "
            "'fka/awesome-chatgpt-prompts').",
            param=param,
        )
    name = name.strip()
    base = Path(cwd) if cwd is not None else Path(os.getcwd())
    raw = Path(name).expanduser()
    local = raw if raw.is_absolute() else base / raw
    looks_local = raw.is_absolute() or name.startswith((".", "~")) or local.exists()
    if looks_local:
        real = local.resolve()
        resolved_roots = [Path(r).expanduser().resolve() for r in roots]
        if not _inside(real, resolved_roots):
            raise _outside_roots_error(name, real, resolved_roots, param)
        if not real.is_dir():
            raise InvalidRequestError(
                f"`{param}`: {name!r} is not a dataset directory (looked for {real}). For single "
                "files use dataset_source 'local' with data_files and extension_type.",
                param=param,
            )
        return str(real)
    if name.startswith(("hf://", "buckets/")) or _HUB_ID.match(name):
        return name
    raise InvalidRequestError(
        f"`{param}`: {name!r} is neither a Hub dataset id ('owner/name') nor an existing "
        "directory inside the data roots.",
        param=param,
    )


def check_dataset_config(
    ds: DatasetConfig, roots: list[Path], *, cwd: Path | None = None
) -> dict[str, Any]:
    """Validate and normalise a dataset config (paths made absolute); returns a plain dict."""
    local = ds.dataset_source == "local"
    extras = ds.extras()
    check_dataset_extras(extras, local=local)
    out = ds.model_dump()
    if local:
        out["extension_type"] = normalise_extension(ds.extension_type)
        files = resolve_local_files(ds.data_files, roots, cwd=cwd)
        out["data_files"] = (
            files[0] if isinstance(ds.data_files, str) and len(files) == 1 else files
        )
    else:
        out["hf_dataset_name"] = check_hf_dataset_name(ds.hf_dataset_name, roots, cwd=cwd)
        files = ds.data_files if isinstance(ds.data_files, list) else [ds.data_files]
        for f in files:
            if f and (os.path.isabs(f) or ".." in Path(f).parts):
                raise InvalidRequestError(
                    f"`{DS}.data_files` for an hf_hub dataset must be relative paths or patterns "
                    f"inside the dataset repository, got {f!r}.",
                    param=f"{DS}.data_files",
                )
    return out


def describe_dataset(ds: DatasetConfig) -> dict[str, Any]:
    """The dataset as recorded in training_metadata.json."""
    desc: dict[str, Any] = {
        "source": ds.dataset_source,
        "split": ds.split,
        "tokenization_field": ds.tokenization_field,
    }
    if ds.dataset_source == "local":
        desc["data_files"] = ds.data_files
        desc["extension_type"] = ds.extension_type
    else:
        desc["name"] = ds.hf_dataset_name
        if ds.data_files:
            desc["data_files"] = ds.data_files
    return desc


# ---------------------------------------------------------------------------------------------
# worker side


def load_training_dataset(ds: DatasetConfig):
    """`datasets.load_dataset` for the config: the split asked for, as a `datasets.Dataset`."""
    from datasets import load_dataset

    extras = ds.extras()
    try:
        if ds.dataset_source == "local":
            dataset = load_dataset(
                normalise_extension(ds.extension_type),
                data_files=ds.data_files,
                split=ds.split,
                **extras,
            )
        else:
            if ds.data_files:
                extras["data_files"] = ds.data_files
            dataset = load_dataset(ds.hf_dataset_name, split=ds.split, **extras)
    except StopIteration:  # what `datasets` raises for an empty local file
        raise InvalidRequestError(
            f"The dataset is empty ({describe_dataset(ds)}); nothing to train on.", param=DS
        ) from None
    except ValueError as exc:
        if "split" in str(exc).lower() and "unknown" in str(exc).lower():
            raise InvalidRequestError(f"`{DS}.split`: {exc}", param=f"{DS}.split") from None
        raise
    if not hasattr(dataset, "column_names") or not hasattr(dataset, "__len__"):
        raise InvalidRequestError(
            f"`{DS}.split` must name a single split (got {ds.split!r}, which loaded "
            f"{type(dataset).__name__}).",
            param=f"{DS}.split",
        )
    return dataset


def tokenize_dataset(dataset, tokenizer, field: str, max_seq_length: int, *, num_proc: int = 1):
    """Tokenize column `field` (truncated to `max_seq_length`); drop empty rows and all columns.

    Raises `InvalidRequestError` when the column is missing, holds non-text, or nothing is left.
    """
    param = f"{DS}.tokenization_field"
    columns = list(dataset.column_names)
    if field not in columns:
        raise InvalidRequestError(
            f"`{param}`: the dataset has no column {field!r}; available columns: "
            f"{', '.join(map(repr, columns)) or '(none)'}.",
            param=param,
        )
    if len(dataset) == 0:
        raise InvalidRequestError(
            f"The dataset is empty (split {dataset.split!s}); nothing to train on.",
            param=f"{DS}",
        )

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = batch[field]
        for value in texts:
            if value is not None and not isinstance(value, str):
                raise InvalidRequestError(
                    f"`{param}`: column {field!r} must hold text, found a "
                    f"{type(value).__name__} value ({str(value)[:80]!r}).",
                    param=param,
                )
        enc = tokenizer(
            [t or "" for t in texts],
            truncation=True,
            max_length=max_seq_length,
            add_special_tokens=True,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    tokenized = dataset.map(
        tokenize,
        batched=True,
        remove_columns=columns,
        num_proc=num_proc if num_proc > 1 and len(dataset) >= 10_000 else None,
        desc="Tokenizing",
    )
    tokenized = tokenized.filter(lambda ex: sum(ex["attention_mask"]) > 1, desc="Dropping empty")
    if len(tokenized) == 0:
        raise InvalidRequestError(
            f"`{param}`: every row of column {field!r} is empty after tokenization; nothing to "
            "train on.",
            param=param,
        )
    return tokenized
