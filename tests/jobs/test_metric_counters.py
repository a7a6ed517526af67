"""The monotonic totals /metrics exports (`sllm.jobs.counters`), on a real `JobStore`: they only
grow while jobs restart, survive reopening the database, and an older database upgrades in place
starting from the sums over its rows."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone

import pytest
from job_helpers import add

from sllm.jobs.db import _SCHEMA, JobStore
from sllm.jobs.states import JobStatus


def start(store: JobStore, job_id: str) -> None:
    assert store.transition(job_id, JobStatus.RUNNING, message="started")


def requeue(store: JobStore, job_id: str) -> None:
    """What the supervisor does after a crash or a lost node: back to pending, progress cleared."""
    assert store.transition(job_id, JobStatus.PENDING, message="re-queued", progress_json=None)


def tokens(store: JobStore) -> int:
    return store.metric_totals().trained_tokens


def test_trained_tokens_only_grow_when_a_job_restarts(tmp_path):
    store = JobStore(tmp_path / "sllm.db")
    try:
        job_id = add(store, timeout=60)
        start(store, job_id)
        seen = []
        store.set_progress(job_id, {"step": 5, "trained_tokens": 100})
        seen.append(tokens(store))
        requeue(store, job_id)
        seen.append(tokens(store))
        start(store, job_id)  # no checkpoint: training restarts from 0
        for trained in (40, 90):
            store.set_progress(job_id, {"step": 2, "trained_tokens": trained})
            seen.append(tokens(store))
        assert seen == [100, 100, 140, 190]
        assert store.get(job_id).progress["trained_tokens"] == 90  # the row shows this attempt
    finally:
        store.close()


def test_a_resumed_job_counts_only_what_it_trains_past_its_checkpoint(tmp_path):
    store = JobStore(tmp_path / "sllm.db")
    try:
        job_id = add(store, timeout=60)
        start(store, job_id)
        store.set_progress(job_id, {"trained_tokens": 100})
        requeue(store, job_id)
        start(store, job_id)  # resumes from a checkpoint that had counted 60
        store.set_progress(job_id, {"trained_tokens": 70, "start_trained_tokens": 60})
        assert tokens(store) == 110
        store.set_progress(job_id, {"trained_tokens": 120, "start_trained_tokens": 60})
        assert tokens(store) == 160
        store.set_progress(job_id, {"step": 3})  # a write without a count adds nothing
        store.set_progress(job_id, {"trained_tokens": 130})
        assert tokens(store) == 160 + 130  # no earlier count in this attempt's row: all of it
    finally:
        store.close()


def test_totals_survive_reopening_the_database(tmp_path):
    store = JobStore(tmp_path / "sllm.db")
    job_id = add(store, timeout=60)
    start(store, job_id)
    store.set_progress(job_id, {"trained_tokens": 100})
    requeue(store, job_id)
    store.close()

    store = JobStore(tmp_path / "sllm.db")  # not seeded again from the (now empty) progress
    try:
        assert tokens(store) == 100
        assert store.metric_totals().queue_waits.count == 1
        start(store, job_id)
        store.set_progress(job_id, {"trained_tokens": 30})
        assert tokens(store) == 130
    finally:
        store.close()


def test_each_start_observes_its_own_wait_and_no_bucket_shrinks(tmp_path):
    store = JobStore(tmp_path / "sllm.db")
    try:
        job_id = add(store, timeout=60)
        past = (datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(seconds=3)).isoformat()
        store._conn.execute("UPDATE jobs SET created_time = ? WHERE id = ?", (past, job_id))
        start(store, job_id)
        first = store.metric_totals().queue_waits
        assert first.count == 1 and 3 <= first.total < 4
        assert first.cumulative[:3] == [0, 1, 1]  # bounds 1 s, 5 s, 15 s
        requeue(store, job_id)  # waits again, from the re-queue, not from its submission
        start(store, job_id)
        second = store.metric_totals().queue_waits
        assert second.count == 2 and second.cumulative[0] == 1
        assert all(b >= a for a, b in zip(first.cumulative, second.cumulative, strict=True))
        assert second.total - first.total < 1
    finally:
        store.close()


def test_an_old_database_upgrades_in_place_from_the_sums_over_its_rows(tmp_path):
    path = tmp_path / "sllm.db"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA)  # the first release's tables: no counters, no queued_time
    sql = (
        "INSERT INTO jobs (id, status, priority, model, ft_backend, num_cpus, num_gpus, timeout, "
        "config_json, backend_config_json, created_time, updated_time, started_time, "
        "progress_json) VALUES (?, 'completed', 0, 'm', 'peft_lora', 1, 0, 60, '{}', '{}', ?, ?, "
        "?, ?)"
    )
    t0 = "2025-01-01T00:00:00"
    rows = [("a", "00:00:03", 100), ("b", "00:00:00.500", 20), ("c", "00:01:00", None)]
    for job_id, started, trained in rows:
        progress = None if trained is None else f'{{"trained_tokens": {trained}}}'
        old.execute(sql, (job_id, t0, t0, f"2025-01-01T{started}", progress))
    old.execute(sql, ("never", t0, t0, None, None))  # still pending: no wait yet
    old.commit()
    old.close()

    store = JobStore(path)
    try:
        totals = store.metric_totals()
        assert totals.trained_tokens == 120
        waits = totals.queue_waits
        assert waits.cumulative[:2] == [1, 2] and waits.count == 3
        assert waits.total == pytest.approx(63.5, abs=0.01)
        store.set_progress("b", {"trained_tokens": 25})  # the row's 20 is this attempt's so far
        assert store.metric_totals().trained_tokens == 125
    finally:
        store.close()
    again = JobStore(path)  # a second open (or another process) does not seed twice
    try:
        assert again.metric_totals().trained_tokens == 125
        assert again.metric_totals().queue_waits.count == 3
    finally:
        again.close()
