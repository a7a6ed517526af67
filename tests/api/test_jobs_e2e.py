"""The seed workflow and the job lifecycle through a real server, real workers and real kills."""

from __future__ import annotations

import signal
import time

import pytest

from sllm.jobs.db import JobStore
from tests.conftest import job_config, wait_dead, wait_progress

pytestmark = pytest.mark.slow

LONG = {"num_train_epochs": 10000, "learning_rate": 0.01, "per_device_train_batch_size": 4}


def worker_pid(storage, job_id: str, timeout: float = 60) -> int:
    store = JobStore(storage / "sllm.db")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = store.get(job_id)
            if rec.worker_pid:
                return rec.worker_pid
            time.sleep(0.05)
    finally:
        store.close()
    raise AssertionError("no worker pid recorded")


def test_seed_workflow_trains_a_loadable_adapter(storage, server_factory):
    import torch
    from peft import PeftModel

    from sllm.store import load_model

    srv = server_factory(storage, "--num-cpus", "2")
    cfg = job_config(storage)
    r = srv.client.post("/v1/fine-tuning/jobs", json=cfg)
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    body = srv.wait_status(job_id, {"completed", "failed"})
    st = body["status"]
    assert st["status"] == "completed", st.get("error")
    assert body["id"] == job_id and body["object"] == "fine_tuning.job"
    assert st["config"] == cfg  # echoed as submitted, like the seed's status response
    assert st["priority"] == 0 and st["started_time"] and st["finished_time"]
    progress = st["progress"]
    assert progress["step"] == progress["total_steps"] > 0
    assert progress["loss"] is not None and progress["trained_tokens"] > 0

    adapter = storage / "transformers" / "tiny/adapters/test_adapter"
    assert st["adapter_path"] == str(adapter)
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "training_metadata.json"} <= names

    base, tok = load_model(storage, "tiny/llama")
    ids = tok("Question 3: how are you?", return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**ids).logits
        tuned = PeftModel.from_pretrained(base, adapter)
        tuned_logits = tuned(**ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)

    events = srv.client.get(f"/v1/fine-tuning/jobs/{job_id}/events").json()["data"]
    types = [e["type"] for e in events]
    assert "loss" in types and types.count("status") >= 3
    listed = srv.client.get("/v1/fine_tuning/jobs", params={"status": "completed"}).json()
    assert [j["id"] for j in listed["data"]] == [job_id]

    # cancel of a completed job is refused with the reason; nothing changes
    r = srv.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert r.status_code == 409 and "completed" in r.json()["error"]["message"]


def test_jobs_run_concurrently_and_list_pages(storage, server_factory):
    srv = server_factory(storage, "--num-cpus", "2")
    ids = []
    for i in range(3):
        cfg = job_config(storage, output_dir=f"tiny/adapters/c{i}", training_config=LONG)
        ids.append(srv.client.post("/v1/fine-tuning/jobs", json=cfg).json()["job_id"])
    srv.wait_status(ids[0], {"running"})
    srv.wait_status(ids[1], {"running"})
    assert srv.client.get(f"/v1/fine_tuning/jobs/{ids[2]}").json()["status"]["status"] == "pending"
    page1 = srv.client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page1["data"]] == [ids[2], ids[1]] and page1["has_more"]
    page2 = srv.client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": ids[1]}).json()
    assert [j["id"] for j in page2["data"]] == [ids[0]] and not page2["has_more"]
    for job_id in ids:
        assert srv.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200


def test_cancel_pending_and_running_jobs_kills_the_worker(storage, server_factory):
    srv = server_factory(storage, "--num-cpus", "1")
    running = srv.client.post(
        "/v1/fine-tuning/jobs", json=job_config(storage, training_config=LONG)
    ).json()["job_id"]
    pending = srv.client.post(
        "/v1/fine-tuning/jobs", json=job_config(storage, output_dir="tiny/adapters/p")
    ).json()["job_id"]
    srv.wait_status(running, {"running"})
    r = srv.client.post(f"/v1/fine_tuning/jobs/{pending}/cancel")
    assert r.status_code == 200 and r.json()["status"]["status"] == "cancelled"

    wait_progress(srv, running)
    pid = worker_pid(storage, running)
    r = srv.client.post(f"/v1/fine-tuning/jobs/{running}/cancel")
    assert r.status_code == 200 and r.json()["status"]["status"] == "cancelled"
    wait_dead(pid)
    # cancelling again is fine; the freed CPU lets a new job start
    assert srv.client.post(f"/v1/fine_tuning/jobs/{running}/cancel").status_code == 200
    nxt = srv.client.post(
        "/v1/fine-tuning/jobs", json=job_config(storage, training_config=LONG)
    ).json()["job_id"]
    srv.wait_status(nxt, {"running"}, timeout=30)
    srv.client.post(f"/v1/fine_tuning/jobs/{nxt}/cancel")
    assert srv.client.get(f"/v1/fine_tuning/jobs/{pending}").json()["status"]["status"] == (
        "cancelled"
    )


