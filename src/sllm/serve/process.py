"""The server's handle on one instance process: spawn it, wait until it serves, stop its group.

Each handle holds the instance's secret (`sllm.serve.auth`), made when the handle is, passed in
the instance's environment, and sent by the server on every call to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sllm.jobs.launcher import tail, worker_env
from sllm.jobs.resources import Allocation
from sllm.procgroup import spawn, stop_group
from sllm.serve.auth import SECRET_ENV, new_secret

if TYPE_CHECKING:
    from sllm.procpool import WarmPool


class InstanceStartError(Exception):
    pass


def instance_args(
    storage: Path, model: str, ready_file: Path, alloc: Allocation, max_batch_size: int, dtype: str
) -> list[str]:
    """The `python -m sllm.serve.instance` arguments, wherever the instance runs (here, or in a
    Ray actor on another node)."""
    return [
        "--storage", str(storage),
        "--model", model,
        "--ready-file", str(ready_file),
        "--max-batch-size", str(max_batch_size),
        "--dtype", dtype,
        "--device", "cuda" if alloc.gpu_ids else "cpu",
    ]  # fmt: skip


class InstanceProcess:
    def __init__(self, workdir: Path, name: str, warm: WarmPool | None = None) -> None:
        self.warm = warm  # a warm process to take, when there is one (`sllm.procpool`)
        self.workdir = workdir
        self.name = name
        self.ready_file = workdir / f"{name}.ready.json"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.secret = new_secret()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def spawn(
        self, storage: Path, model: str, alloc: Allocation, max_batch_size: int, dtype: str
    ) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        env = worker_env(alloc)
        env["SLLM_PARENT_PID"] = str(os.getpid())
        env[SECRET_ENV] = self.secret
        args = instance_args(storage, model, self.ready_file, alloc, max_batch_size, dtype)
        if self.warm is not None:
            self.proc = self.warm.launch(
                "sllm.serve.instance", args, env=env, log_path=self.log_path
            )
            self.secret = self.proc.launch_env[SECRET_ENV]  # a warm child's own
        else:
            cmd = [sys.executable, "-m", "sllm.serve.instance", *args]
            self.proc = spawn(cmd, env=env, log_path=self.log_path)

    def wait_ready(self, timeout: float, cancelled=lambda: False) -> dict:
        """The ready file's content once the instance serves; raises if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.is_file():
                return json.loads(self.ready_file.read_text())
            if self.poll() is not None:
                raise InstanceStartError(
                    f"the instance exited with code {self.poll()} while starting:\n"
                    f"{self.log_tail()}"
                )
            if cancelled():
                raise InstanceStartError("the instance was stopped while starting")
            time.sleep(0.02)
        raise InstanceStartError(f"the instance did not start within {timeout:.0f}s")

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else 0

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the group, SIGKILL it after `grace` seconds, and reap the process."""
        if self.proc is None:
            return
        stop_group(self.proc, grace)
        self.ready_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 15) -> str:
        return tail(self.log_path, lines)
