"""`load`: a base model loaded from the store against `from_pretrained` on the same files.

Both read the same safetensors files (already in the page cache after the first round) into the
same dtype and device, model and tokenizer; rounds alternate the two and the median is reported.

    python -m bench load [--size cpu]
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, bar_plot, machine, markdown_table, median, write_results
from bench.workload import MODEL_NAME, SIZES, prepare


def _store_load(prep: dict, device: str, dtype) -> float:
    from sllm.store.loader import load_model

    t0 = time.perf_counter()
    model, tok = load_model(Path(prep["storage"]), MODEL_NAME, device=device, dtype=dtype)
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


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run(size: str = "cpu", device: str = "cpu", out_dir: Path = RESULTS, rounds: int = 5):
    import torch

    work = SIZES[size]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cuda = device == "cuda"
    prep = prepare(
        Path(tempfile.mkdtemp(prefix="bench-load-")),
        work,
        through_store=True,
        device=device if cuda else "cpu",  # random init of a 1.1B model is quick on the GPU
        dtype="bfloat16" if cuda else "float32",  # stored as it is loaded
    )
    _hf_load(prep, device, dtype)  # warm the page cache and the import paths for both
    times: dict[str, list[float]] = {"store": [], "from_pretrained": []}
    for _ in range(rounds):
        times["store"].append(_store_load(prep, device, dtype))
        gc.collect()
        times["from_pretrained"].append(_hf_load(prep, device, dtype))
        gc.collect()
    files = Path(prep["model_dir"])
    size_mb = sum(f.stat().st_size for f in files.iterdir() if f.is_file()) / 2**20
    summary: dict[str, Any] = {k: median(v) for k, v in times.items()}
    summary["store_vs_from_pretrained"] = summary["store"] / summary["from_pretrained"]
    data = {
        "benchmark": "load",
        "size": size,
        "device": device,
        "dtype": str(dtype),
        "model_files_mb": round(size_mb, 1),
        "machine": machine(),
        "times_s": times,
        "summary": summary,
    }
    rows = [
        ["sllm store (`load_model`)", summary["store"], size_mb / summary["store"]],
        ["`from_pretrained` + tokenizer", summary["from_pretrained"],
         size_mb / summary["from_pretrained"]],
    ]  # fmt: skip
    md = markdown_table(["load (model + tokenizer)", "median s", "MB/s"], rows)
    md += f"\n\n{size} shape, {size_mb:.0f} MB of files, {dtype} on {device}, {rounds} rounds."
    name = f"load-{size}"
    write_results(name, data, md, out_dir)
    bar_plot(
        out_dir / f"{name}.png",
        f"Base model load, {size} shape on {device}",
        ["store", "from_pretrained"],
        {"median seconds": [summary["store"], summary["from_pretrained"]]},
        "seconds (lower is better)",
    )
    print(md, flush=True)
    return data
