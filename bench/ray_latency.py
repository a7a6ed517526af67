"""Submit-to-running latency of a fine-tuning job: the local launcher vs a Ray cluster, with the
warm pool (`--warm-pool`, default 2: per node on Ray) and, on Ray, without it.

    python bench/ray_latency.py                  # 6 jobs per path, about 6 minutes on 2 cores
    python bench/ray_latency.py --jobs 8 --ray-worker-niceness 0

It starts three `sllm start` servers, each on its own fresh store holding the tiny test llama:
one local, two on the same Ray cluster (one with its per-node warm pools, one with
`--warm-pool 0`). It submits short jobs one at a time, in turn to each (so whatever else runs on
the machine slows all alike), and times, from just before the POST:

  running     the job's record says `running` (the supervisor's decision: the same code and the
              same few milliseconds on both paths)
  spawned     the worker process exists: local, right after the fork (or the hand-over to a
              warm process); Ray, once the job's actor was created on its node and started the
              worker there
  first_step  the worker reported its first training step (includes its ~4-5 s of imports
              when the process is fresh)
  done        the job completed

Then, in turn on each server, cold inference: deploy the tiny llama, one streamed completion
(to its first token), delete the deployment and wait until the instance is gone, so each
request finds no instance (on Ray the instance lands on the head node, which has room for it).

The Ray path runs on a real two-node cluster on loopback started by the cluster tests' helpers
(a head with 1 CPU and `node_b` with 2 CPUs); jobs take 1 CPU. The records are read straight
from SQLite every 5 ms. Results go to stdout and to bench/results/ray_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from cluster_helpers import LocalRayCluster  # noqa: E402

from tests.conftest import Server, job_config, write_dataset  # noqa: E402

MARKS = ("running", "spawned", "first_step", "done")
PATHS = ("local", "ray", "ray_no_pool")  # the local server and "ray" keep the default pool


def make_store(root: Path) -> Path:
    from sllm.store import save_model
    from sllm.testing import make_tiny_model_dir

    src = root.parent / "src" / "tiny-llama"
    if not src.exists():
        make_tiny_model_dir(src)
    storage = root / "store"
    save_model("tiny/llama", storage, local_model_path=src)
    write_dataset(storage / "data" / "train.jsonl")
    return storage


def time_one(server: Server, storage: Path, name: str) -> dict[str, float]:
    cfg = job_config(storage, output_dir=f"tiny/adapters/{name}")
    cfg["backend_config"]["training_config"]["num_train_epochs"] = 1
    db = sqlite3.connect(str(storage / "sllm.db"))
    t0 = time.perf_counter()
    job_id = server.client.post("/v1/fine-tuning/jobs", json=cfg).json()["job_id"]
    marks: dict[str, float] = {}
    while "done" not in marks:
        row = db.execute(
            "SELECT status, worker_pid, progress_json FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        now = time.perf_counter() - t0
        status, pid, progress = row
        if status in ("running", "completed"):
            marks.setdefault("running", now)
        if pid:
            marks.setdefault("spawned", now)
        if progress and json.loads(progress).get("step"):
            marks.setdefault("first_step", now)
        if status in ("completed", "failed", "cancelled"):
            if status != "completed":
                raise RuntimeError(f"{job_id} ended {status}")
            marks["done"] = now
        if now > 300:
            raise RuntimeError(f"{job_id} did not finish")
        time.sleep(0.005)
    db.close()
    return marks


def cold_completion(server: Server, model: str = "tiny/llama") -> dict[str, float]:
    """Deploy `model`, time one streamed completion to its first token, then scale to zero."""
    from tests.conftest import wait_dead

    assert server.client.post("/v1/deployments", json={"model": model}).status_code == 200
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    first = None
    t0 = time.perf_counter()
    with server.client.stream("POST", "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: ") and '"text"' in line:
                first = time.perf_counter() - t0
    (inst,) = server.client.get(f"/v1/deployments/{model}").json()["instances"]
    assert server.client.delete(f"/v1/deployments/{model}").status_code == 200
    wait_dead(inst["pid"], timeout=60)
    phases = inst.get("cold_start_phases") or {}
    return {"first_token_s": first or 0.0, "process_s": phases.get("process_s", 0.0)}


def run_all(servers: dict[str, tuple[Server, Path]], jobs: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {label: [] for label in servers}
    for label, (server, storage) in servers.items():
        time_one(server, storage, f"{label}-warmup")  # the first submit pays validation imports
    for i in range(jobs):
        for label, (server, storage) in servers.items():
            runs[label].append(time_one(server, storage, f"{label}-{i}"))
    return runs


def summary(runs: list[dict]) -> dict[str, dict[str, float]]:
    return {
        m: {
            "median_s": round(statistics.median(r[m] for r in runs), 4),
            "min_s": round(min(r[m] for r in runs), 4),
            "max_s": round(max(r[m] for r in runs), 4),
        }
        for m in MARKS
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--chats", type=int, default=3, help="cold completions per path")
    parser.add_argument(
        "--ray-worker-niceness",
        type=int,
        default=None,
        help="RAY_worker_niceness for the cluster (Ray's default: workers run at nice 15)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sllm-bench-ray-") as tmp:
        cluster = LocalRayCluster()
        if args.ray_worker_niceness is not None:
            cluster.env["RAY_worker_niceness"] = str(args.ray_worker_niceness)
        servers: list[Server] = []
        try:
            cluster.start_head(cpus=1)
            cluster.add_node("node_b", cpus=2)
            stores = {label: make_store(Path(tmp) / label) for label in PATHS}
            on_ray = ("--ray-address", cluster.address)
            options = {"local": ("--num-cpus", "1"), "ray": on_ray}
            options["ray_no_pool"] = (*on_ray, "--warm-pool", "0")
            paths = {}
            for label in PATHS:
                servers.append(Server(stores[label], *options[label], env=cluster.env).start())
                paths[label] = (servers[-1], stores[label])
            runs = run_all(paths, args.jobs)
            chats: dict[str, list[dict]] = {label: [] for label in PATHS}
            for _ in range(args.chats):
                for label in PATHS:
                    chats[label].append(cold_completion(paths[label][0]))
                    time.sleep(3)  # the pools refill in the background meanwhile
        finally:
            for server in servers:
                server.stop()
            cluster.stop()
    result: dict = {label: summary(runs[label]) for label in PATHS}
    result["ray_extra_median_s"] = {
        m: round(result["ray"][m]["median_s"] - result["local"][m]["median_s"], 4) for m in MARKS
    }
    result["cold_completion"] = {
        label: {
            key: round(statistics.median(c[key] for c in chats[label]), 4)
            for key in ("first_token_s", "process_s")
        }
        for label in PATHS
    }
    result["cold_completions_per_path"] = args.chats
    result["jobs_per_path"] = args.jobs
    result["ray_worker_niceness"] = args.ray_worker_niceness
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    import ray as ray_module

    result["machine"]["ray"] = ray_module.__version__
    head = "".join(f"{label:>13}" for label in PATHS)
    print(f"{'':12}{head}{'ray extra':>11}   (medians, seconds from the POST)")
    for m in MARKS:
        cells = "".join(f"{result[label][m]['median_s']:13.3f}" for label in PATHS)
        print(f"{m:12}{cells}{result['ray_extra_median_s'][m]:11.3f}")
    cells = "".join(f"{result['cold_completion'][label]['first_token_s']:13.3f}" for label in PATHS)
    print(f"{'cold 1st tok':12}{cells}   (a completion finding no instance)")
    suffix = "" if args.ray_worker_niceness is None else f"_nice{args.ray_worker_niceness}"
    out = HERE / "results" / f"ray_latency{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
