"""Instances and fine-tuning jobs share the server's CPUs; min/max instances; restarts.

Each test runs its own `sllm start` with a small CPU budget, real job workers and real
instance processes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import LLAMA, OPT, ServerProcess, seed_job_config

from tests.conftest import wait_for

pytestmark = pytest.mark.slow

CHAT = {"model": LLAMA, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def long_job(server: ServerProcess, output_dir: str) -> str:
    cfg = seed_job_config(num_train_epochs=10000)
    cfg["backend_config"]["output_dir"] = output_dir
    r = server.client.post("/v1/fine-tuning/jobs", json=cfg)
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def job_status(server: ServerProcess, job_id: str) -> str:
    return server.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]["status"]


def test_jobs_and_instances_never_share_a_cpu(store):
    server = ServerProcess(store, "--num-cpus", "1").start()
    try:
        job = long_job(server, "adapters/long-1")
        server.wait_status(job, {"running"})
        server.cli("deploy", "--model", LLAMA, "--keep-alive", "2")
        refused = server.client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert "fine-tuning jobs" in refused.json()["error"]["message"]
        server.client.post(f"/v1/fine_tuning/jobs/{job}/cancel")
        server.wait_status(job, {"cancelled"})
        # the CPU frees once the worker is gone; a client follows Retry-After until then
        chat = lambda: server.client.post("/v1/chat/completions", json=CHAT).status_code == 200  # noqa: E731
        wait_for(chat, 30, "the instance to get the CPU back")

        # the warm instance now holds the CPU: a new job waits until the instance scales to zero
        second = long_job(server, "adapters/long-2")
        time.sleep(1.0)
        assert job_status(server, second) == "pending"
        assert server.deployment(LLAMA)["state"] == "warm"
        wait_for(lambda: job_status(server, second) == "running", 30, "the job to start")
        assert server.deployment(LLAMA)["instances"] == []
        server.client.post(f"/v1/fine_tuning/jobs/{second}/cancel")
        server.wait_status(second, {"cancelled"})
    finally:
        server.stop()


def test_min_instances_scale_out_and_restart(store):
    server = ServerProcess(store, "--num-cpus", "2").start()
    try:
        server.cli(
            "deploy", "--model", OPT, "--min-instances", "1", "--max-instances", "2",
            "--target", "1", "--keep-alive", "1",
        )  # fmt: skip
        ready = lambda: [i for i in server.deployment(OPT)["instances"] if i["state"] == "ready"]  # noqa: E731
        wait_for(ready, 60, "min_instances to start an instance without any request")
        body = {"model": OPT, "prompt": "Hello", "max_tokens": 64, "temperature": 0}
        seen: set[str] = set()
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(post, server, body) for _ in range(2)]
            while not all(f.done() for f in futures):
                seen |= {i["id"] for i in server.deployment(OPT)["instances"]}
                time.sleep(0.05)
        assert [f.result().status_code for f in futures] == [200, 200]
        assert len(seen) == 2  # load beyond one instance's target started another
        wait_for(lambda: len(server.deployment(OPT)["instances"]) == 1, 30, "scale down to min")
        time.sleep(1.5)
        assert len(server.deployment(OPT)["instances"]) == 1  # never below min_instances
    finally:
        server.stop()

    restarted = ServerProcess(store, "--num-cpus", "2").start()
    try:
        status = restarted.deployment(OPT)
        assert status["config"]["min_instances"] == 1  # the deployment survived the restart
        wait_for(lambda: restarted.deployment(OPT)["state"] == "warm", 60, "the warm instance")
        restarted.cli("delete", OPT)
    finally:
        restarted.stop()


def post(server: ServerProcess, body: dict):
    return server.client.post("/v1/completions", json=body)
