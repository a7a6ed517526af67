"""A clean stop of `sllm start` (SIGTERM, Ctrl-C) checkpoints the running job and re-queues it
without using up its crash re-queue: stopped twice and started again, it resumes each time from
the checkpoint the stop saved (no periodic checkpoints here) and completes. Its log is deleted
once `--log-retention-days` have passed."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from sllm.finetune.checkpoints import latest_complete_checkpoint, read_state
from tests.conftest import job_config, record, wait_dead, wait_progress

pytestmark = pytest.mark.slow

STEPS = 80


def wait_gone(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while path.exists():
        assert time.monotonic() < deadline, f"{path} is still there"
        time.sleep(0.05)


def test_sigterm_and_ctrl_c_checkpoint_the_job_and_each_restart_resumes_it(storage, server_factory):
    cfg = job_config(storage, training_config={"max_steps": STEPS})
    assert "checkpoint_minutes" not in cfg["backend_config"]  # default 10 min: none periodic
    srv = server_factory(storage, "--num-cpus", "1")
    job = srv.client.post("/v1/fine-tuning/jobs", json=cfg).json()["job_id"]
    scratch = storage / "_jobs" / job / "trainer"
    stops: list[int] = []
    for n, sig in enumerate((signal.SIGTERM, signal.SIGINT), start=1):
        wait_progress(srv, job)
        pid = record(storage, job).worker_pid
        srv.kill(sig)
        wait_dead(pid)
        rec = record(storage, job)
        assert rec.status.value == "pending", rec
        assert rec.attempts == n and rec.crash_requeues == 0 and rec.worker_pid is None
        step = read_state(latest_complete_checkpoint(scratch))["global_step"]
        assert step > (stops[-1] if stops else 0) and step < STEPS
        stops.append(step)
        srv = server_factory(storage, "--num-cpus", "1")

    body = srv.wait_status(job, {"completed", "failed"}, timeout=300)
    assert body["status"]["status"] == "completed", body["status"].get("error")
    assert body["status"]["progress"]["step"] == STEPS
    events = srv.client.get(f"/v1/fine_tuning/jobs/{job}/events?limit=1000").json()["data"]
    text = [e["message"] for e in events]
    resumed = [e["data"]["step"] for e in events if e["message"].startswith("Resuming from")]
    assert resumed == stops  # each run went on from the stop's checkpoint, none from step 0
    assert sum("clean server shutdown" in m for m in text) == 2
    assert not any("giving up" in m or "Server restarted" in m for m in text)
    wait_gone(scratch)  # the supervisor discards it just after it records the completion
    meta = json.loads((Path(body["status"]["adapter_path"]) / "training_metadata.json").read_text())
    assert meta["steps"] == STEPS and meta["resumed_from"]["step"] == stops[-1]

    # The job's log outlives it until the retention is over: 0 days, at the next start.
    assert (storage / "_jobs" / job / "worker.log").is_file()
    srv.stop()
    server_factory(storage, "--num-cpus", "1", "--log-retention-days", "0")
    assert not (storage / "_jobs" / job).exists()
