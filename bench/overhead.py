"""`overhead`: one job through the server against the same training run in-process.

In-process: a fresh Python process imports sllm, validates the config and calls
`PeftLoraBackend.run` (what a user's script would do): its wall time from launch to exit.
Through the server: `sllm start`, idle, one POST; the client's clock from submit to the job
being `completed`, plus the server's own timestamps (created, started, first trained step,
finished). Both train the same job with the same CPUs; the in-process run goes first and last
so a change in the machine's load shows as their difference.

    python -m bench overhead [--quick]
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS, bar_plot, machine, markdown_table, median, write_results
from bench.server import ROOT, BenchServer, follow_job, iso_seconds
from bench.workload import MODEL_NAME, SIZES, Workload, dataset_config, prepare

CPUS = 1


def job_request(prep: dict, work: Workload) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "ft_backend": "peft_lora",
        "num_cpus": CPUS,
        "num_gpus": 0,
        "timeout": 3600,
        "backend_config": {
            "output_dir": "bench/adapters/overhead",
            "dataset_config": dataset_config(prep),
            "lora_config": dict(work.lora),
            "training_config": {
                "per_device_train_batch_size": work.batch_size,
                "num_train_epochs": work.epochs,
                "learning_rate": work.learning_rate,
                "seed": 0,
            },
            "max_seq_length": work.max_seq_length,
        },
    }


def in_process(prep_file: Path, request_file: Path) -> dict[str, float]:
    """Run the job's training in a fresh process; wall seconds from launch to exit."""
    env = {**os.environ, "OMP_NUM_THREADS": str(CPUS), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "bench.overhead", "--child", str(prep_file), str(request_file)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "process_wall_s": wall}
    raise RuntimeError(f"in-process run failed:\n{out.stderr[-4000:]}")


def _child(prep_file: Path, request_file: Path) -> None:
    t_import = time.perf_counter()
    from bench.finetune_runs import _Reporter
    from sllm.finetune.base import JobSpec, ValidationContext, get_backend

    prep = json.loads(prep_file.read_text())
    req = json.loads(request_file.read_text())
    backend = get_backend("peft_lora")
    t_run = time.perf_counter()
    ctx = ValidationContext(Path(prep["storage"]), [Path(prep["data"]).parent], MODEL_NAME)
    normalised = backend.validate(req["backend_config"], ctx)
    spec = JobSpec("inproc", MODEL_NAME, Path(prep["storage"]), normalised, num_cpus=CPUS)
    backend.run(spec, _Reporter())
    done = time.perf_counter()
    print("RESULT " + json.dumps({"import_s": t_run - t_import, "run_s": done - t_run}))


def through_server(prep: dict, request: dict) -> dict[str, float | None]:
    with BenchServer(Path(prep["storage"]), "--num-cpus", str(CPUS)) as server:
        time.sleep(8)  # the server imports transformers/peft in the background: let it finish
        with httpx.Client(base_url=server.url, timeout=60) as client:
            job = follow_job(client, request, poll_after_step_s=0.2)
    body, t0 = job.body, job.t0
    created, started = iso_seconds(body["created_time"]), iso_seconds(body["started_time"])
    return {
        "submit_http_s": job.t_ack - t0,
        "submit_to_running_client_s": job.t_running - t0,
        "submit_to_running_server_s": started - created,
        "submit_to_first_step_client_s": job.t_step - t0 if job.t_step else None,
        "submit_to_first_step_server_s": job.first_step_server_s(),
        "submit_to_completed_client_s": job.t_done - t0,
        "created_to_finished_server_s": iso_seconds(body["finished_time"]) - created,
    }


def run(quick: bool = False, out_dir: Path = RESULTS) -> dict[str, Any]:
    # two epochs of the CPU workload: a run of a minute or two per side on the 2-core machine
    work = SIZES["tiny"] if quick else dataclasses.replace(SIZES["cpu"], epochs=2)
    workdir = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    prep = prepare(workdir, work, through_store=True)
    prep_file, request_file = workdir / "prep.json", workdir / "request.json"
    request = job_request(prep, work)
    prep_file.write_text(json.dumps(prep))
    request_file.write_text(json.dumps(request))
    print(f"[overhead] {work.size}: {prep['tokens']}", flush=True)
    before = in_process(prep_file, request_file)
    print(f"[overhead] in-process: {before}", flush=True)
    server = through_server(prep, request)
    print(f"[overhead] server: {server}", flush=True)
    after = in_process(prep_file, request_file)
    print(f"[overhead] in-process again: {after}", flush=True)
    inproc = median([before["process_wall_s"], after["process_wall_s"]])
    job = server["submit_to_completed_client_s"]
    summary = {
        "in_process_wall_s": inproc,
        "in_process_wall_s_each": [before["process_wall_s"], after["process_wall_s"]],
        "in_process_run_s": median([before["run_s"], after["run_s"]]),
        "job_wall_s": job,
        "overhead_s": job - inproc,
        "overhead_pct": 100 * (job - inproc) / inproc,
        **server,
    }
    data = {
        "benchmark": "overhead",
        "size": work.size,
        "machine": machine(),
        "cpus": CPUS,
        "summary": summary,
        "in_process": [before, after],
    }
    rows = [
        ["in-process (fresh process: import, validate, train, save)", inproc, "-"],
        ["through the server (submit -> completed, client clock)", job, summary["overhead_pct"]],
        ["submit -> running (client / server clock)", server["submit_to_running_client_s"],
         server["submit_to_running_server_s"]],
        ["submit -> first trained step (client / server clock)",
         server["submit_to_first_step_client_s"], server["submit_to_first_step_server_s"]],
    ]  # fmt: skip
    md = markdown_table(["what", "seconds", "overhead % / server s"], rows)
    write_results("overhead", data, md, out_dir)
    bar_plot(
        out_dir / "overhead.png",
        f"One fine-tuning job ({work.size} shape, {CPUS} CPU): in-process vs through the server",
        ["in-process", "through server"],
        {"wall seconds": [inproc, job]},
        "seconds (lower is better)",
    )
    print(md, flush=True)
    return data


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        run(quick="--quick" in sys.argv)
