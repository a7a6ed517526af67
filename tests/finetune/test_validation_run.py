"""Validation, early stopping and `init_adapter` in real `peft_lora` runs (tiny llama, CPU)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from ft_helpers import RecordingReporter, write_jsonl

from sllm.finetune.base import JobSpec, ValidationContext, get_backend

VALID_KEYS = {"valid_loss", "valid_mean_token_accuracy"}


@pytest.fixture
def backend():
    return get_backend("peft_lora")


def config(train: Path, out: str, *, split=None, valid: Path | None = None, **extra) -> dict:
    ds = {
        "dataset_source": "local",
        "data_files": str(train),
        "extension_type": "json",
        "tokenization_field": "prompt",
    }
    if split is not None:
        ds["validation_split"] = split
    cfg = {
        "output_dir": out,
        "dataset_config": ds,
        "lora_config": {"r": 4, "lora_alpha": 16},
        "training_config": {
            "num_train_epochs": 1,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 8,
            "seed": 0,
        },
        "max_seq_length": 32,
    }
    if valid is not None:
        cfg["validation_dataset_config"] = {**ds, "data_files": str(valid)}
        cfg["validation_dataset_config"].pop("validation_split", None)
    training = extra.pop("training", {})
    cfg["training_config"].update(training)
    cfg.update(extra)
    return cfg


def run(backend, storage: Path, cfg: dict, roots: list[Path], job_id: str):
    reporter = RecordingReporter()
    ctx = ValidationContext(storage, data_roots=roots, model="tiny")
    spec = JobSpec(job_id, "tiny", storage, backend.validate(cfg, ctx), num_cpus=2)
    result = backend.run(spec, reporter)
    meta = json.loads((result.adapter_path / "training_metadata.json").read_text())
    return result, meta, reporter


@pytest.fixture
def pirate_file(data_dir, pirate_rows) -> Path:
    return write_jsonl(data_dir / "train.jsonl", pirate_rows[:40])


def held_out_rows(storage: Path, train: Path, split, seed: int = 0, max_len: int = 32):
    """The validation rows as the run drew them (the same loader, tokenizer and split)."""
    from sllm.finetune.config import DatasetConfig
    from sllm.finetune.evaluation import split_rows
    from sllm.finetune.peft_lora import load_rows
    from sllm.store.loader import load_model

    _, tokenizer = load_model(storage, "tiny")
    ds = DatasetConfig(
        dataset_source="local",
        data_files=str(train),
        extension_type="json",
        tokenization_field="prompt",
    )
    _, rows = load_rows(ds, tokenizer, max_len, 1)
    return [list(r) for r in split_rows(rows, split, seed)[1]["input_ids"]]


def reference_loss(storage: Path, adapter: Path, rows: list[list[int]]) -> float:
    """The token-weighted mean next-token loss of the stored adapter, one row at a time through
    the model's own loss (plain attention, no packing), computed independently of the backend."""
    import torch
    from peft import PeftModel

    from sllm.store.loader import load_model

    base, tokenizer = load_model(storage, "tiny", dtype=torch.float32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = PeftModel.from_pretrained(base, adapter).eval()
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            labels = ids.clone()
            labels[labels == pad] = -100
            n = int((labels[0, 1:] != -100).sum())
            if n:
                total += float(model(input_ids=ids, labels=labels).loss) * n
                count += n
    return total / count


def test_validation_split_reports_metrics_and_matches_a_reference(
    backend, ft_storage, data_dir, pirate_file
):
    cfg = config(pirate_file, "valid_split_adapter", split=0.25)
    result, meta, reporter = run(backend, ft_storage, cfg, [data_dir], "val-split")

    steps = 4  # 30 training rows, 8 per step
    assert meta["dataset"]["num_rows"] == 40 and meta["dataset"]["num_train_rows"] == 30
    validation = meta["validation"]
    assert validation["num_rows"] == 10 and validation["source"] == {"validation_split": 0.25}
    # default schedule: eval_steps 0.1 of 4 steps -> every step
    assert [h["step"] for h in validation["history"]] == list(range(1, steps + 1))
    losses = [h["valid_loss"] for h in validation["history"]]
    best = min(range(steps), key=losses.__getitem__)
    assert meta["best_step"] == best + 1 and meta["best_valid_loss"] == losses[best]
    assert result.metrics["best_step"] == meta["best_step"]
    assert all(0 <= h["valid_mean_token_accuracy"] <= 1 for h in validation["history"])
    assert all(0 <= p["train_mean_token_accuracy"] <= 1 for p in meta["loss_history"])

    last = reporter.progress_calls[-1]
    assert VALID_KEYS | {"train_mean_token_accuracy"} <= set(last)
    assert last["valid_loss"] == losses[-1]
    events = reporter.events("metric")
    assert [e["data"]["step"] for e in events] == list(range(1, steps + 1))
    assert [e["data"]["valid_loss"] for e in events] == losses
    assert all("train_mean_token_accuracy" in e["data"] for e in reporter.events("loss"))

    # padding-free evaluation equals a per-row reference of the adapter that was saved
    assert meta["speed"]["packed"] is True
    rows = held_out_rows(ft_storage, pirate_file, 0.25)
    assert len(rows) == 10
    expected = reference_loss(ft_storage, result.adapter_path, rows)
    assert meta["best_valid_loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    "batching", ["padded", pytest.param("token_budget", marks=pytest.mark.slow)]
)
def test_validation_dataset_with_eval_steps_and_a_final_evaluation(
    backend, ft_storage, data_dir, pirate_file, pirate_rows, batching
):
    valid = write_jsonl(data_dir / "valid.jsonl", pirate_rows[100:112])
    cfg = config(
        pirate_file,
        f"valid_{batching}_adapter",
        valid=valid,
        batching=batching,
        training={"eval_strategy": "steps", "eval_steps": 2, "max_steps": 5},
    )
    result, meta, reporter = run(backend, ft_storage, cfg, [data_dir], f"val-{batching}")

    history = meta["validation"]["history"]
    assert [h["step"] for h in history] == [2, 4, 5]  # every 2 steps, and at the end
    assert meta["validation"]["num_rows"] == 12 and meta["dataset"]["num_train_rows"] == 40
    assert meta["validation"]["source"]["data_files"] == str(valid)
    best = min(history, key=lambda h: h["valid_loss"])
    assert meta["best_step"] == best["step"]
    # the padded and token-budget collators' evaluations agree with the same reference
    import torch  # noqa: F401 - (the reference loads the model)

    from sllm.store.loader import load_model

    _, tok = load_model(ft_storage, "tiny")
    rows = [
        tok(r["prompt"], truncation=True, max_length=32)["input_ids"] for r in pirate_rows[100:112]
    ]
    expected = reference_loss(ft_storage, result.adapter_path, rows)
    assert meta["best_valid_loss"] == pytest.approx(expected, rel=1e-4)


def gibberish_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt": " ".join(str(rng.randint(0, 99)) for _ in range(20))} for _ in range(n)]


def test_early_stopping_stops_and_keeps_the_best_adapter(
    backend, ft_storage, data_dir, pirate_file
):
    # Training on the pirate prompts at a high learning rate makes the numbers of the validation
    # data less likely after the second step: the validation loss rises from there.
    valid = write_jsonl(data_dir / "numbers.jsonl", gibberish_rows(8))
    cfg = config(
        pirate_file,
        "early_stop_adapter",
        valid=valid,
        early_stopping_patience=2,
        training={"learning_rate": 0.2, "max_steps": 12, "eval_steps": 1},
    )
    result, meta, reporter = run(backend, ft_storage, cfg, [data_dir], "val-early")

    history = meta["validation"]["history"]
    losses = [h["valid_loss"] for h in history]
    assert losses[1] < losses[0] and min(losses[2:]) > losses[1], losses
    assert meta["steps"] == 4 < 12  # stopped after two evaluations without improvement
    assert meta["validation"]["stopped_early_at"] == 4
    assert meta["best_step"] == 2 and meta["best_valid_loss"] == losses[1]
    assert any("Early stopping at step 4" in e["message"] for e in reporter.events("info"))
    # the adapter on disk is step 2's, not the last step's
    from sllm.store.loader import load_model

    _, tok = load_model(ft_storage, "tiny")
    rows = [
        tok(r["prompt"], truncation=True, max_length=32)["input_ids"] for r in gibberish_rows(8)
    ]
    saved = reference_loss(ft_storage, result.adapter_path, rows)
    assert saved == pytest.approx(losses[1], rel=1e-4)
    assert saved != pytest.approx(losses[-1], rel=1e-3)


def adapter_weights(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_a_resumed_run_keeps_the_best_adapter_found_before_the_restart(
    backend, ft_storage, data_dir, pirate_file
):
    """Checkpoints every step; the run is cut back to its step-2 checkpoint (what a restart
    after a kill at step 3 leaves) and run again: it replays the evaluations, finds the best
    weights of the steps it skips, and ends with the uninterrupted run's adapter."""
    import shutil

    import torch

    from sllm.paths import jobs_dir

    valid = write_jsonl(data_dir / "numbers.jsonl", gibberish_rows(8))
    training = {"learning_rate": 0.2, "max_steps": 4, "eval_steps": 1}
    training |= {"save_strategy": "steps", "save_steps": 1, "save_total_limit": 4}
    cfg = config(pirate_file, "resume_best_adapter", valid=valid, training=training)
    first, meta1, _ = run(backend, ft_storage, cfg, [data_dir], "val-resume")
    assert meta1["best_step"] == 2  # then the validation loss rises (see the test above)
    scratch = jobs_dir(ft_storage) / "val-resume" / "trainer"
    assert sorted(p.name for p in scratch.glob("best-*")) == ["best-2.safetensors"]
    weights1 = adapter_weights(first.adapter_path)

    for step in (3, 4):
        shutil.rmtree(scratch / f"checkpoint-{step}")
    second, meta2, reporter = run(backend, ft_storage, cfg, [data_dir], "val-resume")
    assert meta2["resumed_from"]["step"] == 2
    assert [e["data"]["step"] for e in reporter.events("metric")] == [3, 4]  # 1, 2 replayed
    assert [h["step"] for h in meta2["validation"]["history"]] == [1, 2, 3, 4]
    assert meta2["best_step"] == 2
    assert meta2["best_valid_loss"] == pytest.approx(meta1["best_valid_loss"], rel=1e-6)
    weights2 = adapter_weights(second.adapter_path)
    for name, value in weights1.items():
        assert torch.allclose(value, weights2[name], atol=1e-6), name


def test_init_adapter_continues_from_the_earlier_weights(
    backend, ft_storage, data_dir, pirate_file, pirate_rows
):
    first_cfg = config(pirate_file, "init_first_adapter", training={"max_steps": 5})
    first, meta1, _ = run(backend, ft_storage, first_cfg, [data_dir], "init-first")

    valid = write_jsonl(data_dir / "valid.jsonl", pirate_rows[100:110])
    cfg = config(
        pirate_file,
        "init_second_adapter",
        valid=valid,
        init_adapter="init_first_adapter",
        lora_config={},  # taken from the earlier adapter
        training={"max_steps": 2, "eval_on_start": True, "eval_strategy": "steps"},
    )
    second, meta2, reporter = run(backend, ft_storage, cfg, [data_dir], "init-second")

    # the step-0 evaluation is the earlier adapter's, exactly
    from sllm.store.loader import load_model

    _, tok = load_model(ft_storage, "tiny")
    rows = [
        tok(r["prompt"], truncation=True, max_length=32)["input_ids"] for r in pirate_rows[100:110]
    ]
    start = meta2["validation"]["history"][0]
    assert start["step"] == 0
    assert start["valid_loss"] == pytest.approx(
        reference_loss(ft_storage, first.adapter_path, rows), rel=1e-4
    )
    # training goes on where the first run ended, not from fresh LoRA weights
    first_losses = [p["loss"] for p in meta1["loss_history"]]
    resumed = meta2["loss_history"][0]["loss"]
    assert abs(resumed - first_losses[-1]) < abs(resumed - first_losses[0])
    assert meta2["init_adapter"] == "init_first_adapter"
    assert meta2["lora_config"]["r"] == 4 and meta2["lora_config"]["lora_alpha"] == 16
    saved = json.loads((second.adapter_path / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["base_model_name_or_path"] == "tiny"
    assert (first.adapter_path / "adapter_model.safetensors").is_file()  # the earlier one stays
    assert any("Starting from the adapter" in e["message"] for e in reporter.events("info"))
