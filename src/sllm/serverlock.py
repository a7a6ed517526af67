"""One server per storage path: an exclusive `flock` on `$STORAGE_PATH/sllm.lock`.

Two servers on one store would each treat the other's running jobs as left over from a crash
(re-queue them, kill their workers) and double-book the same CPUs and GPUs. The lock belongs to
the open file, so the kernel releases it the moment its holder dies, SIGKILL included: there is
never a stale lock to delete by hand. The holder writes its pid, host and port into the file so
that a refused second server can say who holds the store.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sllm.errors import ConflictError

LOCK_NAME = "sllm.lock"


class StorageInUseError(ConflictError):
    """Another live process holds the server lock of this storage path."""


class ServerLock:
    """The held lock; `release()` (or the process's exit) frees it."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def lock_path(storage: Path) -> Path:
    return Path(storage) / LOCK_NAME


def read_holder(storage: Path) -> dict[str, Any]:
    """What the current (or last) holder wrote about itself; {} when unknown."""
    try:
        data = json.loads(lock_path(storage).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def acquire_server_lock(storage: Path, *, host: str, port: int) -> ServerLock:
    """Take the storage path's server lock without waiting, or raise `StorageInUseError`
    naming the holder (pid, host, port, start time)."""
    import fcntl

    storage = Path(storage)
    storage.mkdir(parents=True, exist_ok=True)
    path = lock_path(storage)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StorageInUseError(_in_use_message(storage, read_holder(storage))) from None
    except BaseException:
        os.close(fd)
        raise
    me = {
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "host": host,
        "port": port,
        "started_time": datetime.now(timezone.utc).isoformat(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return ServerLock(fd, path)


def _in_use_message(storage: Path, holder: dict[str, Any]) -> str:
    if holder.get("pid"):
        who = (
            f"the sllm server with pid {holder['pid']} on {holder.get('hostname', '?')}, "
            f"listening on {holder.get('host', '?')}:{holder.get('port', '?')} "
            f"(started {holder.get('started_time', '?')})"
        )
    else:
        who = "another sllm server"
    return (
        f"the storage path {storage} is already in use by {who}. One server per storage path: "
        f"stop that server first, use it (LLM_SERVER_URL=http://{holder.get('host', '127.0.0.1')}"
        f":{holder.get('port', 8343)}), or start this one with another --storage-path."
    )
