"""Ask the store what it holds, and remove models from it. No torch needed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sllm.errors import ConflictError, NotFoundError
from sllm.paths import backend_root
from sllm.store import layout
from sllm.store.loader import MANIFEST_NAME
from sllm.store.usage import ModelUser, model_users


def _read(path: Path) -> dict[str, Any] | None:
    """The manifest of the model at `path`, or None when it is not a complete model."""
    if not layout.is_model_dir(path):
        return None
    try:
        data = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def has_model(storage: Path, model: str, backend: str = "transformers") -> bool:
    """True when `model` is stored completely (its directory holds a manifest)."""
    _, target = layout.resolve_model(Path(storage), model, backend)
    return layout.is_model_dir(target)


def model_checksum(storage: Path, model: str, backend: str = "transformers") -> str | None:
    """The manifest's combined checksum of `model`, or None when it is not stored."""
    _, target = layout.resolve_model(Path(storage), model, backend)
    manifest = _read(target)
    return None if manifest is None else manifest.get("checksum")


def verify_model(storage: Path, model: str, backend: str = "transformers") -> bool:
    """Re-hash the stored files and compare them with the manifest (reads every byte)."""
    name, target = layout.resolve_model(Path(storage), model, backend)
    manifest = _read(target)
    if manifest is None:
        raise NotFoundError(f"model {name} is not in the store at {target.parent}.", param="model")
    listed = manifest.get("files") or []
    try:
        actual = [
            {"path": f["path"], "sha256": layout.sha256_file(target / f["path"])} for f in listed
        ]
    except OSError:
        return False
    return all(a["sha256"] == f["sha256"] for a, f in zip(actual, listed, strict=True)) and (
        layout.combined_checksum(actual) == manifest.get("checksum")
    )


def list_models(storage: Path, backend: str = "transformers") -> list[dict[str, Any]]:
    """One entry per stored model, sorted by name; nested names (`org/name`) included."""
    layout.check_backend(backend)
    root = backend_root(Path(storage), backend)
    out = []
    for d in layout.iter_model_dirs(root):
        manifest = _read(d)
        if manifest is None:
            continue
        files = manifest.get("files") or []
        out.append(
            {
                "name": d.relative_to(root).as_posix(),
                "backend": backend,
                "path": str(d),
                "size_bytes": manifest.get("size_bytes", sum(f.get("size", 0) for f in files)),
                "parameter_count": manifest.get("parameter_count"),
                "dtype": manifest.get("dtype"),
                "created_time": manifest.get("created_time"),
                "source": manifest.get("source"),
                "checksum": manifest.get("checksum"),
            }
        )
    return sorted(out, key=lambda m: m["name"])


def _prune_empty_parents(path: Path, root: Path) -> None:
    for parent in path.parents:
        if parent == root or root not in parent.parents:
            break
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            break


def delete_model(
    storage: Path, model: str, backend: str = "transformers", *, force: bool = False
) -> list[ModelUser]:
    """Remove a stored model; NotFoundError when it is not there.

    A model that a deployment or a pending or running job uses (`sllm.store.usage`) is kept,
    with a ConflictError listing them, unless `force`; then it goes anyway and the users are
    returned, each with what its deletion breaks.

    The directory is renamed aside and removed, so it disappears at once. If it also holds
    things the store did not write (say an adapter saved inside it), only the manifest and the
    files it lists are removed and the rest is left alone.
    """
    name, target = layout.resolve_model(Path(storage), model, backend)
    root = backend_root(Path(storage), backend).resolve()
    with layout.store_lock(root):
        manifest = _read(target)
        if manifest is None:
            raise NotFoundError(
                f"model {name} is not in the store at {root}.",
                param="model",
            )
        users = model_users(Path(storage), name)
        if users and not force:
            listing = "".join(f"\n  - {u.what}" for u in users)
            raise ConflictError(
                f"{name} is in use, so it was not deleted:{listing}\nDelete the deployment "
                f"first (sllm delete {name}) and cancel the jobs or let them finish; or pass "
                "--force to delete it anyway (and break them).",
                param="model",
            )
        listed = {f["path"] for f in manifest.get("files") or []} | {MANIFEST_NAME}
        present = {p.relative_to(target).as_posix() for p in target.rglob("*") if not p.is_dir()}
        if present <= listed and not any(p.is_dir() for p in target.iterdir()):
            aside = layout.scratch_dir(root, layout.OLD_PREFIX)
            os.replace(target, aside)
            layout.fsync_dir(target.parent)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            (target / MANIFEST_NAME).unlink()  # first: from here on it is no longer a model
            for rel in sorted(listed - {MANIFEST_NAME}):
                try:
                    (target / rel).unlink()
                except FileNotFoundError:
                    pass
        _prune_empty_parents(target, root)
    return users
