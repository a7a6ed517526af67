"""A real `sllm start` server in a subprocess on a loopback port, for the server benchmarks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from sllm.testing import LocalServer

ROOT = Path(__file__).resolve().parents[1]


class BenchServer(LocalServer):
    """The shared `LocalServer`, run from the repo root, plus a look at its worker processes."""

    def __init__(self, storage: Path, *args: str) -> None:
        super().__init__(storage, *args, cwd=ROOT)

    def worker_pids(self, job_id: str) -> list[int]:
        """Pids of this server's worker processes for `job_id`, fresh or from its warm pool (read
        from /proc)."""
        from sllm.jobs.launcher import is_worker_of

        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry.name)
            if self.proc and int(stat[1]) == self.proc.pid and is_worker_of(pid, job_id):
                pids.append(pid)
        return pids


def iso_seconds(value: str | None) -> float | None:
    """An ISO time of the server's records as epoch seconds (None stays None)."""
    return datetime.fromisoformat(value).timestamp() if value else None


@dataclass
class JobRun:
    """One job followed from its POST: client-clock marks (`time.perf_counter`), its final
    status body and its events."""

    t0: float  # just before the POST
    t_ack: float  # the POST answered
    t_running: float  # first seen not pending
    t_step: float | None  # first seen with a trained step
    t_done: float  # first seen ended
    body: dict[str, Any]
    events: list[dict[str, Any]]

    def first_step_server_s(self) -> float | None:
        """Creation to the first loss event, by the server's own clock."""
        losses = (e["created_time"] for e in self.events if e["type"] == "loss")
        first = iso_seconds(next(losses, None))
        created = iso_seconds(self.body["created_time"])
        return first - created if first is not None and created is not None else None


def follow_job(
    client: httpx.Client, request: dict[str, Any], poll_after_step_s: float = 0.1
) -> JobRun:
    """Submit `request` and poll the job until it ends (every 10 ms until its first trained
    step, then every `poll_after_step_s`); raises unless it completed."""
    t0 = time.perf_counter()
    r = client.post("/v1/fine_tuning/jobs", json=request)
    r.raise_for_status()
    t_ack = time.perf_counter()
    url = f"/v1/fine_tuning/jobs/{r.json()['job_id']}"
    t_running = t_step = None
    while True:
        body = client.get(url).json()["status"]
        now = time.perf_counter()
        if t_running is None and body["status"] != "pending":
            t_running = now
        if t_step is None and (body.get("progress") or {}).get("step"):
            t_step = now
        if body["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.01 if t_step is None else poll_after_step_s)
    t_done = time.perf_counter()
    if body["status"] != "completed":
        raise RuntimeError(f"job ended {body['status']}: {body.get('error')}")
    events = client.get(f"{url}/events", params={"limit": 10000}).json()["data"]
    assert t_running is not None
    return JobRun(t0, t_ack, t_running, t_step, t_done, body, events)
