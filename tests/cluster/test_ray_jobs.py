"""Fine-tuning jobs on a real two-node Ray cluster, through a real `sllm start --ray-address`.

The cluster: `head` (1 CPU) and `node_b` (2 CPUs), both on this machine and on loopback only.
The server picks a node per job (the one left with least room), pins the job's Ray actor there
with the job's `num_cpus` as Ray resources, and the actor runs the worker; reports come back to
the head through Ray. Worker pids are checked with /proc because every node is this machine.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from cluster_helpers import raylet_node_of

from sllm.finetune.checkpoints import latest_complete_checkpoint
from tests.conftest import Server, job_config, record, wait_dead, wait_progress

pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
pytestmark = pytest.mark.slow

LONG = {"num_train_epochs": 10000, "learning_rate": 0.01, "per_device_train_batch_size": 4}
SHORT = {"num_train_epochs": 1}


@pytest.fixture
def srv(cluster, storage, server_factory):
    return server_factory(storage, "--ray-address", cluster.address, env=cluster.env)


def submit(srv, storage, name, checkpoint_minutes=None, **kw):
    cfg = job_config(storage, output_dir=f"tiny/adapters/{name}", **kw)
    if checkpoint_minutes is not None:
        cfg["backend_config"]["checkpoint_minutes"] = checkpoint_minutes
    r = srv.client.post("/v1/fine-tuning/jobs", json=cfg)
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def node_of(cluster, storage, job_id) -> str:
    node_id = record(storage, job_id).resources["node"]
    return {v: k for k, v in cluster.node_ids.items()}.get(node_id, f"gone:{node_id[:8]}")


def worker_pid(storage, job_id, timeout=60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = record(storage, job_id)
        if rec.worker_pid and rec.status.value == "running":
            return rec.worker_pid
        time.sleep(0.1)
    raise AssertionError(f"{job_id}: no worker pid recorded")


def events_of(srv, job_id) -> list[dict]:
    """All of a job's events (a long training run logs more than one default page)."""
    r = srv.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 10000})
    return r.json()["data"]


def status(srv, job_id):
    return srv.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]


def cancel(srv, *job_ids):
    for job_id in job_ids:
        srv.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")


