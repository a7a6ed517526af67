"""How the `peft_lora` job uses its hardware: threads, precision, and a step loop without syncs.

- CPU: one intra-op thread per CPU the job was given (never more than this process may use).
- CUDA: bf16 weights and autocast where the GPU supports bf16 and the user did not choose a
  precision; no host-device synchronisation inside the step loop: trained tokens are counted on
  the host by the collator (not with `.item()` on a device tensor), host-to-device copies are
  pinned and non-blocking, the NaN/Inf loss filter (a sync per micro-step) is off, and the loss
  is read back every 10 steps rather than every step (all unless the user set those options).
- Under autocast: LoRA layers take their input in the autocast dtype instead of PEFT's default
  round trip through float32 (a cast to the LoRA weights' dtype that autocast undoes at once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from sllm.finetune.packing import pop_counts

CUDA_LOGGING_STEPS = 10


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_threads(num_cpus: int) -> int:
    """Size torch's intra-op pool to the job's CPUs; returns the thread count used."""
    import torch

    threads = max(1, min(int(num_cpus or 1), available_cpus()))
    torch.set_num_threads(threads)
    return threads


@dataclass
class Precision:
    name: str  # "fp32", "bf16", "fp16" or "stored"
    load_dtype: Any  # what `load_model` is given (None: the stored dtype)
    autocast_dtype: Any  # the dtype the Trainer autocasts to, or None
    overrides: dict[str, Any] = field(default_factory=dict)


def choose_precision(training_config: dict[str, Any], *, use_cuda: bool) -> Precision:
    """CPU trains in float32 (half precision there is slow and numerically poor) unless the user
    asks for bf16. CUDA keeps the user's `fp16`/`bf16` choice; when there is none and the GPU
    supports bf16, bf16 it is. bf16 means, on either device: the frozen base weights loaded in
    bf16 (autocast would round them to bf16 for every matmul anyway, recasting each one on every
    forward) and the step autocast to bf16; the LoRA weights stay float32."""
    import torch

    fp16 = bool(training_config.get("fp16"))
    bf16 = training_config.get("bf16")
    if not use_cuda:
        if bf16:
            return Precision("bf16", torch.bfloat16, torch.bfloat16)
        return Precision("fp32", torch.float32, None)
    if fp16:
        return Precision("fp16", None, torch.float16)
    if bf16 is False:
        return Precision("stored", None, None)
    if bf16 or torch.cuda.is_bf16_supported():
        overrides = {} if bf16 else {"bf16": True}
        return Precision("bf16", torch.bfloat16, torch.bfloat16, overrides)
    return Precision("stored", None, None)


def lora_inputs_follow_autocast(model) -> int:
    """Turn off PEFT's cast of each LoRA layer's input to the LoRA weights' dtype; returns how many
    layers changed.

    Only for a model that trains under autocast: there the LoRA matmuls run in the autocast dtype
    whatever the input, so the cast to float32 (and autocast's cast back, and both of their
    backward casts) is pure overhead: about five extra kernels per LoRA layer per step, which is
    what bounds a small step on a GPU (kernel launches, not arithmetic). The LoRA weights and their
    gradients stay float32. Without autocast the cast is needed (bf16 input, fp32 weights).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and getattr(module, "cast_input_dtype_enabled", None):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed


def repeated_layers(model):
    """The model's stack of decoder layers (`get_decoder().layers`, else the longest list of
    identical modules), or None."""
    import torch

    def uniform(layers) -> bool:
        return (
            isinstance(layers, torch.nn.ModuleList)
            and len(layers) >= 2
            and len({type(m) for m in layers}) == 1
        )

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        layers = base.get_decoder().layers
        if uniform(layers):
            return layers
    except Exception:  # noqa: BLE001 - no decoder accessor: look for the stack
        pass
    best = None
    for module in base.modules():
        if uniform(module) and (best is None or len(module) > len(best)):
            best = module
    return best


