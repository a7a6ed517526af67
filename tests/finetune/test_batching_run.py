"""Batching modes through the real backend run: padding-free equals padded, fallbacks, budgets."""

from __future__ import annotations

import json

import pytest
from ft_helpers import PIRATE_DATA, RecordingReporter, pirate_dataset

from sllm.errors import InvalidRequestError
from sllm.finetune import batching, speed
from sllm.finetune.base import JobSpec, ValidationContext, get_backend


@pytest.fixture
def backend():
    return get_backend("peft_lora")


def config(batching_mode: str, output: str, **extra) -> dict:
    return {
        "output_dir": f"adapters/{output}",
        "dataset_config": pirate_dataset(),
        # no dropout: the runs must be deterministic to compare them step by step
        "lora_config": {"r": 4, "lora_alpha": 16, "lora_dropout": 0.0},
        "training_config": {
            "num_train_epochs": 1,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 16,
            "seed": 3,
        },
        "max_seq_length": 64,
        "batching": batching_mode,
        **extra,
    }


def train(backend, storage, cfg, model="tiny", job_id="job"):
    ctx = ValidationContext(storage, data_roots=[PIRATE_DATA.parent], model=model)
    spec = JobSpec(job_id, model, storage, backend.validate(cfg, ctx), num_cpus=1)
    reporter = RecordingReporter()
    result = backend.run(spec, reporter)
    meta = json.loads((result.adapter_path / "training_metadata.json").read_text())
    return meta, reporter, result


def adapter_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def without_dropout(storage, model: str) -> str:
    """A copy of `model` with its dropout off (OPT's default is 0.1), for step-exact runs."""
    import shutil

    name = f"{model}-nodrop"
    target = storage / "transformers" / name
    if not target.exists():
        shutil.copytree(storage / "transformers" / model, target)
        config = json.loads((target / "config.json").read_text())
        config.update(dropout=0.0, attention_dropout=0.0)
        (target / "config.json").write_text(json.dumps(config))
    return name


@pytest.mark.parametrize("model", ["tiny", "tiny-opt"])
def test_padding_free_trains_exactly_like_padded_batches(backend, ft_storage, model):
    """Same rows per step, same loss at every step, same trained tokens, same adapter."""
    model = without_dropout(ft_storage, model) if model == "tiny-opt" else model
    padded, _, res_p = train(backend, ft_storage, config("padded", f"{model}-p"), model)
    free, reporter, res_f = train(backend, ft_storage, config("padding_free", f"{model}-f"), model)

    assert free["speed"]["mode"] == "padding_free" and free["speed"]["packed"] is True
    assert free["speed"]["attention_kernel"] == "sdpa_loop" and free["speed"]["probe"]["ok"]
    assert padded["speed"]["packed"] is False
    assert free["steps"] == padded["steps"] == 8
    assert free["trained_tokens"] == padded["trained_tokens"] > 0
    losses_p = [p["loss"] for p in padded["loss_history"]]
    losses_f = [p["loss"] for p in free["loss_history"]]
    assert losses_f == pytest.approx(losses_p, rel=2e-5)
    assert free["train_loss"] == pytest.approx(padded["train_loss"], rel=2e-5)
    a, b = adapter_weights(res_p.adapter_path), adapter_weights(res_f.adapter_path)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-4, key
    assert any("padding-free" in e["message"] for e in reporter.events("info"))


def test_model_failing_the_probe_falls_back_to_length_grouped_padding(
    backend, ft_storage, monkeypatch
):
    """OPT on its own attention mixes the sequences of a packed row; the probe sees it, and the
    job trains on padded batches of similar lengths instead."""
    monkeypatch.setattr(batching.packing, "register_attention", lambda: "sdpa")
    meta, reporter, _ = train(backend, ft_storage, config("padding_free", "opt-fb"), "tiny-opt")

    sp = meta["speed"]
    assert sp["packed"] is False and sp["attention_kernel"] is None
    assert sp["probe"]["ok"] is False and sp["probe"]["max_error"] > 1e-2
    assert "group_by_length" in sp["fallback"]
    assert meta["training_overrides"]["train_sampling_strategy"] == "group_by_length"
    assert meta["steps"] == 8 and meta["trained_tokens"] > 0
    notes = [e["message"] for e in reporter.events("info") if "not supported" in e["message"]]
    assert notes and "differ" in notes[0]


def test_fallback_keeps_the_users_sampling_strategy(backend, ft_storage, monkeypatch):
    monkeypatch.setattr(batching.packing, "register_attention", lambda: "sdpa")
    cfg = config("padding_free", "opt-fb2")
    cfg["training_config"]["train_sampling_strategy"] = "sequential"
    meta, _, _ = train(backend, ft_storage, cfg, "tiny-opt")
    assert "train_sampling_strategy" not in meta["training_overrides"]
    assert meta["speed"]["fallback"] == "as configured"


