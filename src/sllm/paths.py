"""Where things live under the storage path, and the one check that keeps paths inside it."""

from __future__ import annotations

import os
from pathlib import Path

from sllm.errors import InvalidRequestError

DEFAULT_STORAGE_PATH = "~/.sllm/models"


def storage_path(explicit: str | os.PathLike | None = None) -> Path:
    """The flag if given, else `$STORAGE_PATH`, else ~/.sllm/models."""
    raw = explicit or os.environ.get("STORAGE_PATH") or DEFAULT_STORAGE_PATH
    return Path(raw).expanduser().resolve()


def backend_root(storage: Path, backend: str = "transformers") -> Path:
    return storage / backend


def resolve_inside(root: Path, relative: str, *, param: str) -> Path:
    """`root/relative`, refusing absolute paths and `..` tricks that leave `root`."""
    if not relative or not str(relative).strip():
        raise InvalidRequestError(f"`{param}` must not be empty.", param=param)
    if os.path.isabs(relative):
        raise InvalidRequestError(
            f"`{param}` must be a path relative to {root}, got the absolute path {relative!r}.",
            param=param,
        )
    root = root.resolve()
    target = (root / relative).resolve()
    if target == root or root not in target.parents:
        raise InvalidRequestError(
            f"`{param}`={relative!r} escapes {root}; use a relative path below it.", param=param
        )
    return target


def model_dir(storage: Path, model: str, backend: str = "transformers") -> Path:
    return resolve_inside(backend_root(storage, backend), model, param="model")


def jobs_dir(storage: Path) -> Path:
    return storage / "_jobs"


def db_path(storage: Path) -> Path:
    return storage / "sllm.db"
