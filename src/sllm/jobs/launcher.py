"""Launchers start a job's worker somewhere and hand back a handle to watch and stop it.

`LocalLauncher` spawns `python -m sllm.jobs.worker` as a new process group (session), so a
deadline or a cancel kills the worker and every child it made. Other launchers (Ray) implement
the same two small protocols.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sllm.jobs.resources import Allocation
from sllm.procgroup import signal_group, spawn

if TYPE_CHECKING:
    from sllm.procpool import WarmPool


class WorkerHandle(Protocol):
    pid: int | None
    host: str | None

    def poll(self) -> int | None:
        """The exit code once the worker is gone, else None."""

    def terminate(self) -> None:
        """Ask the worker (and its children) to stop."""

    def kill(self) -> None:
        """Stop the worker (and its children) now."""

    def log_tail(self, lines: int = 20) -> str: ...


class Launcher(Protocol):
    def launch(
        self, job_id: str, alloc: Allocation, on_exit: Callable[[], None]
    ) -> WorkerHandle: ...


def worker_env(alloc: Allocation, base: dict[str, str] | None = None) -> dict[str, str]:
    """Pin the worker to its share: visible GPUs and thread pools sized to its CPUs."""
    env = dict(os.environ if base is None else base)
    env.pop("SLLM_API_KEY", None)  # the server's key is not the job's (nor the instance's)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in alloc.gpu_ids)
    threads = str(max(1, alloc.cpus))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = threads
    env["SLLM_NUM_CPUS"] = threads
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env["SLLM_SPAWNED_AT"] = repr(time.time())  # the process reports its start-up from here
    return env


def tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class LocalHandle:
    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        self.proc = proc
        self.pid: int | None = proc.pid
        self.host: str | None = socket.gethostname()
        self.log_path = log_path

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        signal_group(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        signal_group(self.proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        return tail(self.log_path, lines)


class LocalLauncher:
    def __init__(self, db_path: Path, jobs_dir: Path, warm: WarmPool | None = None) -> None:
        self.db_path = db_path
        self.jobs_dir = jobs_dir
        self.warm = warm  # a warm process to take, when there is one (`sllm.procpool`)

    def launch(self, job_id: str, alloc: Allocation, on_exit: Callable[[], None]) -> LocalHandle:
        job_dir = self.jobs_dir / job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        log_path = job_dir / "worker.log"
        env = worker_env(alloc)
        env["SLLM_PARENT_PID"] = str(os.getpid())
        args = ["--db", str(self.db_path), job_id]
        if self.warm is not None:
            proc = self.warm.launch("sllm.jobs.worker", args, env=env, log_path=log_path)
        else:
            cmd = [sys.executable, "-m", "sllm.jobs.worker", *args]
            proc = spawn(cmd, env=env, log_path=log_path)
        handle = LocalHandle(proc, log_path)

        def _wait() -> None:
            proc.wait()
            on_exit()

        threading.Thread(target=_wait, name=f"wait-{job_id}", daemon=True).start()
        return handle


def kill_stale_worker(pid: int | None, job_id: str) -> bool:
    """Kill the process group of a worker left over from a previous server, if it is ours: a
    fresh worker names the job on its command line; a pooled one (`python -m sllm.procpool`)
    writes its output to the job's log."""
    if not pid or not is_worker_of(pid, job_id):
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def is_worker_of(pid: int, job_id: str) -> bool:
    """Whether `pid` is the worker of `job_id`, fresh or from the warm pool (read from /proc)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"sllm.jobs.worker" in cmdline:
        return job_id.encode() in cmdline
    if b"sllm.procpool" not in cmdline:
        return False
    try:
        out = os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        return False
    return out.endswith(f"/{job_id}/worker.log")