def test_timeout_kills_the_worker_and_fails_the_job(storage, server_factory):
    srv = server_factory(storage, "--num-cpus", "1")
    cfg = job_config(storage, training_config=LONG, timeout=12)
    job_id = srv.client.post("/v1/fine-tuning/jobs", json=cfg).json()["job_id"]
    srv.wait_status(job_id, {"running"})
    pid = worker_pid(storage, job_id)
    body = srv.wait_status(job_id, {"failed", "completed"}, timeout=60)
    assert body["status"]["status"] == "failed"
    assert body["status"]["error"]["kind"] == "timeout"
    assert "timeout of 12 s" in body["status"]["error"]["message"]
    wait_dead(pid)


def test_worker_killed_by_a_signal_fails_the_job(storage, server_factory):
    srv = server_factory(storage, "--num-cpus", "1")
    cfg = job_config(storage, training_config=LONG)
    job_id = srv.client.post("/v1/fine-tuning/jobs", json=cfg).json()["job_id"]
    wait_progress(srv, job_id)
    import os

    os.kill(worker_pid(storage, job_id), signal.SIGKILL)
    body = srv.wait_status(job_id, {"failed"}, timeout=30)
    err = body["status"]["error"]
    assert err["kind"] == "worker_crashed" and "signal 9" in err["message"]


def test_worker_exception_fails_the_job_with_its_reason(storage, server_factory):
    srv = server_factory(storage, "--num-cpus", "1")
    # Valid at submit (a missing column is a 400 there); every text is empty once tokenized.
    (storage / "data" / "other.jsonl").write_text('{"prompt": ""}\n' * 4)
    cfg = job_config(storage, dataset_config={"data_files": str(storage / "data" / "other.jsonl")})
    job_id = srv.client.post("/v1/fine-tuning/jobs", json=cfg).json()["job_id"]
    body = srv.wait_status(job_id, {"failed", "completed"}, timeout=120)
    err = body["status"]["error"]
    assert body["status"]["status"] == "failed" and err["kind"] == "worker_error"
    assert "prompt" in err["message"]


def test_server_sigkill_loses_no_job(storage, server_factory):
    """The running job is re-queued and resumes from its last checkpoint; checkpoints are gone
    once it completes."""
    from sllm.finetune.checkpoints import latest_complete_checkpoint, read_state

    srv = server_factory(storage, "--num-cpus", "1")
    cfg = job_config(storage, training_config={"num_train_epochs": 12})
    cfg["backend_config"]["checkpoint_minutes"] = 0.005  # every 0.3 s
    first = srv.client.post("/v1/fine-tuning/jobs", json=cfg).json()["job_id"]
    second = srv.client.post(
        "/v1/fine-tuning/jobs", json=job_config(storage, output_dir="tiny/adapters/second")
    ).json()["job_id"]
    wait_progress(srv, first)
    scratch = storage / "_jobs" / first / "trainer"
    deadline = time.monotonic() + 120
    while latest_complete_checkpoint(scratch) is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    pid = worker_pid(storage, first)
    srv.kill(signal.SIGKILL)
    wait_dead(pid)  # the worker dies with its server: no orphan trains on
    saved = read_state(latest_complete_checkpoint(scratch))["global_step"]

    again = server_factory(storage, "--num-cpus", "1")
    for job_id in (first, second):
        body = again.wait_status(job_id, {"completed", "failed"}, timeout=240)
        assert body["status"]["status"] == "completed", body["status"].get("error")
    events = again.client.get(f"/v1/fine_tuning/jobs/{first}/events").json()["data"]
    assert any("re-queued" in e["message"] for e in events)
    resumed = [e for e in events if e["message"].startswith("Resuming from checkpoint-")]
    assert len(resumed) == 1 and resumed[0]["data"]["step"] >= saved > 0, resumed
    assert not scratch.exists()
