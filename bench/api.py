"""`api`: the job API under load on loopback: 100 clients polling status, 1,000 submissions.

A real `sllm start --num-cpus 1` server; one long job holds its only CPU and its worker is paused
(SIGSTOP), so every submitted job stays pending and no training competes for the two cores.
The load comes from `bench.httpload`, a minimal asyncio HTTP/1.1 client (keep-alive, one
connection per client) in its own light process, so it costs less CPU than the server it measures
and no garbage-collection pause of this process shows up as latency.

1. status: 100 clients, each its own connection, GET /v1/fine_tuning/jobs/{id} in a closed loop
   (the next request as soon as the answer is in) for `--seconds`; then the same clients polling
   every 100 ms. requests/s, p50/p99 latency, errors.
2. submissions: 1,000 POSTs at once, each on its own connection; requests/s, p50/p99, errors;
   then every submitted job id must be listed by GET /v1/fine_tuning/jobs (paged).

    python -m bench api [--quick]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS, bar_plot, machine, markdown_table, write_results
from bench.server import ROOT, BenchServer
from bench.workload import MODEL_NAME, SIZES, prepare


def load(what: str, port: int, workdir: Path, **kw: Any) -> dict[str, Any]:
    """Run `bench.httpload` in a fresh process; its RESULT."""
    cmd = [sys.executable, "-m", "bench.httpload", what, "--port", str(port)]
    for key, value in kw.items():
        if key in ("ids", "body"):
            path = workdir / f"{what}-{key}.json"
            path.write_text(json.dumps(value))
            cmd += [f"--{key}-file", str(path)]
        else:
            cmd += [f"--{key}", str(value)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"load generator failed:\n{out.stderr[-3000:]}")


def listed_ids(client: httpx.Client) -> set[str]:
    seen: set[str] = set()
    after = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if after:
            params["after"] = after
        page = client.get("/v1/fine_tuning/jobs", params=params).json()
        seen.update(j["id"] for j in page["data"])
        if not page["has_more"]:
            return seen
        after = page["data"][-1]["id"]


def job_request(prep: dict, epochs: int = 1, output: str = "api") -> dict[str, Any]:
    """One job; each pending job needs its own `output` (a shared output_dir is a 409)."""
    return {
        "model": MODEL_NAME,
        "num_cpus": 1,
        "timeout": 3600,
        "backend_config": {
            "output_dir": f"bench/adapters/{output}",
            "dataset_config": {
                "dataset_source": "local",
                "data_files": prep["data"],
                "extension_type": "json",
                "tokenization_field": "text",
            },
            "training_config": {"num_train_epochs": epochs},
        },
    }


def block_the_cpu(server: BenchServer, client: httpx.Client, prep: dict) -> str:
    """Start one long job and pause its worker, so later jobs stay pending."""
    body = job_request(prep, 1000, "blocker")
    job_id = client.post("/v1/fine_tuning/jobs", json=body).json()["job_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = server.worker_pids(job_id)
        if pids:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            return job_id
        time.sleep(0.05)
    raise RuntimeError("the blocking job's worker never appeared")


def run(quick: bool = False, out_dir: Path = RESULTS, seconds: float = 15.0) -> dict[str, Any]:
    clients, submissions = (20, 100) if quick else (100, 1000)
    seconds = 5.0 if quick else seconds
    workdir = Path(tempfile.mkdtemp(prefix="bench-api-"))
    prep = prepare(workdir, SIZES["tiny"], through_store=True)
    with (
        BenchServer(workdir, "--num-cpus", "1") as server,
        httpx.Client(base_url=server.url, timeout=120) as client,
    ):
        blocker = block_the_cpu(server, client, prep)
        time.sleep(8)  # the server's background import of transformers/peft
        seeds = [job_request(prep, output=f"seed-{i}") for i in range(clients - 1)]
        seed_ids = [blocker] + [
            client.post("/v1/fine_tuning/jobs", json=body).json()["job_id"] for body in seeds
        ]
        port = server.port
        polls = {"ids": seed_ids, "clients": clients, "seconds": seconds}
        closed = load("status", port, workdir, **polls)["stats"]
        print(f"[api] status, closed loop: {closed}", flush=True)
        paced = load("status", port, workdir, **polls, every=0.1)["stats"]
        print(f"[api] status, every 100 ms: {paced}", flush=True)
        body = job_request(prep, output="submit")  # httpload gives each copy its own output_dir
        sub = load("submit", port, workdir, body=body, count=submissions)
        submit, ids = sub["stats"], sub["ids"]
        print(f"[api] submissions: {submit}", flush=True)
        seen = listed_ids(client)
        missing = sorted(set(ids + seed_ids) - seen)
        statuses = {client.get(f"/v1/fine_tuning/jobs/{i}").json()["status"]["status"] for i in ids}
    data = {
        "benchmark": "api",
        "machine": machine(),
        "clients": clients,
        "submissions": submissions,
        "status_closed_loop": closed,
        "status_every_100ms": paced,
        "submit": submit,
        "jobs_submitted": len(ids),
        "jobs_listed_afterwards": len(set(ids + seed_ids) & seen),
        "missing_after": missing[:20],
        "statuses_of_submitted": sorted(statuses),
    }
    rows = [
        [f"GET job status, {clients} clients, closed loop", closed["requests_per_s"],
         closed["p50_ms"], closed["p99_ms"], closed["errors"]],
        [f"GET job status, {clients} clients, every 100 ms", paced["requests_per_s"],
         paced["p50_ms"], paced["p99_ms"], paced["errors"]],
        [f"POST job, {submissions} at once", submit["requests_per_s"], submit["p50_ms"],
         submit["p99_ms"], submit["errors"]],
    ]  # fmt: skip
    md = markdown_table(["load", "requests/s", "p50 ms", "p99 ms", "errors"], rows)
    total = len(ids) + len(seed_ids)
    md += f"\n\nJobs listed afterwards: {data['jobs_listed_afterwards']} of {total}"
    md += f" (missing: {len(missing)})."
    write_results("api", data, md, out_dir)
    plot(data, out_dir)
    print(md, flush=True)
    return data


def plot(data: dict[str, Any], out_dir: Path = RESULTS) -> None:
    closed, paced, submit = data["status_closed_loop"], data["status_every_100ms"], data["submit"]
    bar_plot(
        out_dir / "api.png",
        f"Job API on loopback, 2-core machine: {data['clients']} status clients, "
        f"{data['submissions']} submissions",
        ["status, closed loop", "status, every 100 ms", f"submit x{data['submissions']}"],
        {
            "p50 ms": [closed["p50_ms"], paced["p50_ms"], submit["p50_ms"]],
            "p99 ms": [closed["p99_ms"], paced["p99_ms"], submit["p99_ms"]],
        },
        "milliseconds (log scale)",
        log=True,
    )
