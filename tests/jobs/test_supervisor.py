"""Scheduling rules of the supervisor, driven pass by pass with a fake launcher.

The real worker processes are exercised end to end in tests/api; here only the decisions
(order, backfill, starvation, deadlines, reaping) are checked, deterministically.
"""

from __future__ import annotations

import time

import pytest
from job_helpers import FakeLauncher, add, complete

from sllm.jobs.db import JobStore
from sllm.jobs.resources import ResourcePool
from sllm.jobs.states import JobStatus
from sllm.jobs.supervisor import Supervisor


@pytest.fixture
def env(tmp_path):
    store = JobStore(tmp_path / "sllm.db")
    launcher = FakeLauncher()

    def make(cpus=1, gpus=0, **kw):
        pool = ResourcePool(cpus, list(range(gpus)))
        sup = Supervisor(store, launcher, pool, kill_grace_s=0.0, **kw)
        return sup

    yield store, launcher, make
    store.close()


def test_priority_then_fifo(env):
    store, launcher, make = env
    sup = make(cpus=1)
    a, b, c, d = add(store, 0), add(store, 5), add(store, 0), add(store, 5)
    for _ in range(4):
        sup.tick()
        running = sup.running_ids()
        assert len(running) == 1
        complete(store, launcher, running[0])
    sup.tick()
    assert launcher.order == [b, d, a, c]
    assert all(store.get(j).status is JobStatus.COMPLETED for j in (a, b, c, d))


def test_jobs_run_concurrently_within_capacity(env):
    store, launcher, make = env
    sup = make(cpus=4, gpus=2)
    ids = [add(store, cpus=1, gpus=1), add(store, cpus=2, gpus=1), add(store, cpus=1, gpus=1)]
    sup.tick()
    assert sorted(sup.running_ids()) == sorted(ids[:2])
    gpus = [store.get(j).resources["gpu_ids"] for j in ids[:2]]
    assert sorted(g for gs in gpus for g in gs) == [0, 1]  # no GPU handed out twice
    assert store.get(ids[2]).status is JobStatus.PENDING
    complete(store, launcher, ids[0])
    sup.tick()
    assert ids[2] in sup.running_ids()


def test_a_full_pool_skips_reading_the_queue(env, monkeypatch):
    """With every CPU taken a pass costs nothing per queued job (1,000 queued submissions each
    woke a pass that parsed the whole queue); the queue is read again once room appears."""
    store, launcher, make = env
    sup = make(cpus=1)
    first, *queued = [add(store) for _ in range(50)]
    sup.tick()
    assert sup.running_ids() == [first]
    reads = []
    real = store.pending_in_order
    monkeypatch.setattr(store, "pending_in_order", lambda: reads.append(1) or real())
    for _ in range(5):
        sup.tick()
    assert reads == [] and all(store.get(j).status is JobStatus.PENDING for j in queued)
    complete(store, launcher, first)
    sup.tick()
    assert reads == [1] and sup.running_ids() == [queued[0]]


def test_small_job_backfills_past_one_that_does_not_fit(env):
    store, launcher, make = env
    sup = make(cpus=4, starvation_s=3600)
    first = add(store, cpus=3)
    sup.tick()
    big, small = add(store, priority=9, cpus=4), add(store, cpus=1)
    sup.tick()
    assert sorted(sup.running_ids()) == sorted([first, small])
    assert store.get(big).status is JobStatus.PENDING


def test_starving_job_reserves_resources(env):
    store, launcher, make = env
    sup = make(cpus=4, starvation_s=0.0)
    first = add(store, cpus=3)
    sup.tick()
    big, small = add(store, priority=9, cpus=4), add(store, cpus=1)
    sup.tick()
    assert sup.running_ids() == [first]
    complete(store, launcher, first)
    sup.tick()
    assert sup.running_ids() == [big]
    assert store.get(small).status is JobStatus.PENDING


def test_timeout_stops_worker_and_fails_job(env):
    store, launcher, make = env
    sup = make(cpus=1)
    job = add(store, timeout=0.05)
    waiting = add(store)
    sup.tick()
    time.sleep(0.1)
    sup.tick()
    rec = store.get(job)
    assert rec.status is JobStatus.FAILED and rec.error_kind == "timeout"
    assert "timeout of 0.05 s" in rec.error_message
    assert launcher.handles[job].signals[0] == "TERM"
    sup.tick()  # grace 0: escalates to SIGKILL; the exit is reaped and the CPU freed
    sup.tick()
    assert launcher.handles[job].signals == ["TERM", "KILL"]
    assert sup.running_ids() == [waiting]


def test_cancelled_running_job_is_killed(env):
    store, launcher, make = env
    sup = make(cpus=1)
    job = add(store)
    sup.tick()
    assert store.transition(job, JobStatus.CANCELLED, message="Cancelled by user.")
    sup.tick()
    assert launcher.handles[job].signals == ["TERM"]
    launcher.handles[job].rc = -15
    sup.tick()
    assert sup.running_ids() == [] and sup.pool.held() == {}
    assert store.get(job).status is JobStatus.CANCELLED


