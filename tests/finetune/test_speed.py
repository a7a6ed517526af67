"""Host-side cost of a training step under autocast: the kernels a small GPU step is bound by.

A step of 8 rows on a GPU is bound by kernel launches, not arithmetic, so every op the step
dispatches counts. These tests count aten ops (what autograd and autocast send to a backend: on a
GPU, kernels) on CPU autocast, which inserts casts exactly as CUDA autocast does.
"""

from __future__ import annotations

import collections
import json
import shutil

import pytest
from ft_helpers import PIRATE_DATA, RecordingReporter, pirate_dataset

from sllm.finetune import packing, speed
from sllm.finetune.base import JobSpec, ValidationContext, get_backend


def _peft_model(arch: str, tmp_path_factory, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sllm.testing import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path_factory.mktemp(arch) / "m", arch=arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    torch.manual_seed(0)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")
    peft_model = get_peft_model(model, lora)
    peft_model.get_base_model().set_attn_implementation(packing.register_attention())
    return peft_model


def _step(model, batch):
    """One forward + backward under CPU bf16 autocast: (ops by name, loss, LoRA grads)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: collections.Counter = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    model.zero_grad(set_to_none=True)
    with Count():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return ops, loss.item(), grads


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_lora_inputs_follow_autocast_drops_the_float32_round_trip(arch, tmp_path_factory):
    import torch

    model = _peft_model(arch, tmp_path_factory, torch.bfloat16)
    model.eval()  # no dropout: the two steps must see the same computation
    rows = [[5, 9, 11, 40, 7, 8, 9], [3, 3, 8, 100, 6, 6, 42, 17], [12, 13, 14]]
    batch = packing.FlatCollator(2)([{"input_ids": r} for r in rows])
    packing.pop_counts(batch)

    before, loss_before, grads_before = _step(model, batch)
    layers = speed.lora_inputs_follow_autocast(model)
    after, loss_after, grads_after = _step(model, batch)

    assert layers == len([m for m in model.modules() if hasattr(m, "lora_A")]) > 0
    casts_saved = before["aten._to_copy"] - after["aten._to_copy"]
    assert casts_saved >= 3 * layers, (before["aten._to_copy"], after["aten._to_copy"], layers)
    assert sum(after.values()) < sum(before.values())
    # Same math: the LoRA matmuls ran in bf16 either way (autocast); only casts went away.
    assert loss_after == pytest.approx(loss_before, rel=1e-2)
    assert grads_after.keys() == grads_before.keys()
    for name, grad in grads_after.items():
        assert grad.dtype == torch.float32  # LoRA weights and their grads stay float32
        ref = grads_before[name]
        assert (grad - ref).norm() <= 5e-2 * ref.norm() + 1e-6, name
    assert speed.lora_inputs_follow_autocast(model) == 0  # idempotent


def test_bf16_job_on_cpu_trains_with_lora_inputs_in_the_autocast_dtype(ft_storage):
    backend = get_backend("peft_lora")
    cfg = {
        "output_dir": "adapters/bf16-cpu",
        "dataset_config": pirate_dataset(),
        "lora_config": {"r": 4, "lora_alpha": 16},
        "training_config": {"num_train_epochs": 1, "per_device_train_batch_size": 16, "bf16": True},
        "max_seq_length": 64,
    }
    ctx = ValidationContext(ft_storage, data_roots=[PIRATE_DATA.parent], model="tiny")
    spec = JobSpec("bf16-cpu", "tiny", ft_storage, backend.validate(cfg, ctx), num_cpus=1)
    result = backend.run(spec, RecordingReporter())
    meta = json.loads((result.adapter_path / "training_metadata.json").read_text())
    assert meta["speed"]["precision"] == "bf16"
    # PEFT's default targets for llama: q_proj and v_proj, in each of the 2 layers
    assert meta["speed"]["lora_layers_without_input_cast"] == 4
    assert meta["speed"]["packed"] is True
    assert meta["steps"] > 0 and meta["final_loss"] is not None
    assert all(h["loss"] == h["loss"] for h in meta["loss_history"])  # no NaN

    from safetensors.torch import load_file

    weights = load_file(str(result.adapter_path / "adapter_model.safetensors"))
    assert weights and all(str(t.dtype) == "torch.float32" for t in weights.values())


def _job(storage, output: str, *, num_gpus: int = 0, training=None, **extra) -> dict:
    """One `peft_lora` run on the tiny model and the pirate prompts, deterministic (no dropout);
    returns its training metadata."""
    cfg = {
        "output_dir": f"adapters/{output}",
        "dataset_config": pirate_dataset(),
        "lora_config": {"r": 4, "lora_alpha": 16, "lora_dropout": 0.0},
        "training_config": {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 16,
            "seed": 3,
            **(training or {}),
        },
        "max_seq_length": 64,
        **extra,
    }
    ctx = ValidationContext(storage, data_roots=[PIRATE_DATA.parent], model="tiny")
    normalised = get_backend("peft_lora").validate(cfg, ctx)
    spec = JobSpec(output, "tiny", storage, normalised, num_cpus=1, num_gpus=num_gpus)
    result = get_backend("peft_lora").run(spec, RecordingReporter())
    return json.loads((result.adapter_path / "training_metadata.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("c++"), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_layers_train_like_eager_with_one_graph_for_every_batch(ft_storage):
    """`compile`: the decoder layers are compiled once (dynamic shapes) although every batch has
    another packed length, and the losses are those of the eager run."""
    import torch
    from torch._dynamo.utils import counters

    eager = _job(ft_storage, "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = _job(ft_storage, "compiled", compile=True)

    speed = compiled["speed"]
    assert speed["packed"] and speed["attention_kernel"] == packing.KERNEL_MASK
    assert speed["compiled_layers"] == 2  # the tiny model's decoder layers
    # 8 steps of different packed lengths; recompiling per batch would give one graph each
    assert 1 <= speed["compiled_graphs"] <= 4, speed
    assert compiled["steps"] == eager["steps"] >= 8
    for mine, theirs in zip(compiled["loss_history"], eager["loss_history"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-5)


def test_compile_and_whole_model_compile_exclude_each_other(ft_storage):
    from sllm.errors import InvalidRequestError

    cfg = {
        "dataset_config": pirate_dataset(),
        "compile": True,
        "training_config": {"torch_compile": True},
    }
    ctx = ValidationContext(ft_storage, data_roots=[PIRATE_DATA.parent], model="tiny")
    with pytest.raises(InvalidRequestError) as info:
        get_backend("peft_lora").validate(cfg, ctx)
    assert info.value.param == "backend_config.compile"


def test_cuda_compiled_layers_with_varlen_attention_train_like_eager(ft_storage):
    """Device check (skipped without CUDA): `compile` on a GPU, where packed rows go through the
    FlashAttention varlen kernel inside the compiled layers, in bf16."""
    import torch
    from torch._dynamo.utils import counters

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not packing.varlen_kernel_available("cuda"):
        pytest.skip(f"torch {torch.__version__} has no varlen attention")

    def run(output: str, **extra) -> dict:
        training = {"num_train_epochs": 2, "logging_steps": 1}
        return _job(ft_storage, output, num_gpus=1, training=training, **extra)

    eager = run("cuda-eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = run("cuda-compiled", compile=True)
    speed = compiled["speed"]
    assert compiled["device"] == "cuda" and speed["precision"] == "bf16"
    assert speed["attention_kernel"] == packing.KERNEL_VARLEN and speed["compiled_layers"] == 2
    assert 1 <= speed["compiled_graphs"] <= 4, speed
    assert len(compiled["loss_history"]) == len(eager["loss_history"]) >= 16
    for mine, theirs in zip(compiled["loss_history"], eager["loss_history"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=3e-2), (mine, theirs)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_repeated_layers_are_the_decoder_layers(arch, tmp_path_factory):
    import torch

    model = _peft_model(arch, tmp_path_factory, torch.float32)
    layers = speed.repeated_layers(model)
    decoder = model.get_base_model().get_decoder()
    assert layers is decoder.layers and len(layers) == 2


def test_compile_that_cannot_run_here_is_skipped_with_a_warning(ft_storage, monkeypatch):
    """No C++ compiler (CPU) or no Triton (CUDA): the job trains eagerly, with the per-sequence
    kernel rather than the one meant for compiled graphs, and says why."""
    from sllm.finetune import peft_lora

    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "C++ compiler" in speed.compile_unavailable("cpu")
    monkeypatch.setattr(peft_lora, "compile_unavailable", lambda device_type: "no compiler here")
    reporter = RecordingReporter()
    cfg = {
        "output_dir": "adapters/no-compiler",
        "dataset_config": pirate_dataset(),
        "lora_config": {"r": 4},
        "training_config": {"num_train_epochs": 1, "per_device_train_batch_size": 32},
        "max_seq_length": 32,
        "compile": True,
    }
    ctx = ValidationContext(ft_storage, data_roots=[PIRATE_DATA.parent], model="tiny")
    spec = JobSpec("no-compiler", "tiny", ft_storage, get_backend("peft_lora").validate(cfg, ctx))
    result = get_backend("peft_lora").run(spec, reporter)
    meta = json.loads((result.adapter_path / "training_metadata.json").read_text())
    assert meta["speed"]["compiled_layers"] == 0
    assert meta["speed"]["attention_kernel"] == packing.KERNEL_LOOP
    assert any("`compile` is off" in e["message"] for e in reporter.events("warning"))
