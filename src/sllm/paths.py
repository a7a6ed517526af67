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


MAX_PATH_CHARS = 1024
MAX_COMPONENT_BYTES = 255  # NAME_MAX of Linux filesystems: a longer name fails at mkdir


def check_path_text(relative: str, *, param: str) -> None:
    """What no filesystem takes: control characters (NUL among them), unpaired surrogates, names
    longer than a directory entry can hold; a 400 instead of an OSError later."""
    if len(relative) > MAX_PATH_CHARS:
        raise InvalidRequestError(
            f"`{param}` is {len(relative)} characters long; at most {MAX_PATH_CHARS}.", param=param
        )
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in relative):
        raise InvalidRequestError(
            f"`{param}` contains a control character or an unpaired surrogate; use a plain path.",
            param=param,
        )
    for part in relative.split("/"):
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise InvalidRequestError(
                f"`{param}`: the path component {part[:40]!r}... is longer than "
                f"{MAX_COMPONENT_BYTES} bytes, the most a file name can have.",
                param=param,
            )


def resolve_inside(root: Path, relative: str, *, param: str) -> Path:
    """`root/relative`, refusing absolute paths and `..` tricks that leave `root`."""
    if not relative or not str(relative).strip():
        raise InvalidRequestError(f"`{param}` must not be empty.", param=param)
    check_path_text(str(relative), param=param)
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


def files_dir(storage: Path) -> Path:
    """Uploaded files (`POST /v1/files`): `_files/<file-id>/content`."""
    return storage / "_files"


def db_path(storage: Path) -> Path:
    return storage / "sllm.db"
