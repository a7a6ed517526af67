"""What the server knows about each deployment and its instances, and how it reports them.

States of an instance: starting -> ready -> stopping (then gone), or starting -> failed (gone).
`Scaler` owns these objects and changes them under its lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from sllm.jobs.resources import Allocation
from sllm.serve.auth import auth_headers
from sllm.serve.process import InstanceProcess
from sllm.serve.protocol import AdapterStatus, DeploymentConfig, DeploymentStatus, InstanceStatus


@dataclass
class Instance:
    id: str
    owner: str
    alloc: Allocation
    proc: InstanceProcess
    max_batch_size: int
    state: str = "starting"
    port: int | None = None
    host: str = "127.0.0.1"  # on a Ray cluster: the address of the instance's node
    in_flight: int = 0
    started_time: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    cold_start_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)  # see InstanceStatus
    error: str | None = None
    loaded: dict[str, str] = field(default_factory=dict)  # name -> path|fingerprint
    max_loras: int | None = None  # what the instance was told (PUT /lora-cache)
    lora_cache: list[str] = field(default_factory=list)  # on-demand adapters, as last reported
    lora_loads: int = 0  # on-demand adapter loads (LRU misses)
    sync_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        """What every call to the instance carries: its secret."""
        return auth_headers(self.proc.secret)

    @property
    def live(self) -> bool:
        return self.state in ("starting", "ready")


@dataclass
class Deployment:
    config: DeploymentConfig
    created: float
    fingerprints: dict[str, str]
    adapter_errors: dict[str, str] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)
    counter: int = 0
    queued: int = 0
    last_error: str | None = None
    on_demand: bool = False  # made for a fine-tuned model's request; a deploy makes it explicit

    def live(self) -> list[Instance]:
        return [i for i in self.instances if i.live]


def describe(dep: Deployment, now: float) -> DeploymentStatus:
    """The deployment as `GET /v1/deployments` shows it (call under the owner's lock)."""
    instances = [_instance_status(i, now) for i in dep.instances]
    adapters = [
        AdapterStatus(
            name=n,
            path=p,
            state="failed" if n in dep.adapter_errors else "deployed",
            error=dep.adapter_errors.get(n),
        )
        for n, p in dep.config.lora_adapters.items()
    ]
    states = {i.state for i in instances}
    state = "warm" if "ready" in states else "starting" if "starting" in states else "cold"
    return DeploymentStatus(
        model=dep.config.model,
        state=state,
        config=dep.config,
        adapters=adapters,
        instances=instances,
        queued=dep.queued,
        last_error=dep.last_error,
        on_demand=dep.on_demand,
    )


def _instance_status(inst: Instance, now: float) -> InstanceStatus:
    return InstanceStatus(
        id=inst.id,
        state=inst.state,
        pid=inst.proc.pid,
        port=inst.port,
        in_flight=inst.in_flight,
        cpus=inst.alloc.cpus,
        gpu_ids=list(inst.alloc.gpu_ids),
        started_time=inst.started_time,
        cold_start_seconds=inst.cold_start_s,
        cold_start_phases=dict(inst.phases),
        idle_seconds=None if inst.in_flight else round(now - inst.last_used, 3),
        adapters=sorted(inst.loaded),
        lora_cache=list(inst.lora_cache),
        lora_loads=inst.lora_loads,
    )
