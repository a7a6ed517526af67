"""`host`: what one optimizer step costs the host, baseline against the job path.

A step of 8 rows of a small or mid-sized model on a GPU is bound by what the host dispatches
(Python, the dispatcher, kernel launches), not by arithmetic; removing padding then removes FLOPs
but not launches. This benchmark measures that side of a step, per phase of the Trainer's step
(forward + backward, optimizer, the rest):

- ops per step: the aten ops that autograd and autocast send to the backend (on a GPU: kernels),
  counted with a `TorchDispatchMode` over a few steps; `_to_copy` (dtype casts) separately;
- host ms per step, per phase, over the later steps (with a device sync at each phase boundary
  on CUDA, so each phase's time includes its kernels);
- on CUDA, device-busy ms per step: the summed kernel time from `torch.profiler` over a few steps.
  Host-bound when it is well below the step time.

On CPU use the `*-narrow` sizes (the GPU shapes' layers, LoRA modules and heads-per-KV-head at
width 64), where dispatch dominates too. Variants: `baseline`, `padding_free`, and
`padding_free_bf16` (the job path with bf16 autocast: on CPU the casts CUDA's default precision
makes). On CPU the job path attends with one SDPA call per sequence (its slices and concatenations
show up as extra ops); on CUDA one FlashAttention varlen call per layer replaces them.

    python -m bench host --size llama-1.1b-narrow --threads 1      # ~2 min on the 2-core box
    python -m bench host --size llama-1.1b --device cuda            # on a GPU
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine, markdown_table, run_child, write_results
from bench.finetune_runs import VARIANTS, measure
from bench.workload import SIZES, prepare

PHASES = ("fwd_bwd", "optimizer", "other")
COUNT_STEPS = range(3, 6)  # optimizer steps (0-based) counted op by op
PROFILE_STEPS = range(6, 9)  # CUDA: device time from torch.profiler
TIME_FROM = 9  # host time per phase from this step on
DEFAULT_VARIANTS = {"cpu": ["baseline", "padding_free", "padding_free_bf16"]}
DEFAULT_VARIANTS["cuda"] = ["baseline", "padding_free"]


class StepMeter:
    """Trainer callback: op counts, host time per phase and device time, by optimizer step."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.ops = {p: collections.Counter() for p in PHASES}
        self.host_s = dict.fromkeys(PHASES, 0.0)
        self.timed_steps = 0
        self.device_ms: list[float] = []
        self._phase: str | None = None
        self._timing = False
        self._t = 0.0
        self._mode = None
        self._prof = None

    # -- phase switching
    def _switch(self, phase: str | None, step: int) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        if self._timing and self._phase:
            self._sync()
            self.host_s[self._phase] += time.perf_counter() - self._t
        self._phase = phase
        self._timing = phase is not None and step >= TIME_FROM
        if phase is not None and step in COUNT_STEPS:
            self._mode = _counter(self.ops[phase])
            self._mode.__enter__()
        if self._timing:
            self._sync()
        self._t = time.perf_counter()

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    # -- torch.profiler over PROFILE_STEPS (CUDA only)
    def _profile(self, step: int) -> None:
        if not self.cuda:
            return
        import torch

        if step == PROFILE_STEPS.start and self._prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
        elif step == PROFILE_STEPS.stop and self._prof is not None:
            torch.cuda.synchronize()
            self._prof.__exit__(None, None, None)
            # kernels only: a CPU op's own device time is its kernels', counted once here
            kernels = [e for e in self._prof.key_averages() if str(e.device_type).endswith("CUDA")]
            total_us = sum(e.self_device_time_total for e in kernels)
            self.device_ms.append(total_us / 1000 / len(PROFILE_STEPS))
            self._prof = None

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class Meter(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                meter._profile(state.global_step)
                meter._switch("fwd_bwd", state.global_step)

            def on_pre_optimizer_step(self, args, state, control, **kw):
                meter._switch("optimizer", state.global_step)

            def on_optimizer_step(self, args, state, control, **kw):
                meter._switch("other", state.global_step)
                if state.global_step >= TIME_FROM:
                    meter.timed_steps += 1

            def on_train_end(self, args, state, control, **kw):
                meter._switch(None, -1)

        return Meter()

    def summary(self) -> dict[str, Any]:
        n = len(COUNT_STEPS)
        out: dict[str, Any] = {}
        for p in PHASES:
            ops = self.ops[p]
            out[p] = {
                "ops_per_step": sum(ops.values()) / n,
                "casts_per_step": ops.get("aten._to_copy", 0) / n,
                "host_ms_per_step": 1000 * self.host_s[p] / self.timed_steps
                if self.timed_steps
                else None,
                "top_ops": {k: v / n for k, v in ops.most_common(30)},
            }
        out["device_busy_ms_per_step"] = self.device_ms[0] if self.device_ms else None
        return out


def _counter(sink: collections.Counter):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            sink[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    return Count()


def run_one(prep: dict, size: str, device: str, variant: str) -> dict[str, Any]:
    """One variant in this process, with the meter added to every Trainer it builds."""
    import transformers

    meter = StepMeter(device)
    original = transformers.Trainer.__init__

    def init(self, *args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), meter.callback()]
        original(self, *args, **kwargs)

    transformers.Trainer.__init__ = init
    try:
        run = measure(prep, SIZES[size], device, variant)
    finally:
        transformers.Trainer.__init__ = original
    run["ms_per_step"] = 1000 * run["train_s"] / run["steps"] if run["steps"] else None
    run["tokens_per_step"] = run["trained_tokens"] / run["steps"] if run["steps"] else None
    run["host"] = meter.summary()
    return run


def run(
    size: str,
    device: str,
    variants: list[str] | None = None,
    out_dir: Path = RESULTS,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Each variant in its own process on the same model and data (`workdir`: reuse them)."""
    variants = variants or DEFAULT_VARIANTS.get(device, DEFAULT_VARIANTS["cuda"])
    work = SIZES[size]
    root = workdir or Path(tempfile.mkdtemp(prefix=f"bench-host-{size}-"))
    root.mkdir(parents=True, exist_ok=True)
    prep = prepare(root, work, device=device)
    prep_file = root / "prep.json"
    prep_file.write_text(json.dumps(prep))
    runs = []
    for variant in variants:
        print(f"[host:{size}] {variant} ...", flush=True)
        runs.append(run_child("bench.host", variant, size, prep_file, device))
    rows = []
    for r in runs:
        h = r["host"]
        rows.append(
            [
                VARIANTS[r["variant"]],
                f"{r['ms_per_step']:.1f}",
                f"{r['tokens_per_step']:,.0f}",
                f"{h['fwd_bwd']['ops_per_step']:,.0f}",
                f"{h['fwd_bwd']['casts_per_step']:,.0f}",
                f"{h['optimizer']['ops_per_step']:,.0f} / {h['other']['ops_per_step']:,.0f}",
                _ms(h["fwd_bwd"]["host_ms_per_step"]),
                _ms(h["optimizer"]["host_ms_per_step"]),
                _ms(h["other"]["host_ms_per_step"]),
                _ms(h["device_busy_ms_per_step"]),
            ]
        )
    table = markdown_table(
        [
            "variant",
            "ms/step",
            "trained tok/step",
            "ops/step fwd+bwd",
            "of them casts",
            "ops optimizer / rest",
            "ms fwd+bwd",
            "ms optimizer",
            "ms rest",
            "device busy ms/step",
        ],
        rows,
    )
    print(table)
    data = {
        "benchmark": "host",
        "size": size,
        "device": device,
        "workload": work.describe(),
        "data": prep["tokens"],
        "machine": machine(),
        "runs": runs,
    }
    write_results(f"host-{size}", data, table, out_dir)
    return data


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.host")
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--prep", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    prep = json.loads(args.prep.read_text())
    result = run_one(prep, args.size, args.device, args.variant)
    print("RESULT " + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
