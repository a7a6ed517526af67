"""The Ray actor that runs one job's worker process on whichever node Ray placed it.

It runs `python -m sllm.jobs.worker --report-path FIFO` in a new session (process group) on its
node: in a warm process of the node's pool when one fits (`sllm.cluster.nodepool`), else in a
fresh one. It hands the worker the job spec on stdin and collects its reports (progress, events,
result, error) from the FIFO; the head pulls them with `next_reports` and writes them to SQLite,
so only the head ever opens the database. `signal` stops the whole group; the worker also dies
with the actor (PR_SET_PDEATHSIG for a fresh process, a pidfd watch of the actor for a pooled
one), so when Ray kills the actor, or its node or the server's driver goes away, no training is
left running.

This module is imported on the nodes by Ray; it imports Ray only inside the actor's methods.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sllm.cluster.nodepool import PooledProcess, launch_on_node
from sllm.jobs.launcher import tail

_EOF = object()
SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL}
# Passed from the server's environment to the worker, which runs in the node's environment.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def node_env(num_cpus: int, forwarded: dict[str, str]) -> dict[str, str]:
    """The node's environment, pinned to what Ray granted: its GPUs and `num_cpus` threads."""
    import ray

    env = {**os.environ, **forwarded}
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in ray.get_gpu_ids())
    threads = str(max(1, num_cpus))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "SLLM_NUM_CPUS"):
        env[var] = threads
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env["SLLM_PARENT_PID"] = str(os.getpid())
    env["SLLM_SPAWNED_AT"] = repr(time.time())  # the process reports its start-up from here
    return env


class JobRunner:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.proc: subprocess.Popen | PooledProcess | None = None
        self.log_path: Path | None = None
        self._reports: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._fifo_dir: Path | None = None
        self._hold: int | None = None  # our own writing end: no EOF before the worker exits

    def start(
        self, spec: dict[str, Any], forwarded: dict[str, str], pool: Any = None
    ) -> dict[str, Any]:
        """Start the worker (from `pool`, the node's warm pool, when it has a process that
        fits); returns where it runs (node id, address, host name, pid, pooled)."""
        import ray

        storage = Path(spec["storage_path"])
        if not (storage / "transformers").is_dir():
            raise FileNotFoundError(
                f"the model store {storage} is not on node {socket.gethostname()}: every node "
                "must mount the shared STORAGE_PATH at the same path (docs/cluster.md)"
            )
        job_dir = storage / "_jobs" / self.job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = job_dir / "worker.log"
        # A FIFO on the node's own disk, as the worker may not be our child to inherit a pipe.
        self._fifo_dir = Path(tempfile.mkdtemp(prefix=f"sllm-{self.job_id}-"))
        fifo = self._fifo_dir / "reports"
        os.mkfifo(fifo, 0o600)
        read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        self._hold = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.set_blocking(read_fd, True)
        self._reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self._reader.start()
        args = ["--report-path", str(fifo), self.job_id]
        env = node_env(spec["num_cpus"], forwarded)
        data = json.dumps(spec)
        self.proc, how = launch_on_node(pool, "sllm.jobs.worker", args, env, self.log_path, data)
        if self.proc is None:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "sllm.jobs.worker", *args],
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            assert self.proc.stdin is not None
            self.proc.stdin.write(data.encode())
            self.proc.stdin.close()
        return {
            "pid": self.proc.pid,
            "node_id": ray.get_runtime_context().get_node_id(),
            "address": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            **how,
        }

    def _release(self) -> None:
        """The worker exited: let the reader reach EOF once it has read what is left."""
        if self._hold is not None:
            os.close(self._hold)
            self._hold = None
        if self._fifo_dir is not None:
            shutil.rmtree(self._fifo_dir, ignore_errors=True)
            self._fifo_dir = None

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                try:
                    self._reports.put(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn line from a killed worker
        self._reports.put(_EOF)

    def next_reports(self, wait_s: float) -> dict[str, Any]:
        """Reports so far (waiting up to `wait_s` for the first); `rc` is set once it exited."""
        items, eof = self._collect(wait_s)
        assert self.proc is not None
        if eof and self.proc.poll() is None:
            try:  # the pipe closed first; the exit follows at once
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                self._reports.put(_EOF)
                return {"reports": items, "rc": None}
        rc = self.proc.poll()
        if rc is None:
            return {"reports": items, "rc": None}
        self._release()
        if not eof and self._reader is not None:
            self._reader.join(timeout=2.0)  # the last lines are still in the pipe
            items += self._collect(0)[0]
        return {"reports": items, "rc": rc, "log_tail": self.log_tail(20)}

    def _collect(self, wait_s: float) -> tuple[list[dict[str, Any]], bool]:
        items: list[dict[str, Any]] = []
        try:
            item = self._reports.get(timeout=wait_s) if wait_s > 0 else self._reports.get_nowait()
            while item is not _EOF:
                items.append(item)
                item = self._reports.get_nowait()
            return items, True
        except queue.Empty:
            return items, False

    def signal(self, name: str) -> None:
        """SIGTERM or SIGKILL the worker's whole process group."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, SIGNALS[name])
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 20) -> str:
        return tail(self.log_path, lines) if self.log_path else ""
