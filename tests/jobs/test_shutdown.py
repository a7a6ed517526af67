"""A clean shutdown is not a crash: the rules of `Supervisor.stop` and `recover`, pass by pass.

The real thing (a server SIGTERMed while its job trains, restarted, the job resumed) is in
tests/jobs/test_graceful_stop_e2e.py; here the decisions are checked with a fake launcher.
"""

from __future__ import annotations

import sqlite3

import pytest
from job_helpers import FakeHandle, FakeLauncher, add, complete

from sllm.jobs.db import JobStore
from sllm.jobs.resources import ResourcePool
from sllm.jobs.states import JobStatus
from sllm.jobs.supervisor import Supervisor
from sllm.jobs.worker import EXIT_STOPPED


class StoppingHandle(FakeHandle):
    """A worker that saves its checkpoint and exits when asked to stop."""

    def terminate(self) -> None:
        super().terminate()
        self.rc = EXIT_STOPPED


class StoppingLauncher(FakeLauncher):
    def __init__(self, handle_type=StoppingHandle) -> None:
        super().__init__()
        self.handle_type = handle_type

    def launch(self, job_id, alloc, on_exit):
        handle = self.handle_type()
        self.handles[job_id] = handle
        self.order.append(job_id)
        return handle


@pytest.fixture
def env(tmp_path):
    store = JobStore(tmp_path / "sllm.db")

    def make(launcher, cpus=2, **kw):
        kw.setdefault("kill_grace_s", 0.0)
        return Supervisor(store, launcher, ResourcePool(cpus, []), **kw)

    yield store, make
    store.close()


def test_clean_shutdowns_requeue_without_using_up_the_crash_requeue(env):
    """Today's bug: two clean restarts failed a job with "giving up". Now any number of clean
    stops re-queue it; the one crash re-queue is still there afterwards, and used by a crash."""
    store, make = env
    job = add(store)
    for n in range(3):
        launcher = StoppingLauncher()
        sup = make(launcher)
        sup.recover()
        sup.tick()
        assert sup.running_ids() == [job]
        sup.stop(grace_s=5)
        assert launcher.handles[job].signals == ["TERM"]  # asked to checkpoint, not killed
        rec = store.get(job)
        assert rec.status is JobStatus.PENDING, rec
        assert rec.attempts == n + 1 and rec.crash_requeues == 0
        assert sup.pool.held() == {}

    crashed = make(StoppingLauncher())
    crashed.tick()  # runs again; then the server dies without stopping it (SIGKILL)
    make(StoppingLauncher()).recover()
    rec = store.get(job)
    assert rec.status is JobStatus.PENDING and rec.crash_requeues == 1
    make(StoppingLauncher()).tick()
    make(StoppingLauncher()).recover()  # a second crash: that one is charged and used up
    rec = store.get(job)
    assert rec.status is JobStatus.FAILED and rec.error_kind == "server_restart"
    assert "re-queued 1 time(s) after a crash" in rec.error_message
    events = [e["message"] for e in store.events(job)[0]]
    assert sum("clean server shutdown" in m for m in events) == 3


def test_a_worker_that_does_not_stop_in_time_is_killed_and_still_requeued_uncharged(env):
    store, make = env
    launcher = FakeLauncher()  # ignores SIGTERM
    sup = make(launcher)
    job = add(store)
    sup.tick()
    sup.stop(grace_s=0.1)
    assert launcher.handles[job].signals == ["TERM", "KILL"]
    rec = store.get(job)
    assert rec.status is JobStatus.PENDING and rec.crash_requeues == 0


def test_server_killed_during_the_shutdown_grace_is_still_a_clean_stop(env):
    """The marker is written before the worker is signalled: a server SIGKILLed while it waits
    (a second Ctrl-C, a container runtime's deadline) leaves the job `running` but marked, and the
    next start re-queues it without charging a crash."""
    store, make = env
    sup = make(FakeLauncher())
    job = add(store)
    sup.tick()
    assert store.mark_clean_stop(job, "Server shutting down.")
    # ... and the server dies here, before re-queueing it
    fresh = make(StoppingLauncher())
    fresh.recover()
    rec = store.get(job)
    assert rec.status is JobStatus.PENDING and rec.crash_requeues == 0
    fresh.tick()
    rec = store.get(job)
    assert rec.status is JobStatus.RUNNING and not rec.clean_stop  # the next run starts unmarked
    make(StoppingLauncher()).recover()  # this time a crash: charged
    assert store.get(job).crash_requeues == 1


