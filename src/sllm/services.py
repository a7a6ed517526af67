"""Builds and owns the plain-Python services one server runs; the HTTP app only borrows them."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from sllm.config import Settings
from sllm.files.store import FileStore
from sllm.jobs.db import JobStore
from sllm.jobs.launcher import LocalLauncher
from sllm.jobs.resources import ResourcePool
from sllm.jobs.service import JobService
from sllm.jobs.supervisor import Supervisor
from sllm.paths import backend_root, db_path, jobs_dir
from sllm.procpool import WarmPool
from sllm.serve.deployments import DeploymentService
from sllm.serve.finetuned import FineTunedModels
from sllm.serve.process import InstanceProcess
from sllm.serve.registry import DeploymentRegistry


@dataclass
class Services:
    settings: Settings
    store: JobStore
    pool: ResourcePool
    supervisor: Supervisor
    jobs: JobService
    extra: dict[str, Any] = field(default_factory=dict)
    deployments: DeploymentService | None = None
    cluster: Any = None  # sllm.cluster.launcher.RayCluster with --ray-address
    files: FileStore | None = None
    warm: WarmPool | None = None  # pre-started processes for workers and instances (local;
    # on a Ray cluster every node has its own, `sllm.cluster.nodepool`)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        storage = settings.storage_path
        (storage / "transformers").mkdir(parents=True, exist_ok=True)
        store = JobStore(db_path(storage))
        cluster, warm = None, None
        if settings.warm_pool > 0 and not settings.ray_address:
            warm = WarmPool(settings.warm_pool, storage / "_serve" / "warm-pool.log")
        if settings.ray_address:  # the only place Ray is imported, and only when asked for
            from sllm.cluster.launcher import RayCluster

            cluster = RayCluster(settings.ray_address, store, settings.warm_pool)
            pool, launcher = cluster.pool, cluster.launcher
        else:
            pool = ResourcePool(settings.cpu_capacity(), settings.gpu_ids())
            launcher = LocalLauncher(db_path(storage), jobs_dir(storage), warm)
        supervisor = Supervisor(
            store,
            launcher,
            pool,
            starvation_s=settings.starvation_s,
            kill_grace_s=settings.kill_grace_s,
            max_restarts=settings.max_restarts,
            scratch_root=jobs_dir(storage),
            shutdown_grace_s=settings.shutdown_grace_s,
            log_retention_s=settings.log_retention_days * 86400,
        )
        files = FileStore(storage, db_path(storage), max_bytes=settings.max_upload_bytes)
        jobs = JobService(settings, store, pool, supervisor, files=files)
        registry = DeploymentRegistry(db_path(storage))
        options: dict[str, Any] = {}
        if cluster:
            options["process_factory"] = cluster.instances
        elif warm:
            options["process_factory"] = functools.partial(InstanceProcess, warm=warm)
        finetuned = FineTunedModels(store, backend_root(storage))
        deployments = DeploymentService(
            storage, pool, supervisor.wake, registry, finetuned, **options
        )
        return cls(
            settings,
            store,
            pool,
            supervisor,
            jobs,
            deployments=deployments,
            cluster=cluster,
            files=files,
            warm=warm,
        )

    def start(self) -> None:
        if self.warm is not None:
            self.warm.start()
        self.supervisor.start()
        if self.cluster is not None:
            self.cluster.start(on_change=self.supervisor.wake)
        if self.deployments is not None:
            self.deployments.start()

    def stop(self) -> None:
        """A clean shutdown: instances stop, running jobs checkpoint and go back to pending."""
        if self.deployments is not None:
            self.deployments.stop()
        self.supervisor.stop()
        if self.warm is not None:  # after the workers and instances it started have stopped
            self.warm.stop()
        if self.cluster is not None:
            self.cluster.close()
        if self.files is not None:
            self.files.close()
        self.store.close()
