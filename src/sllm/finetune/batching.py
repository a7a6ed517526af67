"""Turning the job's `batching` choice into a collator, a training set and TrainingArguments.

`plan_batching` runs in the worker once the model is wrapped by PEFT. For `padding_free` and
`token_budget` it switches the model to the `sllm_varlen` attention and probes a packed forward
(see `sllm.finetune.packing`); where the probe fails, the model keeps its own attention and the
job uses padded batches instead: grouped by length for `padding_free`, length-sorted token-budget
groups for `token_budget`. The plan records what was chosen and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sllm.finetune import packing


@dataclass
class BatchingPlan:
    mode: str  # padding_free | padded | token_budget (as configured)
    packed: bool  # sequences concatenated without padding
    kernel: str | None  # attention kernel for packed rows
    collator: Any
    train_dataset: Any
    overrides: dict[str, Any] = field(default_factory=dict)
    tokens_per_batch: int | None = None
    probe: dict[str, Any] | None = None
    fallback: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "packed": self.packed,
            "attention_kernel": self.kernel,
            "tokens_per_batch": self.tokens_per_batch,
            "fallback": self.fallback,
            "probe": self.probe,
            "num_batches_per_epoch": len(self.train_dataset)
            if self.mode == "token_budget"
            else None,
        }

    def summary(self) -> str:
        if self.mode == "padded":
            return "Batching: padded batches (as configured)."
        what = (
            f"token budget of {self.tokens_per_batch} tokens per batch"
            if self.mode == "token_budget"
            else "the configured rows per batch"
        )
        if self.packed:
            return f"Batching: padding-free ({self.kernel} attention), {what}."
        return (
            f"Batching: {what}, padded ({self.fallback}); packed sequences are not supported by "
            f"this model: {self.probe['reason'] if self.probe else 'unknown'}."
        )


def sampling_override(strategy: str) -> dict[str, Any]:
    """`train_sampling_strategy=strategy` in the transformers that has it (5.x), else the older
    `group_by_length` flag."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": strategy}
    if "group_by_length" in names:
        return {"group_by_length": strategy == "group_by_length"}
    return {}


def _items(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "no grouping available"


def choose_kernels(device_type: str, *, compiled: bool = False, half: bool = True) -> list[str]:
    """Attention kernels to try for packed rows, fastest first. A compiled model needs a kernel
    whose inputs are tensors (the loop's list of lengths would recompile it for every batch):
    the varlen kernel where it runs (CUDA, half precision), else one masked SDPA call."""
    varlen = packing.varlen_kernel_available(device_type)
    if compiled:
        return (
            [packing.KERNEL_VARLEN, packing.KERNEL_MASK]
            if varlen and half
            else [packing.KERNEL_MASK]
        )
    if varlen:
        return [packing.KERNEL_VARLEN, packing.KERNEL_LOOP]
    return [packing.KERNEL_LOOP]


def enable_packing(
    model, tokenizer, *, device, autocast_dtype, compiled: bool = False
) -> tuple[str | None, dict[str, Any]]:
    """Switch `model` to packed attention if a packed forward reproduces per-sequence logits.

    Returns (kernel or None, the last probe's result). On failure the model's own attention is
    restored.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(base.config, "_attn_implementation", None)
    try:
        base.set_attn_implementation(packing.register_attention())
    except Exception as exc:  # noqa: BLE001 - an architecture without pluggable attention
        return None, {"ok": False, "reason": f"{type(exc).__name__}: {exc}"[:300]}
    result: dict[str, Any] = {}
    import torch

    half = autocast_dtype is not None or next(model.parameters()).dtype != torch.float32
    for kernel in choose_kernels(device.type, compiled=compiled, half=half):
        collator = packing.FlatCollator(tokenizer.pad_token_id, kernel)
        result = packing.probe(model, collator, device=device, autocast_dtype=autocast_dtype)
        result = {**result.as_dict(), "kernel": kernel}
        if result["ok"]:
            return kernel, result
    if original:
        base.set_attn_implementation(original)
    return None, result


def plan_batching(
    mode: str,
    model,
    tokenizer,
    train_set,
    training_config: dict[str, Any],
    *,
    device,
    autocast_dtype=None,
    tokens_per_batch: int | None = None,
    seed: int = 42,
    compiled: bool = False,
    max_seq_length: int | None = None,
) -> BatchingPlan:
    if mode == "padded":
        return BatchingPlan(mode, False, None, packing.PaddedCollator(tokenizer), train_set)
    kernel, probe = enable_packing(
        model, tokenizer, device=device, autocast_dtype=autocast_dtype, compiled=compiled
    )
    fixed_max = max_seq_length if compiled else None
    if mode == "token_budget":
        return _token_budget_plan(
            kernel, probe, tokenizer, train_set, tokens_per_batch, seed, fixed_max
        )
    if kernel is not None:
        collator = packing.FlatCollator(tokenizer.pad_token_id, kernel, fixed_max)
        return BatchingPlan(mode, True, kernel, collator, train_set, probe=probe)
    overrides: dict[str, Any] = {}
    fallback = "as configured"
    if not ({"train_sampling_strategy", "group_by_length"} & set(training_config)):
        overrides = sampling_override("group_by_length")
        fallback = f"rows of similar length grouped ({_items(overrides)})"
    return BatchingPlan(
        mode,
        False,
        None,
        packing.PaddedCollator(tokenizer),
        train_set,
        overrides=overrides,
        probe=probe,
        fallback=fallback,
    )


def _token_budget_plan(
    kernel, probe, tokenizer, train_set, budget, seed, fixed_max=None
) -> BatchingPlan:
    lengths = [len(ids) for ids in train_set["input_ids"]]
    packs = packing.build_packs(lengths, budget, seed=seed, padded=kernel is None)
    dataset = packing.PackDataset(train_set, packs)
    overrides = {
        "per_device_train_batch_size": 1,  # one pack per micro-batch
        "auto_find_batch_size": False,
        "remove_unused_columns": False,
        **sampling_override("random"),  # packs are already grouped
    }
    if kernel is not None:
        collator = packing.FlatCollator(tokenizer.pad_token_id, kernel, fixed_max)
        return BatchingPlan(
            "token_budget", True, kernel, collator, dataset, overrides, budget, probe
        )
    return BatchingPlan(
        "token_budget",
        False,
        None,
        packing.PaddedCollator(tokenizer),
        dataset,
        overrides,
        budget,
        probe,
        fallback="length-sorted groups of at most the token budget, padded",
    )