def compile_unavailable(device_type: str) -> str | None:
    """Why `torch.compile` cannot run here, or None. Inductor builds CPU kernels with a C++
    compiler; on CUDA it uses Triton."""
    import shutil

    if device_type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler on this machine (torch.compile needs one for CPU kernels)"
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (torch.compile needs it for CUDA kernels)"
    return None


def compile_layers(layers) -> int:
    """`torch.compile` every block of the stack with dynamic shapes; returns how many.

    Compiling the blocks rather than the whole model keeps the compile to one layer's graph
    (dynamo reuses it for every block: the weights are inputs) and its time to seconds, where the
    whole 1.1B model was still being traced after 200 s on the H200. Nothing compiles until the
    first forward; a graph that fails to compile runs eagerly instead of failing the job
    (`suppress_errors`), which `compiled_graphs` then shows.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (1-2 per compiled model when it works)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def training_overrides(training_config: dict[str, Any], *, use_cuda: bool) -> dict[str, Any]:
    """TrainingArguments the backend sets itself (forced) or defaults (when the user did not)."""
    forced: dict[str, Any] = {
        "report_to": "none",
        # Trained tokens are counted on the host from the collator's batches (`make_trainer`).
        "include_num_input_tokens_seen": "no",
    }
    if not use_cuda:
        forced["use_cpu"] = True
    defaults: dict[str, Any] = {
        "logging_steps": CUDA_LOGGING_STEPS if use_cuda else 1,  # a loss point per logging step
        # The adapter is saved by the backend; checkpoints for resuming come every
        # `checkpoint_minutes` (sllm.finetune.checkpoints), only the last one kept.
        "save_strategy": "no",
        "save_total_limit": 1,
        "disable_tqdm": True,  # progress goes to the job record, not to the worker's log
    }
    if use_cuda:
        defaults["logging_nan_inf_filter"] = False  # `torch.isnan(loss)` in an `if`: a sync
        defaults["accelerator_config"] = {"non_blocking": True}  # with pinned memory
    else:
        defaults["dataloader_pin_memory"] = False
    out = {k: v for k, v in defaults.items() if k not in training_config}
    out.update(forced)
    return out


# Kept in `TrainerState.stateful_callbacks` (a dict saved with every checkpoint and loaded back
# on resume, which transformers leaves alone under a name no callback has), so a resumed job
# counts the tokens of its earlier attempts too.
COUNTS_KEY = "SllmTokenCounts"


def loss_tokens_seen(state) -> int:
    """Tokens that carried loss so far (see `make_trainer`)."""
    counts = getattr(state, "stateful_callbacks", None)
    entry = counts.get(COUNTS_KEY) if isinstance(counts, dict) else None
    return int((entry or {}).get("loss_tokens", 0) or 0)


def _add_loss_tokens(state, n: int) -> None:
    if not isinstance(getattr(state, "stateful_callbacks", None), dict):
        state.stateful_callbacks = {}
    state.stateful_callbacks[COUNTS_KEY] = {"loss_tokens": loss_tokens_seen(state) + n}


def make_trainer(*, validator=None, **kwargs):
    """A `transformers.Trainer` that takes each batch's token counts (host-side ints the collator
    put there) out of the batch: processed tokens add to `state.num_input_tokens_seen`, tokens
    that carry loss to `loss_tokens_seen(state)`; and that evaluates through `validator` and
    counts the training batches' token accuracy (`sllm.finetune.evaluation.ValidationMixin`)."""
    from transformers import Trainer

    from sllm.finetune.evaluation import ValidationMixin

    class SllmTrainer(ValidationMixin, Trainer):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            for batch in batches:
                processed, loss = pop_counts(batch)
                self.state.num_input_tokens_seen += processed
                _add_loss_tokens(self.state, loss)
            return batches, num_items

    trainer = SllmTrainer(**kwargs)
    trainer.validator = validator
    return trainer