@pytest.mark.parametrize("model", ["tiny", "tiny-opt"])
def test_token_budget_fills_batches_to_the_budget(backend, ft_storage, model):
    padded, _, _ = train(backend, ft_storage, config("padded", f"{model}-p2"), model)
    meta, reporter, _ = train(
        backend, ft_storage, config("token_budget", f"{model}-tb", tokens_per_batch=256), model
    )
    sp = meta["speed"]
    assert sp["mode"] == "token_budget" and sp["packed"] is True and sp["tokens_per_batch"] == 256
    assert meta["trained_tokens"] == padded["trained_tokens"]  # every row once
    # full batches: as few steps as the budget allows (at most one row of slack per batch)
    assert meta["steps"] == sp["num_batches_per_epoch"]
    assert padded["trained_tokens"] / 256 <= meta["steps"] <= padded["trained_tokens"] / 192
    assert meta["training_overrides"]["per_device_train_batch_size"] == 1
    assert all(isinstance(e["data"]["loss"], float) for e in reporter.events("loss"))


def test_token_budget_without_packing_pads_length_sorted_groups(backend, ft_storage, monkeypatch):
    monkeypatch.setattr(batching.packing, "register_attention", lambda: "sdpa")
    meta, _, _ = train(
        backend, ft_storage, config("token_budget", "opt-tb", tokens_per_batch=512), "tiny-opt"
    )
    sp = meta["speed"]
    assert sp["packed"] is False and "padded" in sp["fallback"] and meta["trained_tokens"] > 0


P = "backend_config"


@pytest.mark.parametrize(
    ("extra", "param", "fragment"),
    [
        ({"batching": "packed"}, f"{P}.batching", "padding_free"),
        ({"tokens_per_batch": 4096}, f"{P}.tokens_per_batch", "token_budget"),
        ({"batching": "token_budget", "tokens_per_batch": 8}, f"{P}.tokens_per_batch", "16"),
        (
            {"batching": "token_budget", "tokens_per_batch": 64, "max_seq_length": 128},
            f"{P}.tokens_per_batch",
            "max_seq_length",
        ),
        ({"batching": "token_budget", "tokens_per_batch": 1.5}, f"{P}.tokens_per_batch", ""),
    ],
)
def test_batching_config_is_validated(backend, ft_storage, extra, param, fragment):
    cfg = {**config("padding_free", "never"), **extra}
    ctx = ValidationContext(ft_storage, data_roots=[PIRATE_DATA.parent], model="tiny")
    with pytest.raises(InvalidRequestError) as info:
        backend.validate(cfg, ctx)
    assert info.value.param == param, info.value.message
    assert fragment in info.value.message


def test_validate_fills_batching_defaults(backend, ft_storage):
    ctx = ValidationContext(ft_storage, data_roots=[PIRATE_DATA.parent], model="tiny")
    cfg = config("padding_free", "x")
    del cfg["batching"]
    out = backend.validate(cfg, ctx)
    assert out["batching"] == "padding_free" and out["tokens_per_batch"] is None
    out = backend.validate({**cfg, "batching": "token_budget"}, ctx)
    assert out["tokens_per_batch"] is None  # the device's default, decided by the run


def test_default_token_budget_depends_on_the_device():
    from sllm.finetune.config import parse_backend_config, token_budget

    cfg = parse_backend_config({**config("token_budget", "x")})
    assert token_budget(cfg, device="cuda", max_seq_length=512) == 16384
    assert token_budget(cfg, device="cpu", max_seq_length=512) == 4096
    assert token_budget(cfg, device="cpu", max_seq_length=8192) == 8192
    cfg = parse_backend_config({**config("token_budget", "x"), "tokens_per_batch": 300})
    assert token_budget(cfg, device="cuda", max_seq_length=512) == 300
    assert (
        token_budget(parse_backend_config(config("padded", "x")), device="cpu", max_seq_length=8)
        is None
    )


def test_cuda_defaults_keep_syncs_out_of_the_step_loop():
    cpu = speed.training_overrides({}, use_cuda=False)
    cuda = speed.training_overrides({}, use_cuda=True)
    assert cpu["logging_steps"] == 1 and cpu["use_cpu"] is True
    assert cuda["logging_steps"] == speed.CUDA_LOGGING_STEPS and "use_cpu" not in cuda
    assert cuda["logging_nan_inf_filter"] is False
    assert cuda["accelerator_config"] == {"non_blocking": True}
    assert cpu["include_num_input_tokens_seen"] == cuda["include_num_input_tokens_seen"] == "no"
    mine = speed.training_overrides(
        {"logging_steps": 1, "logging_nan_inf_filter": True}, use_cuda=True
    )
    assert "logging_steps" not in mine and "logging_nan_inf_filter" not in mine


def test_cpu_precision_and_threads():
    import torch

    assert speed.choose_precision({}, use_cuda=False).load_dtype == torch.float32
    assert speed.choose_precision({}, use_cuda=False).autocast_dtype is None
    cpu_bf16 = speed.choose_precision({"bf16": True}, use_cuda=False)
    assert cpu_bf16.autocast_dtype == cpu_bf16.load_dtype == torch.bfloat16
    assert speed.choose_precision({"fp16": True}, use_cuda=True).name == "fp16"
    assert speed.choose_precision({"bf16": False}, use_cuda=True).name == "stored"
    before = torch.get_num_threads()
    try:
        assert speed.configure_threads(1) == 1 == torch.get_num_threads()
        assert speed.configure_threads(10_000) == speed.available_cpus()
    finally:
        torch.set_num_threads(before)
