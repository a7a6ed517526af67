"""One fine-tuning run per call: the obvious baseline, or a job through the `peft_lora` backend.

The baseline is what a user writes first: `Trainer` + PEFT with `DataCollatorForLanguageModeling`
(padded batches of `per_device_train_batch_size`), the model loaded in float32 and no precision
flag. The job path is `PeftLoraBackend.validate` + `PeftLoraBackend.run`, the same calls the
worker process makes, with the same LoRA config, data, batch size, epochs and learning rate.

Each run returns trained (non-pad) tokens, the Trainer's train time, tokens/s overall and in the
steady state (after the first 10% of steps), peak memory and the losses.

    python -m bench.finetune_runs --variant baseline --size cpu --prep PREP.json  # one run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.workload import MODEL_NAME, SIZES, Workload, dataset_config

VARIANTS = {
    "baseline": "HF Trainer + peft, padded batches (fp32)",
    "padded": "job path, batching=padded",
    "padding_free": "job path, default (padding-free)",
    "padding_free_bf16": "job path, default + bf16 autocast (CUDA's default precision)",
    "token_budget": "job path, batching=token_budget",
    "padding_free_compile": "job path, default + compile (decoder layers)",
    "token_budget_compile": "job path, token_budget + compile (decoder layers)",
}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Steps:
    """(wall seconds, process CPU seconds, cumulative trained tokens) after each optimizer step.

    The steady state starts after the first 10% of steps (warm-up, allocator growth, compile).
    Tokens per CPU-second is the contention-proof measure on a shared machine with one thread:
    time slices lost to other processes do not count against the run.
    """

    def __init__(self) -> None:
        self.points: list[tuple[float, float, int]] = []

    def add(self, tokens: int) -> None:
        self.points.append((time.perf_counter(), _cpu_seconds(), int(tokens)))

    def steady(self) -> dict[str, float | None]:
        if len(self.points) < 3:
            return {"steady_tokens_per_s": None, "steady_tokens_per_cpu_s": None}
        k = max(1, len(self.points) // 10)
        (w0, c0, n0), (w1, c1, n1) = self.points[k - 1], self.points[-1]
        return {
            "steady_tokens_per_s": (n1 - n0) / (w1 - w0) if w1 > w0 else None,
            "steady_tokens_per_cpu_s": (n1 - n0) / (c1 - c0) if c1 > c0 else None,
        }


class _CountingCollator:
    """Counts the non-pad tokens of each batch on the host (no device sync)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.counts: list[int] = []

    def __call__(self, features):
        batch = self.inner(features)
        self.counts.append(int(batch["attention_mask"].sum()))
        return batch


def run_baseline(prep: dict, work: Workload, device: str) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    started = time.perf_counter()
    if device == "cpu":
        torch.set_num_threads(_cpus())
    tok = AutoTokenizer.from_pretrained(prep["model_dir"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(prep["model_dir"], dtype=torch.float32)
    model = get_peft_model(model.to(device), LoraConfig(task_type="CAUSAL_LM", **work.lora))
    ds = load_dataset("json", data_files=prep["data"], split="train")
    ds = ds.map(
        lambda b: tok(b["text"], truncation=True, max_length=work.max_seq_length),
        batched=True,
        remove_columns=["text"],
    )
    collator = _CountingCollator(DataCollatorForLanguageModeling(tokenizer=tok, mlm=False))
    steps = _Steps()

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.add(sum(collator.counts[: state.global_step]))

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-baseline-"),
        per_device_train_batch_size=work.batch_size,
        num_train_epochs=work.epochs,
        learning_rate=work.learning_rate,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        use_cpu=device == "cpu",
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[StepTimer()]
    )
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(collator.counts[: trainer.state.global_step])
    return {
        "trained_tokens": tokens,
        "train_s": out.metrics["train_runtime"],
        **steps.steady(),
        "end_to_end_s": time.perf_counter() - started,
        "steps": trainer.state.global_step,
        "final_loss": losses[-1] if losses else None,
        "train_loss": out.training_loss,
        "details": {"precision": "fp32", "batching": "padded", "threads": torch.get_num_threads()},
    }


class _Reporter:
    def __init__(self) -> None:
        self.steps = _Steps()
        self.events: list[tuple[str, str, Any]] = []

    def progress(self, **fields: Any) -> None:
        # every token through the model, as the baseline's count is (loss tokens are fewer)
        self.steps.add(fields.get("processed_tokens") or fields.get("trained_tokens") or 0)

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message, data))


