"""A warm pool on every Ray node, and the processes it hands to that node's runners.

The head keeps one `NodePool` actor per live node (`NodePools`, 0 CPUs, pinned to its node,
owned by the server's driver, so it dies with the server). Each holds a `sllm.procpool.WarmPool`
of idle children that imported torch, transformers and peft. A job's or an instance's actor
(`JobRunner`, `InstanceRunner`) asks its node's pool for a child (`launch_on_node`) and falls back
to spawning a fresh process when none fits or the pool cannot be reached.

The pool, not the runner, is the child's parent, so PR_SET_PDEATHSIG cannot tie the child to its
runner. Instead the runner's pid (and start time) travel in the launch, and the child kills its
own process group when that process ends (`sllm.procpool.die_with_owner`): "the worker dies with
its actor" holds as it does for a fresh process. The child still dies with the pool too (its
death signal), and with it when the server goes. The runner sees the child's exit at once
through a pidfd; its exit code comes from the pool, which reaps it.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sllm.procpool import WarmPool, start_time

log = logging.getLogger(__name__)

LAUNCH_TIMEOUT_S = 30.0  # a hand-over waits up to 5 s for the child's acknowledgement
COLLECT_TIMEOUT_S = 30.0
REAP_S = 1.0
KEEP_CODES_S = 3600.0  # exit codes nobody asked for are dropped after this


class NodePool:
    """The actor on a node: a `WarmPool` and the exit codes of the processes it handed out."""

    def __init__(self, size: int, storage_path: str, forwarded: dict[str, str]) -> None:
        import ray

        os.environ.update(forwarded)  # so that idle children see what the runners pass on
        node = ray.get_runtime_context().get_node_id()
        log_path = Path(storage_path) / "_serve" / f"warm-pool-{node[:12]}.log"
        self.pool = WarmPool(size, log_path).start()
        self._procs: dict[int, subprocess.Popen] = {}
        self._codes: dict[int, tuple[int, float]] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._reap, name="node-pool-reaper", daemon=True).start()

    def launch(
        self,
        module: str,
        args: list[str],
        env: dict[str, str],
        log_path: str,
        owner: tuple[int, str],
        stdin: str | None = None,
    ) -> dict[str, Any]:
        """`pid`: a warm child now running `module.main(args)` for `owner` (pid, start time);
        or `pid` None and `why` when no idle child fits `env`."""
        env = {
            **env,
            "SLLM_PARENT_PID": str(os.getpid()),  # the child's parent is this actor
            "SLLM_OWNER_PID": str(owner[0]),
            "SLLM_OWNER_STARTED": owner[1],
        }
        proc = self.pool.take(module, args, env=env, log_path=Path(log_path), stdin=stdin)
        if proc is None:
            return {"pid": None, "why": self.pool.why_not(env)}
        with self._lock:
            self._procs[proc.pid] = proc
        return {"pid": proc.pid}

    def wait(self, pid: int, timeout: float) -> int | None:
        """The exit code of `pid` once it exits (None after `timeout`, or for a pid unknown)."""
        with self._lock:
            proc = self._procs.get(pid)
            if proc is None:
                code = self._codes.pop(pid, None)
                return None if code is None else code[0]
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        with self._lock:
            self._procs.pop(pid, None)
            self._codes.pop(pid, None)
        return rc

    def _reap(self) -> None:
        """Reap exited children (no zombies) and keep their codes for `wait`."""
        while True:
            time.sleep(REAP_S)
            now = time.monotonic()
            with self._lock:
                for pid, proc in list(self._procs.items()):
                    rc = proc.poll()
                    if rc is not None:
                        self._codes[pid] = (rc, now)
                        del self._procs[pid]
                for pid, (_, at) in list(self._codes.items()):
                    if now - at > KEEP_CODES_S:
                        del self._codes[pid]


class PooledProcess:
    """`subprocess.Popen`'s `pid`/`poll`/`wait`/`returncode` for a child of the node's pool:
    its exit is seen through a pidfd, its code is asked of the pool (its parent)."""

    def __init__(self, pool: Any, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pool = pool
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._fd = None  # exited and reaped already: the pool has its code

    def poll(self) -> int | None:
        if self.returncode is None and self._exited(0):
            self._collect()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not self._exited(timeout):
                raise subprocess.TimeoutExpired(f"pooled process {self.pid}", timeout or 0)
            self._collect()
        assert self.returncode is not None
        return self.returncode

    def _exited(self, timeout: float | None) -> bool:
        if self._fd is None:
            return True
        ready, _, _ = select.select([self._fd], [], [], timeout)
        return bool(ready)

    def _collect(self) -> None:
        import ray

        try:
            rc = ray.get(self._pool.wait.remote(self.pid, COLLECT_TIMEOUT_S), timeout=60)
        except Exception:  # noqa: BLE001 - the pool is gone; so is its child (death signal)
            log.warning("pooled process %d: its pool did not say how it ended", self.pid)
            rc = None
        self.returncode = -signal.SIGKILL if rc is None else int(rc)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@functools.cache
def pidfd_supported() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def launch_on_node(
    pool: Any,
    module: str,
    args: list[str],
    env: dict[str, str],
    log_path: Path,
    stdin: str | None = None,
) -> tuple[PooledProcess | None, dict[str, Any]]:
    """`module.main(args)` in a warm process of this node's pool, owned by the calling process,
    and how it went (`pooled`, `pool_failed`: the pool did not answer). The process is None
    (spawn a fresh one) when there is no pool, no child fits, or the pool failed; why is then
    the first line of its log."""
    if pool is None:
        return None, {"pooled": False, "pool_failed": False}
    import ray

    why, failed = "cannot watch its owner (no pidfd on this kernel)", False
    if pidfd_supported():
        owner = (os.getpid(), start_time(os.getpid()) or "")
        call = pool.launch.remote(module, args, env, str(log_path), owner, stdin)
        try:
            got = ray.get(call, timeout=LAUNCH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a fresh process does the same job, only later
            got = {"pid": None, "why": f"did not answer ({type(exc).__name__}: {exc})"}
            failed = True
        if got["pid"] is not None:
            return PooledProcess(pool, got["pid"]), {"pooled": True, "pool_failed": False}
        why = got["why"]
    with open(log_path, "a", encoding="utf-8") as out:
        out.write(f"sllm: starting a fresh process: the node's warm pool {why}\n")
    return None, {"pooled": False, "pool_failed": failed}


class NodePools:
    """The head's `NodePool` actors, one per live node, kept in step with the node list."""

    def __init__(self, size: int, storage: Path, forwarded: dict[str, str]) -> None:
        import ray

        self.size = size
        self.storage = storage
        self.forwarded = forwarded
        self._cls = ray.remote(NodePool)
        self._actors: dict[str, Any] = {}
        self._tag = uuid.uuid4().hex[:6]  # names stay unique when two servers share a cluster
        self._lock = threading.Lock()

    def sync(self, node_ids: list[str]) -> None:
        """Start a pool on each new node (and again on one whose pool failed); forget those of
        nodes gone (Ray ended their actors)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        with self._lock:
            for node in set(self._actors) - set(node_ids):
                del self._actors[node]
            for node in node_ids:
                if node in self._actors:
                    continue
                self._actors[node] = self._cls.options(
                    num_cpus=0,
                    max_concurrency=16,  # launches and waits of many runners at once
                    max_restarts=0,
                    name=f"sllm-warm-pool-{node[:12]}-{self._tag}",
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                ).remote(self.size, str(self.storage), self.forwarded)

    def failed(self, node_id: str | None, actor: Any) -> None:
        """A runner found `actor`, the pool of `node_id`, dead: the next `sync` starts another."""
        import ray

        with self._lock:
            if node_id is None or self._actors.get(node_id) is not actor:
                return  # replaced already
            del self._actors[node_id]
        log.warning("the warm pool on Ray node %s failed; starting another", node_id[:12])
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - gone already
            pass

    def get(self, node_id: str | None) -> Any:
        with self._lock:
            return self._actors.get(node_id) if node_id else None

    def close(self) -> None:
        import ray

        with self._lock:
            actors, self._actors = list(self._actors.values()), {}
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)  # its idle children die with it
            except Exception:  # noqa: BLE001 - gone already
                pass
