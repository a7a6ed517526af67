"""Training data for the `peft_lora` backend: where it may come from, loading it, tokenizing it.

`check_*` functions run in the API server (`datasets` and `huggingface_hub` imported lazily, for
builder names and caches; the data's own shape is `sllm.finetune.datascan`'s);
`load_training_dataset` runs in the job's worker (`sllm.finetune.formats` tokenizes the rows).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sllm.errors import InvalidRequestError
from sllm.finetune.config import (
    DS,
    DatasetConfig,
    check_dataset_extras,
    normalise_extension,
    packaged_builders,
)
from sllm.finetune.datascan import check_local_data
from sllm.paths import db_path, files_dir, jobs_dir

_FILE_ID = re.compile(r"^file-[0-9a-f]{8,64}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _roots_text(roots: list[Path]) -> str:
    if not roots:
        return "none are configured"
    return ", ".join(str(r) for r in roots)


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _outside_roots_error(path: str, roots: list[Path], param: str):
    # The resolved path is not shown: it may name places outside the roots (a symlink's target).
    return InvalidRequestError(
        f"`{param}`: {path!r} is outside the data roots this server may read from "
        f"({_roots_text(roots)}). Move the file under one of them, or start the server with "
        "`--data-root DIR` to allow another directory.",
        param=param,
    )


def _store_internal(real: Path, storage: Path | None) -> bool:
    """The store's own files: its database (and its journal files), its lock, the jobs'
    scratch and the instances' logs."""
    if storage is None:
        return False
    store = Path(storage).expanduser().resolve()
    if real != store and store not in real.parents:
        return False
    parts = real.relative_to(store).parts
    return bool(parts) and (
        parts[0] in (jobs_dir(store).name, "_serve", "_files", "sllm.lock")
        or parts[0].startswith(db_path(store).name)
    )


def _hidden(real: Path, roots: list[Path]) -> bool:
    """A dot-file, or a file under a dot-directory, below the data root that holds it (the
    store's scratch and lock files, editors' and tools' private files)."""
    holding = [root for root in roots if real == root or root in real.parents]
    if not holding:
        return False
    closest = max(holding, key=lambda root: len(root.parts))  # a root may live in a dot-dir
    return any(part.startswith(".") for part in real.relative_to(closest).parts)


def check_data_path(
    entry: str, real: Path, roots: list[Path], param: str, *, storage: Path | None = None
) -> None:
    """`real` (resolved) may be read as training data: inside a data root, not hidden, not one
    of the store's own files."""
    if not _inside(real, roots):
        raise _outside_roots_error(entry, roots, param)
    if _store_internal(real, storage) or _hidden(real, roots):
        raise InvalidRequestError(
            f"`{param}`: {entry!r} is one of the store's own files or a hidden (dot) file; "
            "those are never training data. Put the data in a visible file under a data root.",
            param=param,
        )


