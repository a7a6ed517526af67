"""Inference instances on a Ray cluster, behind `sllm.serve.process.InstanceProcess`'s interface.

`RayInstanceProcess` (on the head) creates an `InstanceRunner` actor holding the instance's
`num_cpus`/`num_gpus` on the node the `ClusterPool` chose. The actor starts
`python -m sllm.serve.instance --host <node address>` in its own process group there (in a warm
process of the node's pool when one fits, `sllm.cluster.nodepool`); the head then talks HTTP to
that address, exactly as it talks to a local instance on 127.0.0.1. The instance dies with its
actor (PR_SET_PDEATHSIG, or a pidfd watch of the actor for a pooled process); when the node
dies, `poll()` reports an exit and the reaper frees the instance's share, so the next request
starts one elsewhere.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sllm.cluster.nodepool import NodePools, PooledProcess, launch_on_node
from sllm.cluster.runner import FORWARDED_ENV, node_env
from sllm.jobs.launcher import tail
from sllm.jobs.resources import Allocation
from sllm.procgroup import spawn, stop_group
from sllm.serve.auth import SECRET_ENV, new_secret
from sllm.serve.process import instance_args

POLL_S = 0.05
PLACE_TIMEOUT_S = 120.0


class InstanceStartError(Exception):
    pass


class InstanceRunner:
    """The actor on the node: owns one instance process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc: subprocess.Popen | PooledProcess | None = None
        self.log_path: Path | None = None
        self.ready_file: Path | None = None
        self.address = ""

    def start(
        self, args: list[str], paths: dict[str, str], num_cpus: int, forwarded, pool=None
    ) -> dict:
        """Start the instance (from `pool`, the node's warm pool, when it has a process that
        fits); returns where it runs."""
        import ray

        self.address = ray.util.get_node_ip_address()
        self.log_path, self.ready_file = Path(paths["log"]), Path(paths["ready"])
        self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        module_args = ["--host", self.address, *args]
        env = node_env(num_cpus, forwarded)
        self.proc, how = launch_on_node(
            pool, "sllm.serve.instance", module_args, env, self.log_path
        )
        if self.proc is None:
            cmd = [sys.executable, "-m", "sllm.serve.instance", *module_args]
            self.proc = spawn(cmd, env=env, log_path=self.log_path)
        return {
            "pid": self.proc.pid,
            "node_id": ray.get_runtime_context().get_node_id(),
            "address": self.address,
            "hostname": socket.gethostname(),
            **how,
        }

    def ready(self) -> dict | None:
        """The ready file's content plus this node's address, None while loading; raises if the
        instance exited."""
        import json

        assert self.proc is not None and self.ready_file is not None
        if self.ready_file.is_file():
            return {**json.loads(self.ready_file.read_text()), "host": self.address}
        if self.proc.poll() is not None:
            raise InstanceStartError(
                f"the instance exited with code {self.proc.poll()} while starting:\n"
                f"{self.log_tail()}"
            )
        return None

    def wait_exit(self) -> int:
        assert self.proc is not None
        return self.proc.wait()

    def stop(self, grace: float) -> None:
        """SIGTERM the group, SIGKILL it after `grace` seconds."""
        if self.proc is None:
            return
        stop_group(self.proc, grace)
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 15) -> str:
        return tail(self.log_path, lines) if self.log_path else ""


class RayInstanceProcess:
    """The head's handle on one instance on the cluster (the `InstanceProcess` interface)."""

    def __init__(self, workdir: Path, name: str, runner_cls, pools: NodePools | None) -> None:
        self.workdir = workdir
        self._pools = pools
        self.name = name
        self.ready_file = workdir / f"{name}.ready.json"
        self.log_path = workdir / f"{name}.log"
        self._runner_cls = runner_cls
        self._actor = None
        self._pid: int | None = None
        self._rc: int | None = None
        self.placement: dict[str, Any] | None = None
        self.secret = new_secret()  # reaches the node in the actor call, never on a command line

    @property
    def pid(self) -> int | None:
        return self._pid

    def spawn(
        self, storage: Path, model: str, alloc: Allocation, max_batch_size: int, dtype: str
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options: dict[str, Any] = {
            "num_cpus": alloc.cpus,
            "num_gpus": len(alloc.gpu_ids),
            "max_concurrency": 4,
            "max_restarts": 0,
        }
        if alloc.node:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(alloc.node, soft=False)
        self._actor = self._runner_cls.options(**options).remote(self.name)
        args = instance_args(storage, model, self.ready_file, alloc, max_batch_size, dtype)
        paths = {"log": str(self.log_path), "ready": str(self.ready_file)}
        forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        forwarded[SECRET_ENV] = self.secret
        pool = self._pools.get(alloc.node) if self._pools else None
        started = self._actor.start.remote(args, paths, alloc.cpus, forwarded, pool)
        try:
            self.placement = ray.get(started, timeout=PLACE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.kill(self._actor, no_restart=True)
            raise InstanceStartError(
                f"Ray did not start the instance on node {alloc.node} within "
                f"{PLACE_TIMEOUT_S:.0f}s (is something else using that node's resources?)"
            ) from None
        self._pid = self.placement["pid"]
        if self.placement.get("pool_failed") and self._pools:
            self._pools.failed(alloc.node, pool)
        threading.Thread(target=self._wait_exit, name=f"ray-{self.name}", daemon=True).start()

    def _wait_exit(self) -> None:
        import ray

        try:
            self._rc = int(ray.get(self._actor.wait_exit.remote()))
        except Exception:  # noqa: BLE001 - the actor (or its node) died: so did the instance
            self._rc = -signal.SIGKILL

    def wait_ready(self, timeout: float, cancelled=lambda: False) -> dict:
        """The ready info (`port`, `host`, ...) once the instance serves; raises if it exits,
        is stopped or times out."""
        import ray
        from ray.exceptions import RayTaskError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = ray.get(self._actor.ready.remote())
            except RayTaskError as exc:
                raise InstanceStartError(str(exc.cause)) from None
            if info is not None:
                return info
            if cancelled():
                raise InstanceStartError("the instance was stopped while starting")
            time.sleep(POLL_S)
        raise InstanceStartError(f"the instance did not start within {timeout:.0f}s")

    def poll(self) -> int | None:
        return self._rc if self._actor is not None else 0

    def stop(self, grace: float = 3.0) -> None:
        import ray

        if self._actor is None:
            return
        try:
            ray.get(self._actor.stop.remote(grace), timeout=grace + 15)
        except Exception:  # noqa: BLE001 - unreachable: killing the actor kills the instance
            pass
        ray.kill(self._actor, no_restart=True)

    def log_tail(self, lines: int = 15) -> str:
        return tail(self.log_path, lines)


class RayInstances:
    """The factory `Scaler` calls instead of `InstanceProcess(workdir, name)`."""

    def __init__(self, pools: NodePools | None = None) -> None:
        import ray

        self._runner_cls = ray.remote(InstanceRunner)
        self._pools = pools

    def __call__(self, workdir: Path, name: str) -> RayInstanceProcess:
        return RayInstanceProcess(workdir, name, self._runner_cls, self._pools)
