"""Job workers on a Ray cluster: the `Launcher`/`WorkerHandle` pair of `sllm.jobs.launcher`.

For each job the supervisor starts, `RayLauncher` creates a `JobRunner` actor holding the job's
`num_cpus`/`num_gpus` as Ray resources, pinned to the node the `ClusterPool` chose; the actor
starts the worker there, in a warm process of the node's pool when one fits (`nodepool.py`).
A thread per job (on the head) pulls the worker's reports from the actor and writes them to
SQLite, then reports the exit code. Cancel and timeout signal the worker's process group
through the actor; if the actor does not answer, Ray kills it, and the worker dies
with it. When the actor dies because its node died, the handle says so (`node_lost`) and the
supervisor re-queues the job once, then fails it with `node_lost`.

`RayCluster` ties it together for `Services`: it connects to Ray, keeps the pool's node list (and
a warm pool per node) in step with `ray.nodes()`, hands `DeploymentService` its instance factory
(`instances.py`) and disconnects on stop. Only this package imports Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sllm.cluster.instances import RayInstances
from sllm.cluster.nodepool import NodePools
from sllm.cluster.pool import ClusterPool, NodeCapacity
from sllm.cluster.runner import FORWARDED_ENV, JobRunner
from sllm.jobs.db import JobRecord, JobStore
from sllm.jobs.launcher import tail
from sllm.jobs.resources import Allocation

log = logging.getLogger(__name__)

REPORT_WAIT_S = 1.0  # how long one pull waits for the first report
KILL_FALLBACK_S = 10.0  # after a SIGKILL request, kill the actor itself if the worker lingers
REFRESH_S = 1.0  # how often the node list is read


def connect(address: str) -> None:
    """Join the cluster at `address` (`auto`, `host:port`, or `local` for a private one)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"namespace": "sllm", "log_to_driver": False}
    if address == "local":
        kwargs["include_dashboard"] = False
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(address=address, logging_level=logging.WARNING, **kwargs)
    if main:  # ray.init replaces the server's SIGTERM handler; a clean shutdown needs it back
        signal.signal(signal.SIGTERM, previous)


def read_nodes() -> list[NodeCapacity]:
    """Live nodes and their CPU/GPU totals as Ray reports them."""
    import ray

    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources") or {}
        nodes.append(
            NodeCapacity(
                node_id=node["NodeID"],
                cpus=int(res.get("CPU", 0)),
                gpus=int(res.get("GPU", 0)),
                address=node.get("NodeManagerAddress", ""),
            )
        )
    return nodes


def node_alive(node_id: str | None) -> bool:
    import ray

    if node_id is None:
        return True
    return any(n["NodeID"] == node_id and n.get("Alive") for n in ray.nodes())


def job_spec(rec: JobRecord, storage: Path) -> dict[str, Any]:
    """What the worker needs to run the job, as it would read it from the record."""
    return {
        "model": rec.model,
        "ft_backend": rec.ft_backend,
        "storage_path": str(storage),
        "backend_config": rec.backend_config,
        "num_cpus": rec.num_cpus,
        "num_gpus": rec.num_gpus,
    }


