"""`finetune`: the obvious Trainer baseline against the `peft_lora` job path, side by side.

Same model, data, LoRA config (r=16, all linear layers), batch size, epochs and learning rate for
every variant; variants run in interleaved order (`--repeat` rounds) so a busy machine slows all
of them alike, each in its own process on CPU (clean peak memory), in one process on GPU.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    bar_plot,
    machine,
    markdown_table,
    median,
    run_child,
    write_results,
)
from bench.finetune_runs import VARIANTS, measure
from bench.workload import SIZES, prepare

CPU_VARIANTS = ["baseline", "padding_free", "token_budget"]
GPU_VARIANTS = ["baseline", "padding_free", "token_budget", "padding_free_compile"]


def base_params(work) -> int:
    """Parameters of the base model (embeddings included, as the 4N FLOPs/token count uses)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    config = (LlamaConfig if work.arch == "llama" else OPTConfig)(**work.shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _run_child(variant: str, size: str, prep_file: Path, device: str) -> dict[str, Any]:
    return run_child("bench.finetune_runs", variant, size, prep_file, device)


def summarise(runs: list[dict], variants: list[str], n_params: int) -> list[dict[str, Any]]:
    rows = []
    base = median([r["tokens_per_s"] for r in runs if r["variant"] == "baseline"])
    base_steady = median([r["steady_tokens_per_s"] for r in runs if r["variant"] == "baseline"])
    base_cpu = median([r["steady_tokens_per_cpu_s"] for r in runs if r["variant"] == "baseline"])
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        if not mine:
            continue
        tps = median([r["tokens_per_s"] for r in mine])
        steady = median([r["steady_tokens_per_s"] for r in mine])
        rows.append(
            {
                "variant": v,
                "label": VARIANTS[v],
                "runs": len(mine),
                "trained_tokens": mine[0]["trained_tokens"],
                "steps": mine[0]["steps"],
                "tokens_per_s": tps,
                "tokens_per_s_all": [round(r["tokens_per_s"], 1) for r in mine],
                "steady_tokens_per_s": steady,
                "speedup": tps / base if base and tps else None,
                "steady_speedup": steady / base_steady if base_steady and steady else None,
                "steady_tokens_per_cpu_s": (
                    cpu := median([r["steady_tokens_per_cpu_s"] for r in mine])
                ),
                "cpu_speedup": cpu / base_cpu if base_cpu and cpu else None,
                "tflops_4n": 4 * n_params * steady / 1e12 if steady else None,
                "train_s": median([r["train_s"] for r in mine]),
                "end_to_end_s": median([r["end_to_end_s"] for r in mine]),
                "peak_mem_mb": max(r["peak_mem_mb"] for r in mine),
                "final_loss": mine[0]["final_loss"],
                "train_loss": mine[0]["train_loss"],
            }
        )
    return rows


def table(rows: list[dict], gpu: bool) -> str:
    headers = ["variant", "trained tok/s", "x baseline", "steady tok/s", "x baseline (steady)"]
    headers += ["TFLOP/s (4N)"] if gpu else ["steady tok/CPU-s", "x baseline (CPU-s)"]
    headers += ["train s", "end-to-end s", "steps", "peak MiB", "mean train loss"]
    body = []
    for r in rows:
        line = [r["label"], r["tokens_per_s"], r["speedup"], r["steady_tokens_per_s"]]
        line += [r["steady_speedup"]]
        line += [r["tflops_4n"]] if gpu else [r["steady_tokens_per_cpu_s"], r["cpu_speedup"]]
        line += [r["train_s"], r["end_to_end_s"], r["steps"], r["peak_mem_mb"]]
        line += [r["train_loss"]]
        body.append(line)
    return markdown_table(headers, body)


def run(
    size: str = "cpu",
    device: str = "cpu",
    variants: list[str] | None = None,
    repeat: int = 1,
    in_process: bool | None = None,
    out_dir: Path = RESULTS,
    deadline_s: float | None = None,
    workdir: Path | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Run the variants; results are rewritten after every run, so a run killed half-way still
    leaves what it measured. `workdir` reuses a prepared model and data (made if missing)."""
    work = SIZES[size]
    gpu = device == "cuda"
    variants = variants or (GPU_VARIANTS if gpu else CPU_VARIANTS)
    in_process = gpu if in_process is None else in_process
    started = time.monotonic()
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"bench-ft-{size}-"))
    big = gpu and size in ("opt-125m", "llama-1.1b")
    prep = prepare(
        workdir, work, device=device if big else "cpu", dtype="bfloat16" if big else "float32"
    )
    prep_file = workdir / "prep.json"
    prep_file.write_text(json.dumps(prep))
    print(f"[finetune:{size}] data: {prep['tokens']}", flush=True)
    n_params = base_params(work)
    name = name or f"finetune-{size}"
    runs: list[dict] = []
    skipped: list[str] = []
    data: dict[str, Any] = {}
    for round_ in range(repeat):
        for v in variants:
            if deadline_s is not None and time.monotonic() - started > deadline_s:
                skipped.append(f"{v} (round {round_ + 1}): past the {deadline_s:.0f} s deadline")
                continue
            load = os.getloadavg()[0]
            try:
                res = (
                    measure(prep, work, device, v)
                    if in_process
                    else _run_child(v, size, prep_file, device)
                )
            except Exception as exc:  # noqa: BLE001 - one broken variant must not lose the rest
                print(f"[finetune:{size}] {v} FAILED: {exc}", flush=True)
                skipped.append(f"{v} (round {round_ + 1}): {type(exc).__name__}: {str(exc)[:500]}")
                continue
            res.update(round=round_ + 1, loadavg_before=round(load, 2))
            runs.append(res)
            print(
                f"[finetune:{size}] {v}: {res['tokens_per_s']:,.0f} tok/s "
                f"(steady {res['steady_tokens_per_s'] or 0:,.0f}), {res['train_s']:.1f} s, "
                f"loss {res['train_loss']}",
                flush=True,
            )
            data = _save(name, size, device, work, prep, n_params, variants, runs, skipped,
                         started, out_dir)  # fmt: skip
    data = _save(name, size, device, work, prep, n_params, variants, runs, skipped, started,
                 out_dir)  # fmt: skip
    rows = data["summary"]
    render(data, out_dir, name)
    print(table(rows, gpu), flush=True)
    return data


def _save(name, size, device, work, prep, n_params, variants, runs, skipped, started, out_dir):
    gpu = device == "cuda"
    threads = None if gpu else int(os.environ.get("SLLM_BENCH_THREADS") or os.cpu_count())
    data = {
        "benchmark": "finetune",
        "size": size,
        "device": device,
        "machine": machine(),
        "workload": work.describe(),
        "data": prep["tokens"],
        "base_params": n_params,
        "cpu_threads": threads,
        "summary": summarise(runs, variants, n_params),
        "runs": runs,
        "skipped": skipped,
        "wall_s": round(time.monotonic() - started, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return data


def render(data: dict[str, Any], out_dir: Path, name: str) -> None:
    """The Markdown table and the PNG plot of a finetune result (also from a saved JSON)."""
    rows = data["summary"]
    gpu = data["device"] == "cuda"
    write_results(name, data, table(rows, gpu), out_dir)
    bar_plot(
        out_dir / f"{name}.png",
        f"LoRA r=16, {data['size']} shape, {data.get('machine', {}).get('gpu') or 'CPU'}",
        [r["variant"] for r in rows],
        {
            "whole run": [r["tokens_per_s"] for r in rows],
            "steady state": [r["steady_tokens_per_s"] for r in rows],
        },
        "trained (non-pad) tokens/s (higher is better)",
    )
