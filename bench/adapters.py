"""Many adapters on one base model: 100 fine-tuned models served on demand vs one adapter.

    python -m bench adapters            # 100 real jobs on a tiny llama, then three loads
    python -m bench adapters --quick    # 20 jobs, fewer requests (a smoke run)
    python -m bench adapters --workdir DIR   # keep the store: a second run skips the training

1. stores a random 4-layer llama and runs one real fine-tuning job per adapter through the API
   (each a few optimizer steps on its own fixed answer), so every adapter is a completed job's
   fine-tuned model `ft:<base>:sllm:<job id>`;
2. deploys the base once (`max_batch_size` 16, target 16 in flight, one instance) and runs the
   same closed-loop load three ways (interleaved, 2 rounds, medians), greedy, 16 clients:
   - one adapter: every request names the same fine-tuned model;
   - N adapters, `max_loras` 8 (the default): round k's 16 requests name models 16k..16k+15
     (mod N), so an adapter comes back only after N requests: every request misses the LRU
     and its adapter is loaded on demand (the worst case);
   - N adapters, `max_loras` N: the same spread after one warm-up pass, all cached;
3. prints tokens/s, requests/s, p50/p99 latency and the on-demand loads (LRU misses) side by
   side, and writes bench/results/adapters.{json,md}.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS, machine, markdown_table, percentile, write_results

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "serve"))

PROMPTS = ["What is the capital of France?", "Tell me about the sea.", "Who are you?"]
MODEL = "bench/tiny-llama"


def prepare(storage: Path, server, count: int) -> list[str]:
    """`count` completed jobs' fine-tuned model names (real jobs, submitted to `server`)."""
    from serve_helpers import seed_request, write_answers

    ids = []
    for i in range(count):
        data = write_answers(storage / "data" / f"a{i}.jsonl", f"Answer number {i}, matey.", 8)
        cfg = seed_request(MODEL, str(data), num_train_epochs=2, learning_rate=0.05, seed=i)
        cfg["backend_config"]["output_dir"] = f"bench/ft/a{i}"
        cfg["backend_config"]["max_seq_length"] = 32  # 2 optimizer steps: startup dominates
        training = cfg["backend_config"]["training_config"]
        training.pop("auto_find_batch_size")
        training["per_device_train_batch_size"] = 4
        r = server.client.post("/v1/fine-tuning/jobs", json=cfg)
        r.raise_for_status()
        ids.append(r.json()["job_id"])
    t0 = time.perf_counter()
    for n, job_id in enumerate(ids, 1):
        job = server.wait_status(job_id, {"completed", "failed", "cancelled"}, timeout=3600)
        if job["status"]["status"] != "completed":
            raise RuntimeError(f"{job_id} did not complete: {job['status']}")
        if n % 10 == 0 or n == count:
            print(f"  {n}/{count} jobs completed ({time.perf_counter() - t0:.0f}s)", flush=True)
    return [f"ft:{MODEL}:sllm:{job_id}" for job_id in ids]


