"""`load`: a base model loaded from the store, three ways, on the same files.

1. `fast`: `load_model(fast=True)`, the store's fast path (large sequential reads into pinned host
   buffers, copies to the device overlapped with the reads; `sllm/store/fastload.py`);
2. `store`: `load_model(fast=False)`, i.e. `from_pretrained` with a device map;
3. `from_pretrained`: plain `from_pretrained` on the directory, then `.to(device)`.

All read the same safetensors files (in the page cache after the warm-up round) into the same
dtype and device, model and tokenizer; rounds alternate the three and the median is reported,
with GB/s of the files over that time, the fast path's own read+copy GB/s, and the host-to-device
copy bandwidth (pinned, `fastload.copy_bandwidth`) as the ceiling.

    python -m bench load [--size cpu] [--device cuda]
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, bar_plot, machine, markdown_table, median, write_results
from bench.workload import MODEL_NAME, SIZES, prepare

WAYS = ("fast", "store", "from_pretrained")
LABELS = {
    "fast": "sllm store fast path (`load_model`)",
    "store": "sllm store, from_pretrained path (`fast=False`)",
    "from_pretrained": "`from_pretrained` + `.to(device)` + tokenizer",
}


def _store_load(prep: dict, device: str, dtype, fast: bool, stats: dict) -> float:
    from sllm.store.loader import load_model

    t0 = time.perf_counter()
    model, tok = load_model(
        Path(prep["storage"]), MODEL_NAME, device=device, dtype=dtype, fast=fast, stats=stats
    )
    _sync(device)
    elapsed = time.perf_counter() - t0
    del model, tok
    return elapsed


def _hf_load(prep: dict, device: str, dtype) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(prep["model_dir"], dtype=dtype).to(device)
    tok = AutoTokenizer.from_pretrained(prep["model_dir"])
    _sync(device)
    elapsed = time.perf_counter() - t0
    del model, tok
    return elapsed


def _one_round(prep: dict, device: str, dtype, times: dict, fast_stats: list) -> None:
    stats: dict[str, Any] = {}
    times["fast"].append(_store_load(prep, device, dtype, True, stats))
    fast_stats.append(stats)
    _collect(device)
    times["store"].append(_store_load(prep, device, dtype, False, {}))
    _collect(device)
    times["from_pretrained"].append(_hf_load(prep, device, dtype))
    _collect(device)


def _collect(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run(size: str = "cpu", device: str = "cpu", out_dir: Path = RESULTS, rounds: int | None = None):
    import torch

    from sllm.store.fastload import copy_bandwidth

    work = SIZES[size]
    cuda = device == "cuda"
    rounds = rounds or (3 if cuda else 5)  # the 1.1B shape fits its share of the GPU run
    dtype = torch.bfloat16 if cuda else torch.float32
    prep = prepare(
        Path(tempfile.mkdtemp(prefix="bench-load-")),
        work,
        through_store=True,
        device=device if cuda else "cpu",  # random init of a 1.1B model is quick on the GPU
        dtype="bfloat16" if cuda else "float32",  # stored as it is loaded
    )
    _hf_load(prep, device, dtype)  # warm the page cache, CUDA and the import paths for all
    _collect(device)
    copy_gbps = copy_bandwidth(device)
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    fast_stats: list[dict[str, Any]] = []
    for _ in range(rounds):
        _one_round(prep, device, dtype, times, fast_stats)
    files = [f for f in Path(prep["model_dir"]).iterdir() if f.suffix == ".safetensors"]
    size_bytes = sum(f.stat().st_size for f in files)
    summary: dict[str, Any] = {w: median(times[w]) for w in WAYS}
    summary.update({f"{w}_gb_s": size_bytes / summary[w] / 1e9 for w in WAYS})
    summary["fast_read_copy_gb_s"] = median([s["gb_per_s"] for s in fast_stats])
    summary["copy_bandwidth_gb_s"] = copy_gbps
    summary["fast_vs_store"] = summary["fast"] / summary["store"]
    summary["fast_vs_from_pretrained"] = summary["fast"] / summary["from_pretrained"]
    data = {
        "benchmark": "load",
        "size": size,
        "device": device,
        "dtype": str(dtype),
        "safetensors_bytes": size_bytes,
        "machine": machine(),
        "times_s": times,
        "fast_path_stats": fast_stats,
        "summary": summary,
    }
    md = _table(summary, size, size_bytes, dtype, device, rounds, fast_stats)
    name = f"load-{size}"
    write_results(name, data, md, out_dir)
    bar_plot(
        out_dir / f"{name}.png",
        f"Base model load, {size} shape on {device}",
        list(WAYS),
        {"median seconds": [summary[w] for w in WAYS]},
        "seconds (lower is better)",
    )
    print(md, flush=True)
    return data


def _table(summary: dict, size: str, size_bytes: int, dtype, device: str, rounds: int,
           fast_stats: list[dict]) -> str:  # fmt: skip
    rows = [[LABELS[w], summary[w], summary[f"{w}_gb_s"]] for w in WAYS]
    md = markdown_table(["load (model + tokenizer)", "median s", "GB/s of the files"], rows)
    paths = sorted({s["path"] for s in fast_stats})
    fallback = next((s["fallback"] for s in fast_stats if s.get("fallback")), None)
    md += (
        f"\n\nFast path: files read and copied at {summary['fast_read_copy_gb_s']:.2f} GB/s of "
        f"{summary['copy_bandwidth_gb_s']:.2f} GB/s host-to-device copy bandwidth "
        f"({'pinned' if device == 'cuda' else 'memcpy on CPU'}); path taken: {', '.join(paths)}"
        + (f" (fallback: {fallback})" if fallback else "")
        + f".\n{size} shape, {size_bytes / 1e6:.0f} MB of safetensors, {dtype} on {device}, "
        f"{rounds} rounds."
    )
    return md
