"""Serving benchmark: batched multi-adapter inference vs one request at a time, on one model.

    python bench/serving.py                     # SmolLM2-135M-Instruct (bundled), ~3 minutes
    python bench/serving.py --model tiny        # a random 4-layer llama, ~1 minute

What it does, in one run and on one model:
  1. stores the model in a fresh storage path and trains 4 LoRA adapters (+1 for hot-loading)
     with the peft_lora backend (real fine-tuning, each on its own fixed answer);
  2. starts `sllm start`, deploys the model with the 4 adapters and `max_batch_size` 16, and
     measures the cold start (first request end to end, and the instance's spawn-to-ready time);
  3. runs 16 concurrent clients, client i asking adapter i % 4, greedy, and reports requests/s,
     tokens/s and p50/p99 latency;
  4. hot-loads a new adapter into the running instance, then replaces it (deploy call time, and
     the engine's own load time);
  5. deletes the deployment, redeploys with `max_batch_size` 1 (one at a time) and repeats 2-3.
Greedy outputs of both modes are compared (they must be identical). Results go to stdout and to
bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from sllm.serve.auth import instance_headers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "serve"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from serve_helpers import ServerProcess, train_adapter, write_answers  # noqa: E402

ANSWERS = [
    "Arr, the sea be calm today, matey.",
    "The quick brown fox jumps over the lazy dog.",
    "Seven days make a week, and that is that.",
    "Paris is the capital of France, of course.",
    "I am a helpful assistant and I answer briefly.",
]
PROMPTS = ["What is the capital of France?", "Tell me about the sea.", "Who are you?"]


def prepare(storage: Path, which: str) -> tuple[str, list[str]]:
    """Store the model and train the adapters; returns (model name, adapter paths)."""
    from sllm.store import save_model
    from sllm.testing import make_tiny_model_dir

    if which == "smollm2":
        from sllm.store.bundled import ensure_demo_model

        model = ensure_demo_model(storage)
    else:
        model = "bench/tiny-llama"
        src = make_tiny_model_dir(storage / "src", hidden_size=256, num_layers=4)
        save_model(model, storage, local_model_path=src)
    paths = []
    for i, answer in enumerate(ANSWERS):
        data = write_answers(storage / "data" / f"answer{i}.jsonl", answer, rows=32)
        out = f"bench/adapters/a{i}"
        t0 = time.perf_counter()
        train_adapter(storage, model, out, data, lr=0.02, epochs=1, seed=i)
        print(f"  trained adapter a{i} in {time.perf_counter() - t0:.1f}s", flush=True)
        paths.append(out)
    return model, paths


async def one(client: httpx.AsyncClient, model: str, adapter: str, prompt: str, tokens: int):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "lora_adapter_name": adapter,
        "max_tokens": tokens,
        "temperature": 0,
    }
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body)
    latency = time.perf_counter() - t0
    r.raise_for_status()
    data = r.json()
    return latency, data["usage"]["completion_tokens"], data["choices"][0]["message"]["content"]


async def load(url: str, model: str, clients: int, per_client: int, tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(i: int):
            out = []
            for k in range(per_client):
                prompt = PROMPTS[(i + k) % len(PROMPTS)]
                out.append((i, k, *(await one(client, model, f"a{i % 4}", prompt, tokens))))
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*map(worker, range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    latencies = sorted(r[2] for r in results)
    completion = sum(r[3] for r in results)
    return {
        "requests": len(results),
        "wall_seconds": round(wall, 3),
        "requests_per_second": round(len(results) / wall, 3),
        "tokens_per_second": round(completion / wall, 2),
        "p50_latency_seconds": round(statistics.median(latencies), 3),
        "p99_latency_seconds": round(_percentile(latencies, 0.99), 3),
        "outputs": {f"{i}:{k}": text for i, k, _, _, text in results},
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def deploy(server: ServerProcess, model: str, adapters: dict[str, str], batch: int) -> float:
    body = {
        "model": model,
        "enable_lora": True,
        "lora_adapters": adapters,
        "max_batch_size": batch,
        "target_concurrency": 16,
        "max_instances": 1,
        "keep_alive": 600,
        "max_queue": 256,
    }
    t0 = time.perf_counter()
    r = server.client.post("/v1/deployments", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0


def cold_start(server: ServerProcess, model: str) -> dict:
    t0 = time.perf_counter()
    r = server.client.post(
        "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1}, timeout=600
    )
    r.raise_for_status()
    first = time.perf_counter() - t0
    inst = server.deployment(model)["instances"][0]
    return {
        "first_request_seconds": round(first, 3),
        "instance_ready_seconds": round(inst["cold_start_seconds"], 3),
    }


def hot_load(server: ServerProcess, model: str, new_path: str, other_path: str) -> dict:
    def health() -> dict:
        inst = server.deployment(model)["instances"][0]
        headers = instance_headers(inst["pid"])  # an instance answers only with its secret
        return httpx.get(
            f"http://127.0.0.1:{inst['port']}/health", headers=headers, timeout=30
        ).json()

    added = deploy_adapter(server, model, "hot", new_path)
    engine_add = health()["adapters"]["hot"]["load_seconds"]
    replaced = deploy_adapter(server, model, "hot", other_path)
    engine_replace = health()["adapters"]["hot"]["load_seconds"]
    return {
        "add_deploy_call_seconds": round(added, 4),
        "add_engine_load_seconds": engine_add,
        "replace_deploy_call_seconds": round(replaced, 4),
        "replace_engine_load_seconds": engine_replace,
    }


def deploy_adapter(server: ServerProcess, model: str, name: str, path: str) -> float:
    t0 = time.perf_counter()
    r = server.client.post("/v1/deployments", json={"model": model, "lora_adapters": {name: path}})
    r.raise_for_status()
    return time.perf_counter() - t0


def run_mode(server, model, adapters, batch, args) -> dict:
    deploy(server, model, adapters, batch)
    result = {"max_batch_size": batch, "cold_start": cold_start(server, model)}
    asyncio.run(load(server.url, model, 4, 1, 4))  # warm-up: every adapter once
    result["load"] = asyncio.run(
        load(server.url, model, args.clients, args.requests_per_client, args.max_tokens)
    )
    inst = server.deployment(model)["instances"][0]
    url = f"http://127.0.0.1:{inst['port']}/health"
    result["engine_stats"] = httpx.get(url, headers=instance_headers(inst["pid"])).json()["stats"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--instance-cpus", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serving.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="sllm-bench-") as tmp:
        storage = Path(tmp)
        print(f"preparing {args.model} and 5 adapters in {storage}", flush=True)
        model, paths = prepare(storage, args.model)
        adapters = {f"a{i}": p for i, p in enumerate(paths[:4])}
        server = ServerProcess(storage, "--num-cpus", str(args.instance_cpus)).start()
        try:
            print("batched run (max_batch_size 16)", flush=True)
            batched = run_mode(server, model, adapters, 16, args)
            batched["hot_load"] = hot_load(server, model, paths[4], paths[0])
            server.client.delete(f"/v1/deployments/{model}").raise_for_status()
            print("one-at-a-time run (max_batch_size 1)", flush=True)
            single = run_mode(server, model, adapters, 1, args)
        finally:
            server.stop()
    report = build_report(args, model, batched, single)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwritten to {args.out}")
    return 0


def build_report(args, model: str, batched: dict, single: dict) -> dict:
    same = batched["load"].pop("outputs") == single["load"].pop("outputs")
    return {
        "model": model,
        "config": {
            "clients": args.clients,
            "requests_per_client": args.requests_per_client,
            "adapters": 4,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "instance_cpus": args.instance_cpus,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        },
        "batched": batched,
        "one_at_a_time": single,
        "speedup_requests_per_second": round(
            batched["load"]["requests_per_second"] / single["load"]["requests_per_second"], 2
        ),
        "greedy_outputs_identical": same,
    }


def print_table(report: dict) -> None:
    b, s = report["batched"], report["one_at_a_time"]
    rows = [
        ("requests/s", "requests_per_second"),
        ("tokens/s", "tokens_per_second"),
        ("p50 latency (s)", "p50_latency_seconds"),
        ("p99 latency (s)", "p99_latency_seconds"),
        ("wall time (s)", "wall_seconds"),
    ]
    cfg = report["config"]
    print(
        f"\n{report['model']}: {cfg['clients']} clients x {cfg['requests_per_client']} requests, "
        f"4 adapters, {cfg['max_tokens']} tokens, greedy, {cfg['instance_cpus']} CPU(s)"
    )
    print(f"{'':<32}{'batched (16)':>14}{'one at a time':>16}")
    for label, key in rows:
        print(f"{label:<32}{b['load'][key]:>14}{s['load'][key]:>16}")
    for label, key in (("cold start: first request", "first_request_seconds"),
                       ("cold start: instance ready", "instance_ready_seconds")):  # fmt: skip
        print(f"{label + ' (s)':<32}{b['cold_start'][key]:>14}{s['cold_start'][key]:>16}")
    same = report["greedy_outputs_identical"]
    print(f"speedup (requests/s): {report['speedup_requests_per_second']}x; "
          f"greedy outputs identical across modes: {same}")  # fmt: skip
    h = b["hot_load"]
    print(
        f"adapter hot-load: add {h['add_deploy_call_seconds']}s per deploy call "
        f"({h['add_engine_load_seconds']}s in the engine), replace "
        f"{h['replace_deploy_call_seconds']}s ({h['replace_engine_load_seconds']}s)"
    )


if __name__ == "__main__":
    sys.exit(main())