async def _load(url: str, models: list[str], clients: int, per_client: int, tokens: int):
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(i: int) -> list[tuple[float, int]]:
            out = []
            for k in range(per_client):
                body = {  # round k: clients ask models k*clients .. k*clients+clients-1
                    "model": models[(k * clients + i) % len(models)],
                    "messages": [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}],
                    "max_tokens": tokens,
                    "temperature": 0,
                }
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                out.append((time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]))
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*map(worker, range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    latencies = [r[0] for r in results]
    return {
        "requests": len(results),
        "wall_seconds": round(wall, 3),
        "requests_per_second": round(len(results) / wall, 3),
        "tokens_per_second": round(sum(r[1] for r in results) / wall, 2),
        "tokens_per_request": round(sum(r[1] for r in results) / len(results), 2),
        "p50_latency_seconds": round(statistics.median(latencies), 3),
        "p99_latency_seconds": round(percentile(latencies, 99), 3),
    }


def _deploy(server, max_loras: int, cpus: int) -> None:
    body = {
        "model": MODEL,
        "num_cpus": cpus,
        "max_batch_size": 16,
        "target_concurrency": 16,
        "max_instances": 1,
        "keep_alive": 600,
        "max_queue": 1024,
        "max_loras": max_loras,
    }
    server.client.post("/v1/deployments", json=body, timeout=600).raise_for_status()


def _loads(server) -> int:
    return server.deployment(MODEL)["instances"][0]["lora_loads"]


def phase(server, models: list[str], max_loras: int, args: dict, warm: bool) -> dict:
    _deploy(server, max_loras, args["cpus"])
    if warm:  # every model once, so the measured run finds them cached
        asyncio.run(_load(server.url, models, 1, len(models), 1))
    before = _loads(server)
    result = asyncio.run(
        _load(server.url, models, args["clients"], args["per_client"], args["tokens"])
    )
    result["adapter_loads"] = _loads(server) - before
    result["max_loras"] = max_loras
    result["adapters"] = len(models)
    return result


def _store(workdir: Path, count: int) -> tuple[Path, list[str] | None]:
    """The storage path, and the models of an earlier run there (None: train them)."""
    from sllm.store import has_model, save_model
    from sllm.testing import make_tiny_model_dir

    storage = workdir / "store"
    if not has_model(storage, MODEL):
        src = make_tiny_model_dir(workdir / "src", hidden_size=256, num_layers=4)
        save_model(MODEL, storage, local_model_path=src)
    saved = workdir / "models.json"
    models = json.loads(saved.read_text()) if saved.is_file() else []
    return storage, models[:count] if len(models) >= count else None


def run(
    quick: bool = False,
    out_dir: Path = RESULTS,
    adapters: int | None = None,
    workdir: Path | None = None,
    rounds: int = 2,
) -> dict:
    """`workdir` keeps the store and its completed jobs, so a second run skips the training."""
    from serve_helpers import ServerProcess

    count = adapters or (20 if quick else 100)
    args = {"clients": 16, "per_client": 10 if quick else 25, "tokens": 16, "cpus": 1}
    with tempfile.TemporaryDirectory(prefix="sllm-bench-adapters-") as tmp:
        work = Path(workdir or tmp)
        storage, models = _store(work, count)
        server = ServerProcess(storage, "--num-cpus", "2").start()
        try:
            prep_s = None
            if models is None:
                print(f"training {count} adapters as real jobs ...", flush=True)
                t0 = time.perf_counter()
                models = prepare(storage, server, count)
                prep_s = round(time.perf_counter() - t0, 1)
                (work / "models.json").write_text(json.dumps(models))
            _deploy(server, 8, args["cpus"])
            t0 = time.perf_counter()
            r = server.client.post(
                "/v1/completions", json={"model": models[0], "prompt": "Hi", "max_tokens": 1}
            )
            r.raise_for_status()  # the first request cold-starts the base with the adapter
            cold_s = time.perf_counter() - t0
            runs: dict[str, list[dict]] = {"one_adapter": [], "spread_lru": [], "spread_cached": []}
            for n in range(rounds):  # interleaved, so a change in the machine's load hits all
                print(f"round {n + 1}/{rounds}: one adapter; {count} adapters with max_loras "
                      f"8, then {count}", flush=True)  # fmt: skip
                runs["one_adapter"].append(phase(server, models[:1], 8, args, warm=True))
                runs["spread_lru"].append(phase(server, models, 8, args, warm=False))
                runs["spread_cached"].append(phase(server, models, count, args, warm=True))
        finally:
            server.stop()
    data = {
        "model": MODEL,
        "config": {**args, "adapters": count, "temperature": 0, "max_batch_size": 16},
        "rounds": rounds,
        "prepare_seconds": prep_s,
        "cold_start_first_request_seconds": round(cold_s, 3),
        **{key: _median_run(r) for key, r in runs.items()},
        "runs": runs,
        "machine": machine(),
    }
    table = _table(data)
    write_results("adapters", data, table, out_dir)
    print(table)
    print(f"first request (cold start of the base with its adapter): {cold_s:.2f}s")
    return data


def _median_run(runs: list[dict]) -> dict:
    """Each number's median over the rounds."""
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def _table(data: dict[str, Any]) -> str:
    n = data["config"]["adapters"]
    cols = [
        ("one adapter", data["one_adapter"]),
        (f"{n} adapters, max_loras 8", data["spread_lru"]),
        (f"{n} adapters, max_loras {n}", data["spread_cached"]),
    ]
    keys = [
        ("tokens/s", "tokens_per_second"),
        ("requests/s", "requests_per_second"),
        ("tokens/request", "tokens_per_request"),
        ("p50 latency s", "p50_latency_seconds"),
        ("p99 latency s", "p99_latency_seconds"),
        ("on-demand loads", "adapter_loads"),
        ("requests", "requests"),
    ]
    rows = [[label] + [c[key] for _, c in cols] for label, key in keys]
    return markdown_table([""] + [name for name, _ in cols], rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--adapters", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    ns = parser.parse_args()
    run(quick=ns.quick, adapters=ns.adapters, workdir=ns.workdir)