def test_crashed_worker_fails_with_one_line_pointing_at_its_log(env):
    """The log's last lines (a traceback) stay in the job's log, not in `error.message`."""
    store, launcher, make = env
    sup = make(cpus=1)
    job = add(store)
    sup.tick()
    launcher.handles[job].rc = -9
    sup.tick()
    rec = store.get(job)
    assert rec.status is JobStatus.FAILED and rec.error_kind == "worker_crashed"
    assert "signal 9" in rec.error_message and f"_jobs/{job}/worker.log" in rec.error_message
    assert "Traceback" not in rec.error_message and "\n" not in rec.error_message


def test_worker_error_reason_is_kept(env):
    store, launcher, make = env
    sup = make(cpus=1)
    job = add(store)
    sup.tick()
    store.set_error(job, "KeyError: 'prompt'", "worker_error")
    launcher.handles[job].rc = 1
    sup.tick()
    rec = store.get(job)
    assert rec.status is JobStatus.FAILED and rec.error_kind == "worker_error"
    assert rec.error_message.startswith("KeyError: 'prompt'")


def test_exit_zero_without_result_is_a_failure(env):
    store, launcher, make = env
    sup = make(cpus=1)
    job = add(store)
    sup.tick()
    launcher.handles[job].rc = 0
    sup.tick()
    assert store.get(job).status is JobStatus.FAILED


def test_recover_requeues_once_then_fails(env):
    store, launcher, make = env
    job = add(store)
    sup = make(cpus=1)
    sup.tick()
    assert store.get(job).attempts == 1
    # the server "dies" here; a new supervisor recovers
    sup2 = make(cpus=1)
    sup2.recover()
    assert store.get(job).status is JobStatus.PENDING
    sup2.tick()
    assert store.get(job).attempts == 2
    sup3 = make(cpus=1)
    sup3.recover()
    rec = store.get(job)
    assert rec.status is JobStatus.FAILED and rec.error_kind == "server_restart"


def test_job_larger_than_capacity_fails_instead_of_waiting_forever(env):
    store, launcher, make = env
    job = add(store, cpus=8)
    sup = make(cpus=2)
    sup.tick()
    rec = store.get(job)
    assert rec.status is JobStatus.FAILED and rec.error_kind == "unschedulable"


def test_transition_table_is_enforced(env):
    store, _, _ = env
    job = add(store)
    assert not store.transition(job, JobStatus.COMPLETED, message="x")  # pending -> completed
    assert store.transition(job, JobStatus.CANCELLED, message="x")
    assert not store.transition(job, JobStatus.RUNNING, message="x")  # terminal stays terminal


def test_checkpoints_are_kept_for_a_requeued_job_and_deleted_when_it_ends(env, tmp_path):
    store, launcher, make = env
    root = tmp_path / "_jobs"

    def scratch(job):
        path = root / job / "trainer" / "checkpoint-3"
        path.mkdir(parents=True, exist_ok=True)
        return path.parent

    sup = make(cpus=2, scratch_root=root)
    done, failed, cancelled = add(store), add(store), add(store)
    sup.tick()
    for job in (done, failed):
        scratch(job)
    complete(store, launcher, done)
    launcher.handles[failed].rc = 1
    sup.tick()
    assert not (root / done / "trainer").exists() and not (root / failed / "trainer").exists()
    scratch(cancelled)
    assert sup.running_ids() == [cancelled]
    store.transition(cancelled, JobStatus.CANCELLED, message="by the test")
    sup.tick()  # SIGTERM; the fake worker ignores it
    sup.tick()  # SIGKILL after the (zero) grace period
    sup.tick()  # reaped
    assert not (root / cancelled / "trainer").exists()

    # A server restart re-queues a running job: its checkpoints are what it resumes from.
    again = add(store)
    sup.tick()
    kept = scratch(again)
    fresh = make(cpus=2, scratch_root=root)
    fresh.recover()
    assert store.get(again).status is JobStatus.PENDING and kept.exists()
    fresh.tick()
    fresh.recover()  # second restart: attempts used up, the job fails and its scratch goes
    assert store.get(again).status is JobStatus.FAILED and not kept.exists()


def test_checkpoints_go_when_a_requeued_job_ends_without_running_again(env, tmp_path):
    """Cancelled while pending (no worker to reap) or failed as unschedulable: the checkpoints
    it kept for resuming are deleted too."""
    from sllm.config import Settings
    from sllm.jobs.service import JobService

    store, launcher, make = env
    root = tmp_path / "_jobs"
    sup = make(cpus=1, scratch_root=root)
    cancelled, too_big = add(store), add(store, cpus=4)
    for job in (cancelled, too_big):
        (root / job / "trainer" / "checkpoint-2").mkdir(parents=True)
    service = JobService(Settings(storage_path=tmp_path), store, sup.pool, sup)
    assert service.cancel(cancelled).status.status == "cancelled"
    assert not (root / cancelled / "trainer").exists()
    sup.tick()
    assert store.get(too_big).status is JobStatus.FAILED
    assert not (root / too_big / "trainer").exists()