def run_job(prep: dict, work: Workload, device: str, variant: str) -> dict[str, Any]:
    from sllm.finetune.base import JobSpec, ValidationContext, get_backend

    storage = Path(prep["storage"])
    batching = "token_budget" if variant.startswith("token_budget") else variant
    batching = batching.removesuffix("_bf16").removesuffix("_compile")
    training = {
        "per_device_train_batch_size": work.batch_size,
        "num_train_epochs": work.epochs,
        "learning_rate": work.learning_rate,
        "seed": 0,
    }
    if variant.endswith("_bf16"):
        training["bf16"] = True
    cfg: dict[str, Any] = {
        "output_dir": f"bench/adapters/{variant}",
        "dataset_config": dataset_config(prep),
        "lora_config": dict(work.lora),
        "training_config": training,
        "max_seq_length": work.max_seq_length,
        "batching": batching,
        "compile": variant.endswith("_compile"),
    }
    if batching == "token_budget" and work.tokens_per_batch:
        cfg["tokens_per_batch"] = work.tokens_per_batch
    import datasets  # noqa: F401 - imported before the clock starts, as in run_baseline
    import peft  # noqa: F401
    import transformers  # noqa: F401

    started = time.perf_counter()
    backend = get_backend("peft_lora")
    ctx = ValidationContext(storage, data_roots=[Path(prep["data"]).parent], model=MODEL_NAME)
    normalised = backend.validate(cfg, ctx)
    cuda = device == "cuda"
    spec = JobSpec(
        f"bench-{variant}", MODEL_NAME, storage, normalised, num_cpus=_cpus(), num_gpus=int(cuda)
    )
    reporter = _Reporter()
    result = backend.run(spec, reporter)
    meta = json.loads((result.adapter_path / "training_metadata.json").read_text())
    return {
        "trained_tokens": meta.get("processed_tokens", meta["trained_tokens"]),
        "train_s": meta["train_runtime_s"],
        **reporter.steps.steady(),
        "end_to_end_s": time.perf_counter() - started,
        "steps": meta["steps"],
        "final_loss": meta["final_loss"],
        "train_loss": meta["train_loss"],
        "details": meta.get("speed"),
    }


def _cpus() -> int:
    """The job's `num_cpus` (and the baseline's torch threads): $SLLM_BENCH_THREADS, else all."""
    from sllm.finetune.speed import available_cpus

    return int(os.environ.get("SLLM_BENCH_THREADS") or available_cpus())


def measure(prep: dict, work: Workload, device: str, variant: str) -> dict[str, Any]:
    """One run, with peak memory (GPU: allocated by torch; CPU: the process's peak RSS, which
    is only per-run when each run has its own process)."""
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = run_baseline(prep, work, device) if variant == "baseline" else None
    if run is None:
        run = run_job(prep, work, device, variant)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run.update(
        variant=variant,
        label=VARIANTS[variant],
        device=device,
        peak_mem_mb=round(peak, 1),
        tokens_per_s=run["trained_tokens"] / run["train_s"] if run["train_s"] else None,
    )
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune_runs")
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--prep", type=Path, required=True, help="JSON from workload.prepare")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    prep = json.loads(args.prep.read_text())
    result = measure(prep, SIZES[args.size], args.device, args.variant)
    print("RESULT " + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