def test_cluster_stays_on_loopback(cluster):
    """Every socket the cluster's processes listen on is bound to 127.0.0.1."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("`ss` is not available to list listening sockets")
    pids = set(cluster.pids())
    ours = [line for line in out.stdout.splitlines() if any(f"pid={p}," in line for p in pids)]
    assert ours, "no listening sockets found for the cluster's processes"
    for line in ours:
        local = line.split()[3]
        assert local.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]"), line


def test_jobs_spread_over_nodes_by_resources_in_priority_order(cluster, storage, srv):
    # No node holds 3 CPUs (the cluster has 3 in all): refused at once, not pending forever.
    r = srv.client.post("/v1/fine-tuning/jobs", json=job_config(storage, num_cpus=3))
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_cpus"

    big = submit(srv, storage, "big", num_cpus=2, training_config=LONG)
    small = submit(srv, storage, "small", training_config=LONG)
    for job_id, node in ((big, "node_b"), (small, "head")):  # only node_b has 2 CPUs
        assert node_of(cluster, storage, job_id) == node  # where the server placed it...
        pid = worker_pid(storage, job_id)
        assert raylet_node_of(pid) == cluster.node_ids[node]  # ...is where Ray runs it
    events = events_of(srv, big)
    assert any(e["type"] == "placement" for e in events)

    # The cluster is full: later jobs wait and start by priority, then age.
    low = submit(srv, storage, "low", training_config=SHORT)
    high = submit(srv, storage, "high", training_config=SHORT, priority=5)
    time.sleep(1.5)
    assert status(srv, low)["status"] == status(srv, high)["status"] == "pending"
    cancel(srv, small)  # frees the head's CPU: the high-priority job takes it
    srv.wait_status(high, {"running", "completed"}, timeout=30)
    assert node_of(cluster, storage, high) == "head"
    assert status(srv, low)["status"] == "pending"
    cancel(srv, big)  # frees node_b
    for job_id in (high, low):
        body = srv.wait_status(job_id, {"completed", "failed"}, timeout=120)
        assert body["status"]["status"] == "completed", body["status"].get("error")
    assert status(srv, high)["started_time"] < status(srv, low)["started_time"]


def test_cancel_and_timeout_kill_the_remote_worker(cluster, storage, srv):
    job = submit(srv, storage, "cancelled", num_cpus=2, training_config=LONG)
    wait_progress(srv, job)
    assert node_of(cluster, storage, job) == "node_b"
    pid = worker_pid(storage, job)
    r = srv.client.post(f"/v1/fine-tuning/jobs/{job}/cancel")
    assert r.status_code == 200 and r.json()["status"]["status"] == "cancelled"
    wait_dead(pid, timeout=20)

    timed = submit(srv, storage, "timed", num_cpus=2, training_config=LONG, timeout=12)
    srv.wait_status(timed, {"running"}, timeout=30)  # node_b's CPUs were freed, in Ray too
    pid = worker_pid(storage, timed)
    body = srv.wait_status(timed, {"failed", "completed"}, timeout=60)
    assert body["status"]["error"]["kind"] == "timeout"
    wait_dead(pid, timeout=20)

    after = submit(srv, storage, "after", num_cpus=2, training_config=SHORT)
    body = srv.wait_status(after, {"completed", "failed"}, timeout=120)
    assert body["status"]["status"] == "completed", body["status"].get("error")
    assert node_of(cluster, storage, after) == "node_b"


def test_node_lost_mid_job_requeues_it_and_nodes_joining_add_capacity(cluster, storage, srv):
    blocker = submit(srv, storage, "blocker", training_config=LONG)
    srv.wait_status(blocker, {"running"})
    assert node_of(cluster, storage, blocker) == "head"
    job = submit(
        srv, storage, "moved", checkpoint_minutes=0.005, training_config={"num_train_epochs": 60}
    )
    wait_progress(srv, job)
    assert node_of(cluster, storage, job) == "node_b"
    pid = worker_pid(storage, job)
    scratch = storage / "_jobs" / job / "trainer"  # the shared store: written from node_b
    deadline = time.monotonic() + 120
    while latest_complete_checkpoint(scratch) is None:
        assert time.monotonic() < deadline, "node_b's worker wrote no checkpoint"
        time.sleep(0.05)

    cluster.stop_node("node_b")  # SIGKILL of the whole node: raylet, actors, agents
    wait_dead(pid, timeout=20)
    body = srv.wait_status(job, {"pending"}, timeout=60)
    events = events_of(srv, job)
    lost = [e for e in events if "was lost" in e["message"]]
    assert lost and lost[-1]["data"]["error_kind"] == "node_lost", events[-3:]
    assert "Re-queued" in lost[-1]["message"]

    time.sleep(2.0)  # the pool has dropped node_b: the job waits for the busy head
    assert status(srv, job)["status"] == "pending"
    cancel(srv, blocker)
    body = srv.wait_status(job, {"completed", "failed"}, timeout=180)
    assert body["status"]["status"] == "completed", body["status"].get("error")
    rec = record(storage, job)
    assert rec.attempts == 2 and node_of(cluster, storage, job) == "head"
    assert (storage / "transformers" / "tiny/adapters/moved" / "adapter_config.json").is_file()
    resumed = [e for e in events_of(srv, job) if e["message"].startswith("Resuming from")]
    assert len(resumed) == 1 and resumed[0]["data"]["step"] > 0  # the head went on from node_b
    assert not scratch.exists()

    # node_b left moments ago, so a 2-CPU job is still accepted, and waits: no live node can
    # hold it. A new node_b joining the running server adds the capacity, and it runs there.
    waiting = submit(srv, storage, "joined", num_cpus=2, training_config=SHORT)
    time.sleep(1.5)
    assert status(srv, waiting)["status"] == "pending"
    cluster.add_node("node_b", cpus=2)
    body = srv.wait_status(waiting, {"completed", "failed"}, timeout=120)
    assert body["status"]["status"] == "completed", body["status"].get("error")
    assert node_of(cluster, storage, waiting) == "node_b"


def test_server_killed_takes_its_remote_workers_and_a_restart_requeues(cluster, storage, srv):
    job = submit(srv, storage, "orphan", num_cpus=2, training_config=LONG)
    wait_progress(srv, job)
    pid = worker_pid(storage, job)
    assert raylet_node_of(pid) == cluster.node_ids["node_b"]
    srv.kill(signal.SIGKILL)  # Ray kills the actors of a driver that is gone...
    wait_dead(pid, timeout=60)  # ...and the worker dies with its actor

    again = Server(storage, "--ray-address", cluster.address, env=cluster.env).start()
    try:
        again.wait_status(job, {"running"}, timeout=60)
        events = events_of(again, job)
        assert any("re-queued" in e["message"] for e in events)
        assert record(storage, job).attempts == 2
        second = worker_pid(storage, job)
        assert second != pid
        cancel(again, job)
        wait_dead(second, timeout=20)
    finally:
        again.stop()
