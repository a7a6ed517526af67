"""Chat data through the real backend: validate's checks and note, and runs where padding-free
batches train exactly like padded ones with the answer-only masks, counting loss tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ft_helpers import RecordingReporter, write_jsonl

from sllm.errors import InvalidRequestError
from sllm.finetune.base import JobSpec, ValidationContext, get_backend

QUESTIONS = ["What is the sea?", "Where be the gold?", "How are you?", "Who are you?"]


def chat_rows(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        messages = [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": f"{q} ({i})"},
            {"role": "assistant", "content": f"Arr, matey number {i}, the quick brown fox!"},
        ]
        if i % 3 == 0:  # a second turn, the first answer kept as context only
            messages[2]["weight"] = 0
            messages += [
                {"role": "user", "content": "Write a short poem about the sea."},
                {"role": "assistant", "content": "The sea and the sky, arr."},
            ]
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", chat_rows())


def config(chat_file: Path, batching: str, output: str, **extra) -> dict:
    return {
        "output_dir": f"adapters/{output}",
        "dataset_config": {
            "dataset_source": "local",
            "data_files": str(chat_file),
            "extension_type": "json",
        },
        "lora_config": {"r": 4, "lora_alpha": 16, "lora_dropout": 0.0},
        "training_config": {
            "num_train_epochs": 1,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 8,
            "seed": 3,
        },
        "max_seq_length": 256,
        "batching": batching,
        **extra,
    }


def test_padding_free_chat_run_equals_padded_and_counts_loss_tokens(ft_storage, chat_file):
    backend = get_backend("peft_lora")
    metas, reporters = {}, {}
    for mode in ("padded", "padding_free"):
        ctx = ValidationContext(ft_storage, data_roots=[chat_file.parent], model="tiny")
        cfg = backend.validate(config(chat_file, mode, f"chat-{mode}"), ctx)
        assert cfg["dataset_config"]["format"] == "auto"
        note, data = ctx.created_note
        assert data["rows"] == 24 and data["format"] == "chat" and data["implied_steps"] == 3
        assert "24 chat rows" in note and "3 steps" in note and data["estimated_tokens"] > 0
        reporter = RecordingReporter()
        result = backend.run(JobSpec(f"job-{mode}", "tiny", ft_storage, cfg, num_cpus=1), reporter)
        metas[mode] = json.loads((result.adapter_path / "training_metadata.json").read_text())
        reporters[mode] = reporter
    padded, free = metas["padded"], metas["padding_free"]
    assert free["speed"]["packed"] is True and padded["speed"]["packed"] is False
    losses = [[p["loss"] for p in m["loss_history"]] for m in (padded, free)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    ds = free["dataset"]
    assert ds["format"] == "chat" and ds["chat_template"] is True and ds["num_train_rows"] == 24
    # one epoch: every row once; the loss only on the answers
    assert free["trained_tokens"] == padded["trained_tokens"] == ds["loss_tokens_per_epoch"]
    assert free["processed_tokens"] == ds["tokens_per_epoch"] > 2 * free["trained_tokens"]
    progress = reporters["padding_free"].progress_calls
    assert progress[-1]["trained_tokens"] == free["trained_tokens"]
    ready = [e for e in reporters["padding_free"].events("info") if "Dataset ready" in e["message"]]
    assert ready and "chat (chat template)" in ready[0]["message"]


def test_truncated_rows_are_counted_with_a_warning(ft_storage, chat_file):
    backend = get_backend("peft_lora")
    cfg = config(chat_file, "padding_free", "chat-cut", max_seq_length=40)
    cfg["training_config"]["max_steps"] = 1
    ctx = ValidationContext(ft_storage, data_roots=[chat_file.parent], model="tiny")
    reporter = RecordingReporter()
    spec = JobSpec("job-cut", "tiny", ft_storage, backend.validate(cfg, ctx), num_cpus=1)
    result = backend.run(spec, reporter)
    meta = json.loads((result.adapter_path / "training_metadata.json").read_text())
    assert meta["dataset"]["truncated_rows"] > 0
    warnings = [e for e in reporter.events("warning") if "max_seq_length" in e["message"]]
    assert warnings and warnings[0]["data"]["truncated_rows"] == meta["dataset"]["truncated_rows"]


def test_chat_data_on_a_model_without_a_template_is_a_400(ft_storage, chat_file):
    from sllm.testing import make_tiny_model_dir

    target = ft_storage / "transformers" / "tiny-bare"
    if not target.exists():
        make_tiny_model_dir(target, with_chat_template=False)
    backend = get_backend("peft_lora")
    ctx = ValidationContext(ft_storage, data_roots=[chat_file.parent], model="tiny-bare")
    with pytest.raises(InvalidRequestError, match="has none") as info:
        backend.validate(config(chat_file, "padded", "bare"), ctx)
    assert info.value.param == "backend_config.dataset_config.format"
