"""Scheduling rules observed on a real server with real workers (decisions are unit-tested in
tests/jobs/test_supervisor.py; here they are shown end to end)."""

from __future__ import annotations

import time

import pytest

from tests.api.test_jobs_e2e import LONG
from tests.conftest import job_config

pytestmark = pytest.mark.slow

SHORT = {"num_train_epochs": 1}


def submit(srv, storage, name, **kw):
    cfg = job_config(storage, output_dir=f"tiny/adapters/{name}", **kw)
    r = srv.client.post("/v1/fine-tuning/jobs", json=cfg)
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def status(srv, job_id):
    return srv.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]


def test_priority_then_fifo_on_a_real_server(storage, server_factory):
    srv = server_factory(storage, "--num-cpus", "1")
    blocker = submit(srv, storage, "blocker", training_config=LONG)
    srv.wait_status(blocker, {"running"})
    low1 = submit(srv, storage, "low1", training_config=SHORT)
    high = submit(srv, storage, "high", training_config=SHORT, priority=5)
    low2 = submit(srv, storage, "low2", training_config=SHORT)
    srv.client.post(f"/v1/fine_tuning/jobs/{blocker}/cancel")
    for job_id in (low1, high, low2):
        assert srv.wait_status(job_id, {"completed", "failed"})["status"]["status"] == "completed"
    started = sorted((status(srv, j)["started_time"], j) for j in (low1, high, low2))
    assert [j for _, j in started] == [high, low1, low2]


@pytest.mark.parametrize("starvation", ["3600", "0"], ids=["backfill", "starvation-bound"])
def test_backfill_and_its_starvation_bound(storage, server_factory, starvation):
    srv = server_factory(storage, "--num-cpus", "2", "--starvation-seconds", starvation)
    first = submit(srv, storage, "first", training_config=LONG)
    srv.wait_status(first, {"running"})
    big = submit(srv, storage, "big", training_config=SHORT, num_cpus=2, priority=9)
    small = submit(srv, storage, "small", training_config=LONG)
    time.sleep(1.0)  # many scheduling passes
    assert status(srv, big)["status"] == "pending"
    if starvation == "3600":
        assert status(srv, small)["status"] == "running"  # backfilled past the big job
    else:
        assert status(srv, small)["status"] == "pending"  # the starving big job reserves
        srv.client.post(f"/v1/fine_tuning/jobs/{first}/cancel")
        srv.wait_status(big, {"running", "completed"}, timeout=30)
        assert status(srv, small)["status"] == "pending"
    for job_id in (first, big, small):
        srv.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
