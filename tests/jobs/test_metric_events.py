"""Validation metric events of a run evaluated at every step are thinned like loss events."""

from __future__ import annotations

from job_helpers import add

from sllm.jobs.db import JobStore
from sllm.jobs.worker import DbReporter


def test_metric_events_are_thinned_apart_from_loss_events(tmp_path):
    store = JobStore(tmp_path / "store" / "sllm.db")
    try:
        job = add(store)
        reporter = DbReporter(store, job)
        total = 5_000
        for step in range(1, total + 1):
            reporter.progress(step=step, total_steps=total, valid_loss=1.0 / step)
            reporter.event("loss", f"step {step}", {"step": step, "loss": 1.0})
            reporter.event("metric", f"step {step}", {"step": step, "valid_loss": 1.0 / step})
        reporter.flush()
        events, _ = store.events(job, limit=10_000)
        metric = [e["data"]["step"] for e in events if e["type"] == "metric"]
        loss = [e["data"]["step"] for e in events if e["type"] == "loss"]
        assert metric == loss  # each kind keeps its own stride, the same one
        assert metric[:200] == list(range(1, 201)) and metric[-1] == total
        assert len(metric) < 600  # about 200 + 100 * ln(5000 / 200)
        notes = [e["message"] for e in events if "thinned" in e["message"]]
        assert len(notes) == 2 and any("metric events" in n for n in notes)
        assert store.get(job).progress["valid_loss"] == 1.0 / total
    finally:
        store.close()
