"""The real worker process (`python -m sllm.jobs.worker`, started by the real `LocalLauncher`,
training the tiny model): what SIGTERM does to it, where its files go, how it reports a failure.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sllm.finetune.base import ValidationContext, get_backend
from sllm.finetune.checkpoints import latest_complete_checkpoint, read_state
from sllm.jobs.db import JobStore
from sllm.jobs.launcher import LocalLauncher
from sllm.jobs.resources import Allocation
from sllm.jobs.states import JobStatus
from sllm.jobs.worker import EXIT_STOPPED
from sllm.paths import db_path, jobs_dir
from sllm.procpool import WarmPool
from tests.conftest import TINY, job_config, wait_for


@pytest.fixture
def jobs(storage, tmp_path, monkeypatch):
    """(store, run): `run(job_id)` starts the job's worker (in a warm pool process, as the server
    does by default) and returns its handle."""
    shared = tmp_path / "shared-datasets-cache"  # the server's own cache: the job must not use it
    monkeypatch.setenv("HF_DATASETS_CACHE", str(shared))  # also the warm process's, at import
    store = JobStore(db_path(storage))
    warm = WarmPool(1, tmp_path / "warm-pool.log").start()
    launcher = LocalLauncher(db_path(storage), jobs_dir(storage), warm)

    def run(job_id: str):
        store.transition(job_id, JobStatus.RUNNING, message="started by the test")
        return launcher.launch(job_id, Allocation(job_id, 1), on_exit=lambda: None)

    yield store, run, shared
    warm.stop()
    store.close()


def create(store: JobStore, storage: Path, data_files: str | None = None, **training) -> str:
    cfg = job_config(storage, training_config=training)
    cfg["backend_config"]["checkpoint_minutes"] = 0  # no periodic checkpoints: only the stop's
    if data_files:
        cfg["backend_config"]["dataset_config"]["data_files"] = data_files
    ctx = ValidationContext(storage, data_roots=[storage, storage.parent], model=TINY)
    normalised = get_backend("peft_lora").validate(cfg["backend_config"], ctx)
    return store.create(
        model=TINY,
        ft_backend="peft_lora",
        num_cpus=1,
        num_gpus=0,
        timeout=600,
        priority=0,
        config=cfg,
        backend_config=normalised,
    ).id


def messages(store: JobStore, job_id: str) -> list[str]:
    return [e["message"] for e in store.events(job_id, limit=10_000)[0]]


@pytest.mark.slow  # two worker starts and 60 steps: ~40 s on 2 busy cores
def test_sigterm_while_training_saves_a_checkpoint_and_the_next_run_resumes_from_it(storage, jobs):
    store, run, shared = jobs
    job = create(store, storage, max_steps=60)
    handle = run(job)
    wait_for(
        lambda: (store.get(job).progress or {}).get("step", 0) >= 2 or handle.poll() is not None,
        120,
    )
    assert handle.poll() is None, "the run ended before it could be stopped"
    handle.terminate()
    rc = handle.proc.wait(timeout=60)
    assert rc == EXIT_STOPPED, (handle.log_path.read_text()[-2000:], rc)

    scratch = jobs_dir(storage) / job / "trainer"
    checkpoint = latest_complete_checkpoint(scratch)
    assert checkpoint is not None, "no checkpoint saved on SIGTERM"
    step = read_state(checkpoint)["global_step"]
    assert 2 <= step < 60
    assert f"Stopped at step {step}; checkpoint-{step} saved." in " ".join(messages(store, job))
    assert store.get(job).error_message is None and store.get(job).adapter_path is None

    # What `datasets` wrote for the local file is in the job's directory, not the shared cache.
    job_dir = jobs_dir(storage) / job
    assert list((job_dir / "datasets").rglob("*.arrow"))
    assert not shared.exists() or not list(shared.rglob("*.arrow"))

    handle = run(job)
    assert handle.proc.wait(timeout=300) == 0, handle.log_path.read_text()[-3000:]
    rec = store.get(job)
    assert rec.adapter_path and rec.progress["step"] == 60
    resumed = [m for m in messages(store, job) if m.startswith("Resuming from checkpoint-")]
    assert resumed == [
        f"Resuming from checkpoint-{step}, written by an earlier attempt of this job (step {step})."
    ]


def test_sigterm_before_training_stops_at_once(storage, jobs):
    store, run, _ = jobs
    job = create(store, storage, max_steps=150)
    handle = run(job)
    wait_for(lambda: any("Loading base model" in m for m in messages(store, job)), 120)
    started = time.monotonic()
    handle.terminate()
    assert handle.proc.wait(timeout=60) == EXIT_STOPPED
    assert time.monotonic() - started < 30
    assert store.get(job).progress is None  # no step trained, none lost
    assert any("Stopped before" in m for m in messages(store, job))


def test_a_failing_worker_reports_one_line_and_keeps_the_traceback_in_its_log(
    storage, jobs, tmp_path
):
    """The dataset vanished between submit and run (outside the store): the job's error says so
    in one line, without the file's location; the traceback is in the worker's log."""
    store, run, _ = jobs
    outside = tmp_path / "elsewhere" / "train.jsonl"
    outside.parent.mkdir()
    outside.write_text((storage / "data" / "train.jsonl").read_text())
    job = create(store, storage, data_files=str(outside), max_steps=2)
    outside.unlink()
    handle = run(job)
    assert handle.proc.wait(timeout=120) == 1
    rec = store.get(job)
    message = rec.error_message
    assert rec.error_kind == "worker_error" and message, rec
    assert "\n" not in message and "Traceback" not in message
    assert str(outside.parent) not in message and "site-packages" not in message
    assert f"_jobs/{job}/worker.log" in message
    log = handle.log_path.read_text()
    assert "Traceback (most recent call last)" in log and str(outside) in log


@pytest.mark.slow
def test_sigterm_for_a_cancelled_job_kills_the_worker_without_a_checkpoint(storage, jobs):
    """Cancel and timeout write the status, then SIGTERM: the worker dies at once, as before,
    instead of spending a step and a checkpoint on a job that will not run again."""
    store, run, _ = jobs
    job = create(store, storage, max_steps=500)
    handle = run(job)
    wait_for(
        lambda: (store.get(job).progress or {}).get("step", 0) >= 2 or handle.poll() is not None,
        120,
    )
    assert store.transition(job, JobStatus.CANCELLED, message="Cancelled by user.")
    handle.terminate()
    assert handle.proc.wait(timeout=30) == -15
    assert latest_complete_checkpoint(jobs_dir(storage) / job / "trainer") is None
