"""How models sit on disk under `$STORAGE_PATH/<backend>/`: names, manifests, locks, scratch dirs.

A stored model is a directory `<backend root>/<name>/` (names may nest: `facebook/opt-125m`) that
holds `sllm_manifest.json`. The manifest is written last, inside a scratch directory that is then
renamed into place, so a directory without a manifest is never a model.

Scratch directories live directly in the backend root and start with a dot, so listings skip them:

    .tmp-<pid>-<hex>-<host>   a save in progress (or one that crashed)
    .old-<pid>-<hex>-<host>   a replaced model waiting to be removed
    .lock                     serialises the final renames of concurrent saves and deletes

A crashed process leaves such directories behind; `clean_stale` removes those whose process is gone
(same host) or that are older than a day (any host, e.g. another container sharing the volume).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sllm.errors import InvalidRequestError
from sllm.paths import backend_root, model_dir
from sllm.store.loader import MANIFEST_NAME

FORMAT_VERSION = 1
SUPPORTED_BACKENDS = ("transformers",)
ADAPTER_CONFIG = "adapter_config.json"
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
SCRATCH_PREFIXES = (TMP_PREFIX, OLD_PREFIX)  # what `clean_stale` removes
STALE_AFTER_S = 24 * 3600


def check_backend(backend: str) -> str:
    if backend not in SUPPORTED_BACKENDS:
        raise InvalidRequestError(
            f"`backend`={backend!r} is not supported; the store only holds "
            f"{', '.join(repr(b) for b in SUPPORTED_BACKENDS)} models.",
            param="backend",
        )
    return backend


def resolve_model(storage: Path, model: str, backend: str = "transformers") -> tuple[str, Path]:
    """(canonical name, directory) of `model`; refuses escaping, hidden and reserved names."""
    check_backend(backend)
    if not isinstance(model, str):
        raise InvalidRequestError("`model` must be a string.", param="model")
    target = model_dir(Path(storage), model, backend)
    root = backend_root(Path(storage), backend).resolve()
    name = target.relative_to(root).as_posix()
    check_own_names(name, param="model", given=model)
    return name, target


RESERVED_COMPONENTS = ("_jobs", "_serve", "_files")  # job/instance scratch, uploaded files


def own_name_problem(part: str) -> str | None:
    """Why a path component is a name the store keeps for itself, or None.

    Every component starting with '.' is the store's: its scratch directories (`.tmp-*` for a
    save in progress, `.old-*` for a replaced model or adapter) are deleted by `clean_stale` on
    the next save, and `.lock` is its lock file; `_jobs` and `_serve` hold job and instance
    scratch. Models and adapters written under such a name would vanish (or hide) while the store
    still reported them saved. The one rule for job output dirs, stored models and deployments.
    """
    if part in RESERVED_COMPONENTS:
        return (
            f"{part!r} is the name of the store's own directory for job and instance scratch or "
            "uploaded files"
        )
    if part.startswith("."):
        return (
            f"the path component {part!r} starts with '.', which the store keeps for itself (its "
            f"scratch directories {TMP_PREFIX}* and {OLD_PREFIX}* are removed on the next save)"
        )
    return None


def check_own_names(name: str, *, param: str, given: str | None = None) -> None:
    """Refuse a path (relative to a backend root) that uses a name the store keeps for itself."""
    for part in name.split("/"):
        problem = own_name_problem(part)
        if problem:
            raise InvalidRequestError(
                f"`{param}`={given if given is not None else name!r}: {problem}; choose another "
                "name.",
                param=param,
            )


def has_manifest(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def is_model_dir(path: Path) -> bool:
    """A complete stored model: a directory with a manifest that is not a LoRA adapter."""
    return path.is_dir() and has_manifest(path) and not (path / ADAPTER_CONFIG).is_file()


# --- hashing -------------------------------------------------------------------------------------


def sha256_file(path: Path, *, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def combined_checksum(files: Iterable[dict[str, Any]]) -> str:
    """sha256 over the sorted (path, sha256) pairs, one `"<path>\\0<sha256>\\n"` line each."""
    h = hashlib.sha256()
    for path, digest in sorted((f["path"], f["sha256"]) for f in files):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()


def file_entries(directory: Path, *, fsync: bool = False) -> list[dict[str, Any]]:
    """[{path, size, sha256}] for every file below `directory` except the manifest, sorted."""
    entries = []
    for p in sorted(directory.rglob("*")):
        if not p.is_file() or p.name == MANIFEST_NAME and p.parent == directory:
            continue
        entries.append(
            {
                "path": p.relative_to(directory).as_posix(),
                "size": p.stat().st_size,
                "sha256": sha256_file(p, fsync=fsync),
            }
        )
    return entries


def write_json_durably(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def normalise_permissions(directory: Path) -> None:
    """Give written files the usual umask-derived mode (some writers create them 0600), so that
    other users or containers sharing the store can read them."""
    file_mode = 0o666 & ~_umask()
    for p in directory.rglob("*"):
        if p.is_file() and not p.is_symlink():
            with contextlib.suppress(OSError):
                p.chmod(file_mode)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h


@functools.cache
def _renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or a libc older than glibc 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`).

    Readers of either path see the old entry or the new one, never none. Returns False, changing
    nothing, where the platform or filesystem cannot do it; callers then fall back to two renames.
    """
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# --- scratch directories and the lock ------------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def scratch_dir(root: Path, prefix: str = TMP_PREFIX) -> Path:
    """A fresh, not-yet-created scratch path in `root` (same filesystem as the models)."""
    return root / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:12]}-{_host()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _is_stale(entry: Path, now: float) -> bool:
    for prefix in SCRATCH_PREFIXES:
        if entry.name.startswith(prefix):
            rest = entry.name[len(prefix) :]
            break
    else:
        return False
    parts = rest.split("-", 2)
    try:
        age = now - entry.lstat().st_mtime
    except FileNotFoundError:
        return False
    if len(parts) == 3 and parts[0].isdigit() and parts[2] == _host():
        pid = int(parts[0])
        if pid == os.getpid():
            return False  # maybe another thread of ours; it cleans up after itself
        return not _pid_alive(pid)
    return age > STALE_AFTER_S


def clean_stale(root: Path) -> list[Path]:
    """Remove scratch directories left behind by crashed saves; returns what was removed."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for entry in root.iterdir():
        if _is_stale(entry, now):
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    return removed


@contextlib.contextmanager
def store_lock(root: Path) -> Iterator[None]:
    """An exclusive advisory lock on `<root>/.lock` (no-op where fcntl is missing)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(root / LOCK_NAME, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def iter_model_dirs(root: Path) -> Iterator[Path]:
    """Directories below `root` that hold a manifest; skips scratch dirs and adapters."""
    if not root.is_dir():
        return
    stack = [root]
    while stack:
        current = stack.pop()
        try:
            children = sorted(current.iterdir(), reverse=True)
        except OSError:
            continue
        for child in children:
            if child.name.startswith(".") or child.is_symlink() or not child.is_dir():
                continue
            if (child / ADAPTER_CONFIG).is_file():
                continue
            if has_manifest(child):
                yield child
            else:
                stack.append(child)
