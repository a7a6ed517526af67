"""One server per storage path: a second `sllm start` on a store in use exits at once naming the
holder, and leaves the first server's running job alone; the lock dies with its holder (SIGKILL
included). The running job's output_dir is taken: a second job for it is a 409 over HTTP."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from sllm.jobs.db import read_active_jobs
from sllm.paths import db_path
from sllm.serverlock import StorageInUseError, acquire_server_lock, read_holder
from tests.conftest import TINY, free_port, job_config, pid_alive, wait_dead, wait_progress


def test_the_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    store = tmp_path / "store"
    held = acquire_server_lock(store, host="127.0.0.1", port=8999)
    assert read_holder(store)["pid"] > 0 and read_holder(store)["port"] == 8999
    with pytest.raises(StorageInUseError) as err:
        acquire_server_lock(store, host="127.0.0.1", port=9000)
    assert "listening on 127.0.0.1:8999" in err.value.message
    assert f"pid {read_holder(store)['pid']}" in err.value.message
    held.release()
    again = acquire_server_lock(store, host="127.0.0.1", port=9000)
    assert read_holder(store)["port"] == 9000
    again.release()


def start_second(storage) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sllm.cli.main", "start", "--storage-path", str(storage)]
    started = time.monotonic()
    out = subprocess.run(
        [*cmd, "--port", str(free_port())], capture_output=True, text=True, timeout=120
    )
    out.elapsed = time.monotonic() - started
    return out


@pytest.mark.slow
def test_a_second_server_exits_at_once_and_the_lock_dies_with_its_holder(storage, server_factory):
    first = server_factory(storage, "--num-cpus", "1")
    epochs = {"num_train_epochs": 500}
    long = job_config(storage, output_dir="adapters/long", training_config=epochs)
    job = first.client.post("/v1/fine_tuning/jobs", json=long).json()["job_id"]
    step = wait_progress(first, job)["status"]["progress"]["step"]
    [rec] = read_active_jobs(db_path(storage))
    worker = rec.worker_pid
    assert rec.id == job and pid_alive(worker)

    out = start_second(storage)
    assert out.returncode == 1, out.stderr
    assert f"pid {first.proc.pid}" in out.stderr and f":{first.port}" in out.stderr
    assert "already in use" in out.stderr and "--storage-path" in out.stderr
    assert "Traceback" not in out.stderr
    assert out.elapsed < 30  # before it loads anything or touches a job
    # the first server's job was not "recovered": same worker, still training, not re-queued
    assert pid_alive(worker)
    body = wait_progress(first, job)
    assert body["status"]["status"] == "running" and body["status"]["progress"]["step"] >= step
    events = first.client.get(f"/v1/fine_tuning/jobs/{job}/events").json()["data"]
    assert not any("re-queued" in e["message"] for e in events)

    # its output_dir is taken while it runs; the store's own names are refused; nothing is stored
    clash = first.client.post("/v1/fine_tuning/jobs", json=long)
    assert clash.status_code == 409, clash.text
    assert job in clash.json()["error"]["message"]
    assert clash.json()["error"]["param"] == "backend_config.output_dir"
    hidden = job_config(storage, output_dir="adapters/.tmp-1-abc-host")
    refused = first.client.post("/v1/fine_tuning/jobs", json=hidden)
    assert refused.status_code == 400 and "starts with '.'" in refused.text
    assert [j["id"] for j in first.client.get("/v1/fine_tuning/jobs").json()["data"]] == [job]

    first.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
    wait_dead(worker)
    again = server_factory(storage, "--num-cpus", "1")
    assert read_holder(storage)["pid"] == again.proc.pid
    again.client.post(f"/v1/fine_tuning/jobs/{job}/cancel")
    again.wait_status(job, {"cancelled"})


@pytest.mark.slow
def test_store_delete_of_a_deployed_model_then_its_cold_start_is_a_clear_404(
    storage, server_factory
):
    from tests.store.test_store_cli import run_cli

    srv = server_factory(storage, "--num-cpus", "1")
    srv.cli("deploy", "--model", TINY)
    refused = run_cli("delete", "--model", TINY, "--storage-path", str(storage))
    assert refused.returncode == 1 and f"deployment {TINY!r}" in refused.stderr
    forced = run_cli("delete", "--model", TINY, "--storage-path", str(storage), "--force")
    assert forced.returncode == 0 and "this breaks:" in forced.stderr

    chat = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    r = srv.client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert "no longer in the store" in error["message"] and "sllm-store save" in error["message"]
    assert "Traceback" not in r.text and error["param"] == "model"
    assert srv.client.get(f"/v1/deployments/{TINY}").json()["instances"] == []