def test_shutdown_lets_a_finishing_job_complete_and_leaves_cancelled_ones_cancelled(env):
    store, make = env
    launcher = FakeLauncher()
    sup = make(launcher, cpus=3)
    done, cancelled, pending = add(store), add(store), add(store, cpus=3)
    sup.tick()
    complete(store, launcher, done)  # its worker exits 0 with the adapter during the grace
    store.transition(cancelled, JobStatus.CANCELLED, message="by the test")
    sup.stop(grace_s=0.1)
    assert store.get(done).status is JobStatus.COMPLETED
    assert store.get(cancelled).status is JobStatus.CANCELLED
    assert store.get(pending).status is JobStatus.PENDING and store.get(pending).attempts == 0
    assert launcher.handles[done].signals == ["TERM"]


def test_a_worker_stopped_by_a_sigterm_from_elsewhere_is_requeued_uncharged(env):
    """systemd's default stop sends SIGTERM to every process of the service at once: a worker
    may checkpoint and exit before the server begins its own shutdown. That is no failure."""
    store, make = env
    launcher = FakeLauncher()
    sup = make(launcher, cpus=1)
    job = add(store)
    sup.tick()
    launcher.handles[job].rc = EXIT_STOPPED
    sup._reap()
    rec = store.get(job)
    assert rec.status is JobStatus.PENDING and rec.crash_requeues == 0
    assert "did not come from the server" in store.events(job)[0][-1]["message"]


def test_a_lost_node_uses_the_crash_requeue_too(env):
    store, make = env

    class LostHandle(FakeHandle):
        node_lost = "Ray node abc of the worker was lost."

    sup = make(StoppingLauncher(LostHandle))
    job = add(store)
    sup.tick()
    sup.stop(grace_s=1)  # first a clean stop: not counted
    assert store.get(job).crash_requeues == 0
    launcher = StoppingLauncher(LostHandle)
    sup = make(launcher)
    sup.tick()
    launcher.handles[job].rc = -9
    sup.tick()  # re-queued (charged) and placed again in the same pass
    rec = store.get(job)
    assert rec.status is JobStatus.RUNNING and rec.crash_requeues == 1 and rec.attempts == 3
    launcher.handles[job].rc = -9
    sup.tick()
    rec = store.get(job)
    assert rec.status is JobStatus.FAILED and rec.error_kind == "node_lost"


def test_an_older_database_gets_the_new_columns_with_its_requeues_counted(tmp_path):
    """A database written before `crash_requeues` existed: a job that had already been
    re-queued once (attempts 2) keeps that count, so an upgrade grants no extra re-queue."""
    path = tmp_path / "sllm.db"
    store = JobStore(path)
    once, twice = add(store), add(store)
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE jobs DROP COLUMN crash_requeues")
    conn.execute("ALTER TABLE jobs DROP COLUMN clean_stop")
    conn.execute("UPDATE jobs SET status = 'running', attempts = 1 WHERE id = ?", (once,))
    conn.execute("UPDATE jobs SET status = 'running', attempts = 2 WHERE id = ?", (twice,))
    conn.commit()
    conn.close()
    from sllm.jobs.db import read_active_jobs

    # `sllm-store delete` reads it before any new server has added the columns
    active = {rec.id: rec.crash_requeues for rec in read_active_jobs(path)}
    assert active == {once: 0, twice: 1}
    store = JobStore(path)
    try:
        assert store.get(once).crash_requeues == 0 and store.get(twice).crash_requeues == 1
        Supervisor(store, FakeLauncher(), ResourcePool(1, [])).recover()
        assert store.get(once).status is JobStatus.PENDING
        assert store.get(twice).status is JobStatus.FAILED
    finally:
        store.close()


class DivergingHandle(FakeHandle):
    """A worker whose run diverges during the shutdown grace: it reports and exits 1."""

    store = None
    job_id = None

    def terminate(self) -> None:
        super().terminate()
        self.store.set_error(self.job_id, "Training diverged at step 3.", "diverged")
        self.rc = 1


def test_a_failure_reported_during_the_shutdown_stands(env):
    """A real failure (diverged, bad data) is not turned into a re-queue by the shutdown that
    happened to be under way: the job would run again into the same failure."""
    store, make = env
    job = add(store)
    DivergingHandle.store, DivergingHandle.job_id = store, job
    sup = make(StoppingLauncher(DivergingHandle))
    sup.tick()
    sup.stop(grace_s=5)
    rec = store.get(job)
    assert rec.status is JobStatus.FAILED and rec.error_kind == "diverged", rec