class RayHandle:
    """The head's view of one job's actor: its reports, its exit code, and how to stop it."""

    def __init__(
        self,
        job_id: str,
        actor,
        alloc: Allocation,
        store: JobStore,
        on_node_lost: Callable[[], None] = lambda: None,
        node_pool: Any = None,
        on_pool_failed: Callable[[str | None, Any], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.node_pool = node_pool
        self.on_pool_failed = on_pool_failed
        self.on_node_lost = on_node_lost
        self.actor = actor
        self.alloc = alloc
        self.store = store
        self.pid: int | None = None
        self.host: str | None = None
        self.node_lost: str | None = None
        self._rc: int | None = None
        self._tail = ""
        self._log_path = store.path.parent / "_jobs" / job_id / "worker.log"
        self._lock = threading.Lock()
        self._started = False
        self._stopping: str | None = None
        self.done = threading.Event()

    # --- the WorkerHandle protocol ------------------------------------------------------
    def poll(self) -> int | None:
        return self._rc

    def terminate(self) -> None:
        self._stop("TERM")

    def kill(self) -> None:
        self._stop("KILL")

    def log_tail(self, lines: int = 20) -> str:
        return self._tail or tail(self._log_path, lines)

    # --- stopping -----------------------------------------------------------------------
    def _stop(self, sig: str) -> None:
        import ray

        with self._lock:
            self._stopping = "KILL" if "KILL" in (sig, self._stopping) else sig
            started = self._started
        if self.done.is_set():
            return
        if not started:  # not placed or not spawned yet: dropping the actor stops everything
            ray.kill(self.actor, no_restart=True)
            return
        self.actor.signal.remote(sig)
        if sig == "KILL":
            timer = threading.Timer(KILL_FALLBACK_S, self._kill_actor)
            timer.daemon = True
            timer.start()

    def _kill_actor(self) -> None:
        import ray

        if not self.done.is_set():
            ray.kill(self.actor, no_restart=True)

    # --- the watcher thread -------------------------------------------------------------
    def watch(self, spec: dict[str, Any], on_exit: Callable[[], None]) -> None:
        forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        threading.Thread(
            target=self._watch,
            args=(spec, forwarded, on_exit),
            name=f"ray-{self.job_id}",
            daemon=True,
        ).start()

    def _watch(self, spec: dict[str, Any], forwarded: dict[str, str], on_exit) -> None:
        import ray

        rc = 1
        try:
            info = ray.get(self.actor.start.remote(spec, forwarded, self.node_pool))
            self._placed(info)
            rc = self._follow()
        except Exception as exc:  # noqa: BLE001 - every way of ending must reach the supervisor
            rc = self._failed(exc)
        finally:
            if self.node_lost:
                self.on_node_lost()  # drop the dead node before the job is placed again
            self._rc = rc
            try:
                ray.kill(self.actor, no_restart=True)  # frees its resources on the node
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.done.set()
            on_exit()

    def _placed(self, info: dict[str, Any]) -> None:
        self.pid, self.host = info["pid"], info["hostname"]
        self.store.set_worker(self.job_id, self.pid, self.host)
        process = "a warm process of the node's pool" if info.get("pooled") else "a fresh process"
        self.store.add_event(
            self.job_id,
            "placement",
            f"Worker started on Ray node {info['node_id'][:12]} ({info['address']}, host "
            f"{info['hostname']}), pid {info['pid']}, {process}.",
            info,
        )
        if info.get("pool_failed") and self.on_pool_failed is not None:
            self.on_pool_failed(self.alloc.node, self.node_pool)
        with self._lock:
            self._started = True
            stopping = self._stopping
        if stopping:  # a stop arrived while the worker was being spawned
            self.actor.signal.remote(stopping)

    def _follow(self) -> int:
        import ray
        from ray.exceptions import ActorUnavailableError

        while True:
            try:
                out = ray.get(self.actor.next_reports.remote(REPORT_WAIT_S))
            except ActorUnavailableError:
                time.sleep(0.5)  # unreachable for now; Ray says when it is dead for good
                continue
            self._apply(out["reports"])
            if out["rc"] is not None:
                self._tail = out.get("log_tail") or ""
                return int(out["rc"])

    def _apply(self, reports: list[dict[str, Any]]) -> None:
        for r in reports:
            kind = r.get("kind")
            if kind == "progress":
                self.store.set_progress(self.job_id, r["fields"])
            elif kind == "event":
                self.store.add_event(self.job_id, r["type"], r["message"], r.get("data"))
            elif kind == "result":
                self.store.set_result(self.job_id, r["adapter_path"])
            elif kind == "error":
                self.store.set_error(self.job_id, r["message"], r["error_kind"])

    def _failed(self, exc: Exception) -> int:
        """The actor died or could not start: stopped by us, its node died, or it crashed."""
        from ray.exceptions import ActorUnschedulableError, RayActorError, RayTaskError

        if self._stopping:
            return -signal.SIGKILL if self._stopping == "KILL" else -signal.SIGTERM
        if isinstance(exc, RayTaskError) and not isinstance(exc, RayActorError):
            message = f"Could not start the worker on its Ray node: {exc.cause!r}"
            self.store.set_error(self.job_id, message, "worker_error")
            return 1
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        node = self.alloc.node
        if isinstance(exc, (RayActorError, ActorUnschedulableError)) and not _node_alive(node):
            self.node_lost = f"Ray node {(node or '?')[:12]} of the worker was lost ({lines[0]})."
            log.warning("job %s: %s", self.job_id, self.node_lost)
            return -signal.SIGKILL
        self._tail = "\n".join(filter(None, [tail(self._log_path, 20), f"Ray: {exc}"]))
        return -signal.SIGKILL


def _node_alive(node_id: str | None) -> bool:
    """Whether the node is alive, as the cluster's control store sees it."""
    try:
        return node_alive(node_id)
    except Exception:  # noqa: BLE001 - cannot ask: assume the node, not the worker, is gone
        return False


class RayLauncher:
    def __init__(self, store: JobStore, pool: ClusterPool, warm: NodePools | None = None) -> None:
        import ray

        self.store = store
        self.pool = pool
        self.warm = warm
        self._runner = ray.remote(JobRunner)
        self._handles: dict[str, RayHandle] = {}

    def launch(self, job_id: str, alloc: Allocation, on_exit: Callable[[], None]) -> RayHandle:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        rec = self.store.get(job_id)
        if rec is None:
            raise RuntimeError(f"job {job_id} vanished before it could start")
        options: dict[str, Any] = {
            "num_cpus": alloc.cpus,
            "num_gpus": len(alloc.gpu_ids),
            "max_concurrency": 4,  # pulls and signals must not wait behind each other
            "max_restarts": 0,
            "name": f"sllm-{job_id}-{rec.attempts}",  # for `ray list actors`; unique per try
        }
        if alloc.node:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(alloc.node, soft=False)
        actor = self._runner.options(**options).remote(job_id)
        node_pool = self.warm.get(alloc.node) if self.warm else None
        failed = self.warm.failed if self.warm else None
        handle = RayHandle(job_id, actor, alloc, self.store, self.refresh_nodes, node_pool, failed)
        self._handles = {k: h for k, h in self._handles.items() if not h.done.is_set()}
        self._handles[job_id] = handle
        handle.watch(job_spec(rec, self.store.path.parent), on_exit)
        return handle

    def refresh_nodes(self) -> bool:
        """Re-read the node list into the pool; True when the capacity changed."""
        try:
            nodes = read_nodes()
        except Exception:  # noqa: BLE001 - keep the last known list; retry next time
            log.exception("could not read the Ray node list")
            return False
        changed = self.pool.set_nodes(nodes)
        if changed:
            log.warning("Ray cluster nodes now: %s", nodes)
        return changed

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for handle in list(self._handles.values()):
            handle.done.wait(max(0.0, deadline - time.monotonic()))


class RayCluster:
    """Connection, node-following pool and launcher of one server on one Ray cluster."""

    def __init__(self, address: str, store: JobStore, warm_pool: int = 0) -> None:
        connect(address)
        self.address = address
        self.pool = ClusterPool(read_nodes())
        self.warm: NodePools | None = None
        if warm_pool > 0:  # `warm_pool` idle processes on every node
            forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            self.warm = NodePools(warm_pool, store.path.parent, forwarded)
            self.warm.sync([n.node_id for n in self.pool.nodes()])
        self.launcher = RayLauncher(store, self.pool, self.warm)
        self.instances = RayInstances(self.warm)  # the process factory of DeploymentService
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        log.info("on Ray cluster %s: %s", address, self.pool.nodes())

    def start(self, on_change: Callable[[], None]) -> None:
        self._thread = threading.Thread(
            target=self._follow_nodes, args=(on_change,), name="sllm-ray-nodes", daemon=True
        )
        self._thread.start()

    def _follow_nodes(self, on_change: Callable[[], None]) -> None:
        while not self._stop.wait(REFRESH_S):
            changed = self.launcher.refresh_nodes()
            if self.warm is not None:  # new nodes, and nodes whose pool failed, get one
                self.warm.sync([n.node_id for n in self.pool.nodes()])
            if changed:
                on_change()

    def close(self, timeout: float = 15.0) -> None:
        """After the supervisor killed its workers: wait for them to end, then disconnect."""
        import ray

        self._stop.set()
        self.launcher.wait_all(timeout)
        if self.warm is not None:
            self.warm.close()
        ray.shutdown()
