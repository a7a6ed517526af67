"""What the supervisor does when a cluster handle says the job's node died (fake launcher)."""

from __future__ import annotations

from sllm.cluster.pool import ClusterPool, NodeCapacity
from sllm.jobs.db import JobStore
from sllm.jobs.states import JobStatus
from sllm.jobs.supervisor import Supervisor


class LostHandle:
    pid, host = None, "fake"

    def __init__(self) -> None:
        self.rc: int | None = None
        self.node_lost: str | None = None

    def poll(self):
        return self.rc

    def terminate(self):
        pass

    def kill(self):
        self.rc = -9

    def log_tail(self, lines=20):
        return ""


class Launcher:
    def __init__(self) -> None:
        self.handles: list[LostHandle] = []

    def launch(self, job_id, alloc, on_exit):
        self.handles.append(LostHandle())
        return self.handles[-1]


def test_node_lost_requeues_once_then_fails_with_node_lost(tmp_path):
    store = JobStore(tmp_path / "sllm.db")
    launcher = Launcher()
    pool = ClusterPool([NodeCapacity("b", cpus=2, gpus=0)])
    sup = Supervisor(store, launcher, pool, max_restarts=1)
    job = store.create(
        model="m",
        ft_backend="peft_lora",
        num_cpus=1,
        num_gpus=0,
        timeout=3600.0,
        priority=0,
        config={},
        backend_config={},
    ).id
    sup.tick()
    first = launcher.handles[-1]
    first.node_lost, first.rc = "Ray node b of the worker was lost (gone).", -9
    sup.tick()  # reaped and re-queued, then started again in the same pass
    assert len(launcher.handles) == 2 and store.get(job).attempts == 2
    second = launcher.handles[-1]
    second.node_lost, second.rc = "Ray node b of the worker was lost (gone).", -9
    sup.tick()
    assert pool.held() == {} and len(launcher.handles) == 2
    rec = store.get(job)
    assert rec.status is JobStatus.FAILED and rec.error_kind == "node_lost"
    assert "giving up" in rec.error_message
    events, _ = store.events(job)
    requeued = [e for e in events if "Re-queued" in e["message"]]
    assert len(requeued) == 1 and requeued[0]["data"]["error_kind"] == "node_lost"
    store.close()
