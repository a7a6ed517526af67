"""The warm pool on a real two-node Ray cluster (`sllm.cluster.nodepool`), through `sllm start
--ray-address ... --warm-pool 1`.

Every node gets its own pool actor holding idle `python -m sllm.procpool` children. A job's
worker and an instance come from the pool of the node they are placed on; the pooled worker still
dies with its job's actor (here SIGKILLed, as an out-of-memory kill would), although the pool,
not that actor, is its parent; and stopping the server leaves no pool process on any node.
Processes are found through /proc, as every node is this machine.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from cluster_helpers import cmdline, raylet_node_of

from tests.conftest import job_config, wait_dead, wait_for, wait_progress

pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
pytestmark = pytest.mark.slow

LONG = {"num_train_epochs": 10000, "learning_rate": 0.01, "per_device_train_batch_size": 4}


def processes(prefix: str) -> list[int]:
    """Pids whose command line starts with `prefix` (e.g. `ray::JobRunner`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            args = cmdline(int(entry.name))
            if args and " ".join(args).startswith(prefix):
                found.append(int(entry.name))
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])


def pool_children(cluster) -> dict[str, set[int]]:
    """The pool processes on each node of the cluster (idle or taken)."""
    nodes = {v: k for k, v in cluster.node_ids.items()}
    found: dict[str, set[int]] = {}
    for pid in processes(f"{sys.executable} -m sllm.procpool"):
        node = nodes.get(raylet_node_of(pid) or "")
        if node:
            found.setdefault(node, set()).add(pid)
    return found


def placement(srv, job: str) -> dict:
    """The job's `placement` event (where its worker runs, and whether it came from a pool)."""
    events = srv.client.get(f"/v1/fine_tuning/jobs/{job}/events", params={"limit": 10000})
    (placed,) = [e for e in events.json()["data"] if e["type"] == "placement"]
    return placed


def completed_job(srv, storage, output_dir: str) -> str:
    """A short 2-CPU job (only node_b holds it), run to completion."""
    cfg = job_config(storage, output_dir=output_dir, num_cpus=2)
    job = srv.client.post("/v1/fine-tuning/jobs", json=cfg).json()["job_id"]
    body = srv.wait_status(job, {"completed", "failed"}, timeout=180)
    assert body["status"]["status"] == "completed", body["status"].get("error")
    return job


def test_jobs_and_instances_take_their_nodes_warm_processes(cluster, storage, server_factory):
    srv = server_factory(
        storage, "--ray-address", cluster.address, "--warm-pool", "1", env=cluster.env
    )
    idle = wait_for(
        lambda: (p := pool_children(cluster)) and set(p) == {"head", "node_b"} and p,
        120,
        "a pool process on each node",
    )

    # A job placed on node_b runs in node_b's warm process, whose parent is node_b's pool actor.
    cfg = job_config(storage, output_dir="tiny/adapters/pooled", num_cpus=2, training_config=LONG)
    job = srv.client.post("/v1/fine-tuning/jobs", json=cfg).json()["job_id"]
    wait_progress(srv, job)
    placed = placement(srv, job)
    assert "a warm process of the node's pool" in placed["message"], placed
    worker = placed["data"]["pid"]
    assert placed["data"]["pooled"] and worker in idle["node_b"]
    assert raylet_node_of(worker) == cluster.node_ids["node_b"]
    on_b = cluster.node_ids["node_b"]
    (runner,) = [p for p in processes("ray::JobRunner") if raylet_node_of(p) == on_b]
    assert parent_of(worker) != runner  # the pool's child, not the actor's...
    assert " ".join(cmdline(parent_of(worker))).startswith("ray::NodePool")
    # ...which refills on node_b in the background
    wait_for(lambda: pool_children(cluster).get("node_b", set()) - {worker}, 120, "the refill")

    # The job's actor dies (as an out-of-memory kill would end it): its worker goes with it.
    os.kill(runner, signal.SIGKILL)
    wait_dead(worker, timeout=20)
    body = srv.wait_status(job, {"failed", "pending"}, timeout=60)
    assert body["status"]["status"] in ("failed", "pending")
    srv.client.post(f"/v1/fine_tuning/jobs/{job}/cancel")

    # An instance on the head node comes from the head's pool and answers.
    assert srv.client.post("/v1/deployments", json={"model": "tiny/llama"}).status_code == 200
    r = srv.client.post(
        "/v1/completions",
        json={"model": "tiny/llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0},
        timeout=180,
    )
    assert r.status_code == 200, r.text
    (inst,) = srv.client.get("/v1/deployments/tiny/llama").json()["instances"]
    assert raylet_node_of(inst["pid"]) == cluster.node_ids["head"], cmdline(inst["pid"])
    assert inst["pid"] in idle["head"], (cmdline(inst["pid"]), idle, inst)
    assert srv.client.delete("/v1/deployments/tiny/llama").status_code == 200
    wait_dead(inst["pid"], timeout=30)

    # Stopping the server ends every pool (Ray ends the driver's actors): nothing left anywhere.
    everything = set().union(*pool_children(cluster).values())
    srv.stop()
    for pid in everything:
        wait_dead(pid, timeout=30)
    assert not pool_children(cluster)


def test_a_failed_node_pool_costs_a_fresh_process_then_is_replaced(
    cluster, storage, server_factory
):
    srv = server_factory(
        storage, "--ray-address", cluster.address, "--warm-pool", "1", env=cluster.env
    )
    on_b = cluster.node_ids["node_b"]
    (child,) = wait_for(lambda: pool_children(cluster).get("node_b"), 120, "node_b's pool")
    pool_actor = parent_of(child)
    assert " ".join(cmdline(pool_actor)).startswith("ray::NodePool")
    os.kill(pool_actor, signal.SIGKILL)  # e.g. the OOM killer: its idle child goes with it
    wait_dead(child, timeout=20)

    job = completed_job(srv, storage, "tiny/adapters/fresh")
    placed = placement(srv, job)
    assert placed["data"]["node_id"] == on_b and not placed["data"]["pooled"], placed
    assert placed["data"]["pool_failed"] and "a fresh process" in placed["message"]
    log = (storage / "_jobs" / job / "worker.log").read_text()
    assert log.startswith("sllm: starting a fresh process: the node's warm pool did not answer")

    # The head starts another pool on node_b, and the next job there is warm again.
    new = wait_for(lambda: pool_children(cluster).get("node_b"), 120, "a new pool on node_b")
    assert parent_of(next(iter(new))) != pool_actor
    placed = placement(srv, completed_job(srv, storage, "tiny/adapters/warm-again"))
    assert placed["data"]["pooled"] and placed["data"]["pid"] in new
