"""CPU and GPU capacity, shared by fine-tuning jobs and inference instances.

Each holder (a job, an instance) gets a count of CPU cores and a set of GPU ids; nobody is given a
device another holder has. On a Ray cluster `sllm.cluster.pool.ClusterPool` plays the same part
per node, and its allocations name the node they were placed on.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Allocation:
    owner: str
    cpus: int
    gpu_ids: tuple[int, ...] = field(default_factory=tuple)
    node: str | None = None  # the Ray node id, on a cluster

    def as_dict(self) -> dict:
        out: dict = {"cpus": self.cpus, "gpu_ids": list(self.gpu_ids)}
        if self.node is not None:
            out["node"] = self.node
        return out


def detect_gpu_ids() -> list[int]:
    """Visible CUDA devices, without importing torch (nvidia-smi or CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [i for i, part in enumerate(visible.split(",")) if part.strip() not in ("", "-1")]
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(x) for x in out.stdout.split() if x.strip().isdigit()]


def require_fit(pool, cpus: int, gpus: int, what: str) -> None:
    """400 unless one machine (one node, on a cluster) could ever hold `cpus` and `gpus`."""
    from sllm.errors import InvalidRequestError

    if pool.fits_ever(cpus, gpus):
        return
    raise InvalidRequestError(
        f"{what} asks for {cpus} CPUs and {gpus} GPUs, more than any one machine of this server "
        f"can hold ({pool.total_cpus} CPUs and {pool.total_gpus} GPUs in all).",
        param="num_gpus" if gpus > pool.total_gpus else "num_cpus",
    )


class AllocationLedger:
    """Who holds what, for both pools (this machine's `ResourcePool`, the Ray `ClusterPool`):
    thread-safe, one allocation per owner (asking again returns it). A pool says where a request
    fits in `_place_locked`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, Allocation] = {}
        self.generation = 0  # bumped by every acquire and release (readers cache on it)

    def try_acquire(self, owner: str, cpus: int, gpus: int) -> Allocation | None:
        with self._lock:
            if owner in self._held:
                return self._held[owner]
            alloc = self._place_locked(owner, cpus, gpus)
            if alloc is not None:
                self._held[owner] = alloc
                self.generation += 1
            return alloc

    def _place_locked(self, owner: str, cpus: int, gpus: int) -> Allocation | None:
        raise NotImplementedError

    def release(self, owner: str) -> None:
        with self._lock:
            if self._held.pop(owner, None) is not None:
                self.generation += 1

    def held(self) -> dict[str, Allocation]:
        with self._lock:
            return dict(self._held)


class ResourcePool(AllocationLedger):
    def __init__(self, num_cpus: int, gpu_ids: list[int]) -> None:
        super().__init__()
        self.total_cpus = num_cpus
        self.gpu_ids = list(gpu_ids)

    @property
    def total_gpus(self) -> int:
        return len(self.gpu_ids)

    def free(self) -> tuple[int, list[int]]:
        with self._lock:
            return self._free_locked()

    def _free_locked(self) -> tuple[int, list[int]]:
        used_cpus = sum(a.cpus for a in self._held.values())
        used_gpus = {g for a in self._held.values() for g in a.gpu_ids}
        return self.total_cpus - used_cpus, [g for g in self.gpu_ids if g not in used_gpus]

    def fits_ever(self, cpus: int, gpus: int) -> bool:
        return cpus <= self.total_cpus and gpus <= self.total_gpus

    def _place_locked(self, owner: str, cpus: int, gpus: int) -> Allocation | None:
        free_cpus, free_gpus = self._free_locked()
        if cpus > free_cpus or gpus > len(free_gpus):
            return None
        return Allocation(owner, cpus, tuple(free_gpus[:gpus]))


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def wait_reason(cpus: int, gpus: int, free_cpus: int, free_gpus: int, ahead: int) -> str:
    """Why a pending job that needs `cpus`/`gpus` has not started, in one line
    (e.g. "waiting for 2 CPUs: 1 free; 2 jobs ahead")."""
    wants = ((cpus, "CPU", free_cpus), (gpus, "GPU", free_gpus))
    missing = [(n, kind, free) for n, kind, free in wants if n > free]
    queue = f"; {_count(ahead, 'job')} ahead" if ahead else ""
    if not missing:
        return f"starting: its {_count(cpus, 'CPU')} and {_count(gpus, 'GPU')} are free{queue}"
    need = " and ".join(_count(n, kind) for n, kind, _ in missing)
    if len(missing) == 1:
        have = f"{missing[0][2]} free"
    else:
        have = " and ".join(_count(free, kind) for _, kind, free in missing) + " free"
    return f"waiting for {need}: {have}{queue}"
