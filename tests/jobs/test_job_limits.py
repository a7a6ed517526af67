"""Limits on what a job leaves behind: loss events of long runs, old logs, error messages."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest
from job_helpers import FakeLauncher, add

from sllm.jobs.db import JobStore
from sllm.jobs.messages import readable_error, scrub_paths
from sllm.jobs.resources import ResourcePool
from sllm.jobs.states import JobStatus
from sllm.jobs.supervisor import Supervisor
from sllm.jobs.worker import LOSS_STRIDE_DIVISOR, DbReporter


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "store" / "sllm.db")
    yield s
    s.close()


# --- loss events ---------------------------------------------------------------------------


def test_a_million_step_job_writes_about_a_thousand_loss_events(store):
    """Every step is logged (as the backend does on CPU); the events table gets every step at
    first, then a stride growing with the step, and always the last one; progress follows every
    step (throttled in time only)."""
    job = add(store)
    reporter = DbReporter(store, job)
    total = 1_000_000
    for step in range(1, total + 1):
        reporter.progress(step=step, total_steps=total, loss=1.0 / step)
        reporter.event("loss", f"step {step}/{total}", {"step": step, "loss": 1.0 / step})
    reporter.flush()
    events, _ = store.events(job, limit=10_000)
    steps = [e["data"]["step"] for e in events if e["type"] == "loss"]
    assert len(steps) < 1_500, len(steps)
    assert steps[: 2 * LOSS_STRIDE_DIVISOR] == list(range(1, 2 * LOSS_STRIDE_DIVISOR + 1))
    assert steps[-1] == total and steps == sorted(steps)
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert max(gaps) <= total // LOSS_STRIDE_DIVISOR  # no long silence either
    notes = [e for e in events if e["type"] == "info" and "thinned" in e["message"]]
    assert len(notes) == 1 and notes[0]["data"]["step"] == 2 * LOSS_STRIDE_DIVISOR + 1
    assert store.get(job).progress["step"] == total


def test_short_jobs_keep_every_loss_event(store):
    job = add(store)
    reporter = DbReporter(store, job)
    for step in range(1, 151):
        reporter.progress(step=step, total_steps=150)
        reporter.event("loss", f"step {step}", {"step": step, "loss": 0.5})
    events, _ = store.events(job, limit=1000)
    assert [e["data"]["step"] for e in events if e["type"] == "loss"] == list(range(1, 151))


# --- log retention ---------------------------------------------------------------------------


def _job_dir(root: Path, name: str, age_s: float = 0.0) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "worker.log").write_text("log\n")
    if age_s:
        past = time.time() - age_s
        for p in (d / "worker.log", d):
            os.utime(p, (past, past))
    return d


def test_logs_of_jobs_ended_longer_ago_than_the_retention_are_deleted(store, tmp_path):
    root = tmp_path / "store" / "_jobs"
    day = 86400.0
    sup = Supervisor(
        store, FakeLauncher(), ResourcePool(1, []), scratch_root=root, log_retention_s=7 * day
    )
    old, recent, queued = add(store), add(store), add(store)
    for job in (old, recent):
        store.transition(job, JobStatus.CANCELLED, message="by the test")
    store._exec(
        "UPDATE jobs SET finished_time = '2000-01-01T00:00:00' WHERE id = ?", (old,)
    )  # ended long ago
    dirs = {job: _job_dir(root, job) for job in (old, recent, queued)}
    dirs[queued] = _job_dir(root, queued, age_s=30 * day)  # old files, but still pending
    orphan_old = _job_dir(root, "job-deleted-long-ago", age_s=30 * day)
    orphan_new = _job_dir(root, "job-unknown-but-fresh")

    assert sup.sweep_logs() == 2
    assert not dirs[old].exists() and not orphan_old.exists()
    assert dirs[recent].exists() and dirs[queued].exists() and orphan_new.exists()


def test_the_sweep_runs_at_start_and_hourly_and_a_job_ending_drops_its_scratch_not_its_log(
    store, tmp_path
):
    root = tmp_path / "store" / "_jobs"
    launcher = FakeLauncher()
    sup = Supervisor(store, launcher, ResourcePool(1, []), scratch_root=root, log_retention_s=0)
    job = add(store)
    sup.tick()
    d = _job_dir(root, job)
    for part in ("trainer/checkpoint-1", "datasets/json", "tmp/x"):
        (d / part).mkdir(parents=True)
    launcher.handles[job].rc = 1
    sup.tick()  # reaped: failed; its scratch goes, the log stays until the next sweep
    assert store.get(job).status is JobStatus.FAILED
    assert sorted(p.name for p in d.iterdir()) == ["worker.log"]
    sup.tick()  # not an hour yet
    assert d.exists()
    Supervisor(store, launcher, ResourcePool(1, []), scratch_root=root, log_retention_s=0).recover()
    assert not d.exists()


# --- error messages --------------------------------------------------------------------------


def test_error_messages_are_one_line_without_traceback_or_paths_outside_the_store(store):
    storage = store.path.parent
    inside = storage / "transformers" / "tiny" / "config.json"
    text = (
        "OSError: cannot read /etc/passwd:\n"
        f"nor {inside}; see https://example.com/a/b and the route /v1/fine_tuning/jobs\n"
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3/site-packages/datasets/load.py", line 10, in load\n'
        "    raise OSError\n"
    )
    out = readable_error(text, storage)
    assert "\n" not in out and "Traceback" not in out and "site-packages" not in out
    assert "/etc/passwd" not in out and "…/passwd" in out
    assert str(inside) in out  # paths inside the store are fine to show
    assert "https://example.com/a/b" in out and "/v1/fine_tuning/jobs" in out
    assert out.endswith(".")
    assert len(readable_error("word " * 1000, storage)) <= 1002

    job = add(store)
    store.set_error(job, text, "worker_error")
    assert store.get(job).error_message == out
    store.transition(job, JobStatus.RUNNING, message="x")
    store.transition(job, JobStatus.FAILED, message=text, error_kind="worker_crashed")
    rec = store.get(job)
    assert rec.error_message == out
    assert store.events(job)[0][-1]["message"] == out  # the event says what the API says


def test_scrubbing_leaves_a_relative_path_and_a_store_path_alone(tmp_path):
    assert scrub_paths("data/train.jsonl is bad", tmp_path) == "data/train.jsonl is bad"
    assert scrub_paths(f"{tmp_path}/x.json.", tmp_path) == f"{tmp_path}/x.json."
    assert scrub_paths("/tmp/secret/file.txt: no", None) == "…/file.txt: no"