def resolve_local_files(
    data_files: str | list[str],
    roots: list[Path],
    *,
    cwd: Path | None = None,
    storage: Path | None = None,
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
            candidates = [
                Path(m)
                for m in matches
                if Path(m).is_file()
                and not _store_internal(Path(m).resolve(), storage)
                and not _hidden(Path(m).resolve(), resolved_roots)
            ]  # a pattern skips the store's own files; naming one is refused below
            if not candidates:
                raise InvalidRequestError(
                    f"`{param}`: the pattern {entry!r} matches no data file.", param=param
                )
        else:
            candidates = [absolute]
        for candidate in candidates:
            real = candidate.resolve()
            check_data_path(entry, real, resolved_roots, param, storage=storage)
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


def check_hf_dataset_name(
    name: str | None,
    roots: list[Path],
    *,
    cwd: Path | None = None,
    storage: Path | None = None,
) -> str:
    """A Hub id stays as given; a local directory must be inside `roots` and becomes absolute.

    A packaged builder name (`json`, `csv`, `text`, `imagefolder`, ...) is refused: with
    `data_files` it would read any file the server can read; `dataset_source: local` holds
    such files to the data roots.
    """
    param = f"{DS}.hf_dataset_name"
    if not name or not name.strip():
        raise InvalidRequestError(
            f"`{param}` is required when dataset_source is 'hf_hub' (e.g. "
            "'fka/awesome-chatgpt-prompts').",
            param=param,
        )
    name = name.strip()
    if name.lower() in packaged_builders():
        raise InvalidRequestError(
            f"`{param}`: {name!r} is a file format, not a dataset. For files, use "
            "dataset_source 'local' with `data_files` and `extension_type` (json, csv, parquet "
            "or text); the files must lie inside the server's data roots.",
            param=param,
        )
    base = Path(cwd) if cwd is not None else Path(os.getcwd())
    raw = Path(name).expanduser()
    local = raw if raw.is_absolute() else base / raw
    looks_local = raw.is_absolute() or name.startswith((".", "~")) or local.exists()
    if looks_local:
        real = local.resolve()
        resolved_roots = [Path(r).expanduser().resolve() for r in roots]
        check_data_path(name, real, resolved_roots, param, storage=storage)
        store = Path(storage).expanduser().resolve() if storage is not None else None
        if store is not None and (real == store or real in store.parents):
            raise InvalidRequestError(
                f"`{param}`: {name!r} contains the whole store (its database and job scratch "
                "among it); point at the directory that holds only the dataset.",
                param=param,
            )
        if not real.is_dir():
            raise InvalidRequestError(
                f"`{param}`: {name!r} is not a dataset directory. For single files use "
                "dataset_source 'local' with data_files and extension_type.",
                param=param,
            )
        _check_dataset_dir(name, real, resolved_roots, param, storage)
        return str(real)
    if name.startswith(("hf://", "buckets/")) or (
        _HUB_ID.match(name) and not {".", ".."} & set(name.split("/"))
    ):
        return name
    raise InvalidRequestError(
        f"`{param}`: {name!r} is neither a Hub dataset id ('owner/name') nor an existing "
        "directory inside the data roots.",
        param=param,
    )


MAX_DATASET_DIR_ENTRIES = 100_000


def _check_dataset_dir(
    name: str, real: Path, roots: list[Path], param: str, storage: Path | None
) -> None:
    """Nothing in a dataset directory leads out of the data roots (a symlink to /etc, say) or
    into the store's own files; `datasets` would read every data file below it."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(real):
        for entry in [*dirnames, *filenames]:
            seen += 1
            if seen > MAX_DATASET_DIR_ENTRIES:
                raise InvalidRequestError(
                    f"`{param}`: {name!r} holds more than {MAX_DATASET_DIR_ENTRIES} files; "
                    "point at a smaller directory or list the files in `data_files`.",
                    param=param,
                )
            path = Path(dirpath) / entry
            if path.is_symlink():
                shown = f"{name}/{path.relative_to(real)}"
                check_data_path(shown, path.resolve(), roots, param, storage=storage)


def _hub_offline() -> bool:
    import huggingface_hub.constants

    offline = bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    try:
        import datasets.config

        offline = offline or bool(datasets.config.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    return offline


def hub_dataset_cached(name: str) -> bool:
    """`name` is in the datasets cache (an earlier load built it) or the Hub download cache."""
    import datasets.config
    import huggingface_hub.constants

    built = Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")
    snapshots = (
        Path(huggingface_hub.constants.HF_HUB_CACHE)
        / f"datasets--{name.replace('/', '--')}"
        / "snapshots"
    )
    return any(p.is_dir() and any(p.iterdir()) for p in (built, snapshots))


HUB_CHECK_TIMEOUT_S = 10.0


def check_hub_dataset_available(name: str, revision: str | None = None) -> None:
    """A Hub dataset the job could not load (not cached, and the Hub unreachable or without
    it) is a 400 now rather than a failed job later."""
    param = f"{DS}.hf_dataset_name"
    if _HUB_ID.match(name) and hub_dataset_cached(name):
        return
    if _hub_offline():
        raise InvalidRequestError(
            f"`{param}`: {name!r} is not in this server's datasets cache and the server is "
            "offline (HF_HUB_OFFLINE); load it once where the Hub is reachable, or put the "
            "files under a data root and use dataset_source 'local'.",
            param=param,
        )
    if not _HUB_ID.match(name):
        return  # hf:// and bucket paths: the job's loader resolves them
    from huggingface_hub import HfApi
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().dataset_info(name, revision=revision, timeout=HUB_CHECK_TIMEOUT_S)
    except GatedRepoError:
        raise InvalidRequestError(
            f"`{param}`: {name!r} is gated on the Hub and this server's token cannot read it.",
            param=param,
        ) from None
    except RevisionNotFoundError:
        raise InvalidRequestError(
            f"`{DS}.revision`: {name!r} has no revision {revision!r} on the Hub.",
            param=f"{DS}.revision",
        ) from None
    except RepositoryNotFoundError:
        raise InvalidRequestError(
            f"`{param}`: no dataset {name!r} on the Hub (or it is private); check the id.",
            param=param,
        ) from None
    except Exception as exc:  # noqa: BLE001 - network errors of every kind
        raise InvalidRequestError(
            f"`{param}`: {name!r} is not in this server's datasets cache and the Hub could not "
            f"be reached ({type(exc).__name__}); retry later, or use dataset_source 'local'.",
            param=param,
        ) from None


def check_dataset_config(
    ds: DatasetConfig,
    roots: list[Path],
    *,
    cwd: Path | None = None,
    storage: Path | None = None,
    num_cpus: int | None = None,
    summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate and normalise a dataset config (paths made absolute; the data itself read
    cheaply, see `check_local_data`); returns a plain dict. `summary`, when given, receives
    what the scan of local data saw (rows, format, estimated tokens)."""
    if ds.dataset_source == "file":
        return _check_file_dataset(ds, storage, num_cpus, summary)
    if ds.file_id is not None:
        raise InvalidRequestError(
            f"`{DS}.file_id` applies to dataset_source 'file' only.", param=f"{DS}.file_id"
        )
    local = ds.dataset_source == "local"
    extras = ds.extras()
    extension = normalise_extension(ds.extension_type) if local else None
    check_dataset_extras(extras, local=local, extension=extension, num_cpus=num_cpus)
    out = ds.model_dump()
    if local:
        out["extension_type"] = extension
        files = resolve_local_files(ds.data_files, roots, cwd=cwd, storage=storage)
        seen = check_local_data(files, extension, ds.tokenization_field, extras, ds.format)
        if summary is not None:
            summary.update(seen)
        out["data_files"] = (
            files[0] if isinstance(ds.data_files, str) and len(files) == 1 else files
        )
        return out
    name = check_hf_dataset_name(ds.hf_dataset_name, roots, cwd=cwd, storage=storage)
    out["hf_dataset_name"] = name
    files = ds.data_files if isinstance(ds.data_files, list) else [ds.data_files]
    for f in files:
        # A URL (file://, zip::..., hf://) is opened as is by `datasets`, wherever it points.
        if f and (os.path.isabs(f) or ".." in Path(f).parts or urlparse(f).scheme or "::" in f):
            raise InvalidRequestError(
                f"`{DS}.data_files` for an hf_hub dataset must be relative paths or patterns "
                f"inside the dataset repository (no URLs), got {f!r}.",
                param=f"{DS}.data_files",
            )
    if not os.path.isabs(name):
        revision = extras.get("revision")
        check_hub_dataset_available(name, revision if isinstance(revision, str) else None)
    return out


def uploaded_file_path(storage: Path, file_id: Any) -> Path:
    """Where an uploaded file's content lies; a 400 when there is no such file."""
    param = f"{DS}.file_id"
    if not isinstance(file_id, str) or not _FILE_ID.match(file_id):
        raise InvalidRequestError(
            f"`{param}` must be the id of an uploaded file (`file-...`, from `POST /v1/files`), "
            f"got {file_id!r}.",
            param=param,
        )
    path = files_dir(Path(storage)) / file_id / "content"
    if not path.is_file():
        raise InvalidRequestError(
            f"`{param}`: no uploaded file with id {file_id!r}; upload it with `POST /v1/files` "
            "(see `GET /v1/files`).",
            param=param,
        )
    return path


def _check_file_dataset(
    ds: DatasetConfig,
    storage: Path | None,
    num_cpus: int | None,
    summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`dataset_source: file`: an uploaded JSON Lines file, read where the store keeps it."""
    if storage is None:
        raise InvalidRequestError("Uploaded files need the server's store.", param=DS)
    for key in ("data_files", "hf_dataset_name"):
        if getattr(ds, key):
            raise InvalidRequestError(
                f"`{DS}.{key}` does not apply to dataset_source 'file' (the data is `file_id`).",
                param=f"{DS}.{key}",
            )
    path = uploaded_file_path(storage, ds.file_id)
    extras = ds.extras()
    check_dataset_extras(extras, local=True, extension="json", num_cpus=num_cpus)
    seen = check_local_data([str(path)], "json", ds.tokenization_field, extras, ds.format)
    if summary is not None:
        summary.update(seen)
    out = ds.model_dump()
    out.update(data_files=str(path), extension_type="json")  # what the worker's loader reads
    return out


def describe_dataset(ds: DatasetConfig) -> dict[str, Any]:
    """The dataset as recorded in training_metadata.json."""
    desc: dict[str, Any] = {
        "source": ds.dataset_source,
        "split": ds.split,
        "tokenization_field": ds.tokenization_field,
    }
    if ds.dataset_source == "file":
        desc["file_id"] = ds.file_id
    elif ds.dataset_source == "local":
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
    name = ds.hf_dataset_name or ""
    if ds.dataset_source == "hf_hub" and name.strip().lower() in packaged_builders():
        # refused at submit (it would read any file); a record from before that rule stops here
        raise InvalidRequestError(
            f"`{DS}.hf_dataset_name`: {name!r} is a file format; use dataset_source 'local'.",
            param=f"{DS}.hf_dataset_name",
        )
    _check_unmoved(ds)
    try:
        if ds.dataset_source in ("local", "file"):
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
        raise _load_error(ds, exc) from exc
    except InvalidRequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - loaders' messages may quote the file's content
        raise _load_error(ds, exc) from exc
    if not hasattr(dataset, "column_names") or not hasattr(dataset, "__len__"):
        raise InvalidRequestError(
            f"`{DS}.split` must name a single split (got {ds.split!r}, which loaded "
            f"{type(dataset).__name__}).",
            param=f"{DS}.split",
        )
    return dataset


def _check_unmoved(ds: DatasetConfig) -> None:
    """The paths validated at submit (stored resolved) still resolve to themselves: a file or
    directory swapped for a symlink since then could lead outside the data roots, which the
    worker does not know."""
    if ds.dataset_source in ("local", "file"):
        files = [ds.data_files] if isinstance(ds.data_files, str) else list(ds.data_files)
        param = f"{DS}.data_files"
    elif ds.hf_dataset_name and os.path.isabs(ds.hf_dataset_name):
        files, param = [ds.hf_dataset_name], f"{DS}.hf_dataset_name"
    else:
        return
    for f in files:
        if f and os.path.isabs(f) and os.path.realpath(f) != f:
            raise InvalidRequestError(
                f"`{param}`: {f} was replaced by a link since the job was submitted; it is not "
                "read. Submit the job again.",
                param=param,
            )


def _load_error(ds: DatasetConfig, exc: BaseException) -> InvalidRequestError:
    """A loader failure in one sentence that quotes nothing from the data (parsers put rows and
    column names of whatever file they read into their messages); the cause is in the log."""
    if ds.dataset_source == "file":
        what = f"the uploaded file {ds.file_id}"
    elif ds.dataset_source == "local":
        what = f"the {normalise_extension(ds.extension_type)} file(s) in `data_files`"
    else:
        what = "the dataset (from the Hub, its cache or its directory)"
    return InvalidRequestError(
        f"`{DS}`: {what} could not be loaded ({type(exc).__name__}); check that the data is "
        "valid and unchanged since the job was submitted.",
        param=DS,
    )
