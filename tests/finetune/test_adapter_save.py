"""Saving an adapter over an earlier one: one atomic exchange (the path always holds a whole
adapter), what was replaced is reported, and nothing is left behind under the store's names."""

from __future__ import annotations

import json
import os
import threading

import pytest

from sllm.finetune.peft_lora import METADATA_NAME, save_adapter_atomically
from sllm.store import layout


@pytest.fixture(scope="module")
def peft_parts(ft_storage):
    from peft import get_peft_model

    from sllm.finetune.config import build_lora_config
    from sllm.store import load_model

    model, tokenizer = load_model(ft_storage, "tiny")
    return get_peft_model(model, build_lora_config({"r": 2})), tokenizer


def save(parts, storage, adapter_dir, job_id: str):
    peft_model, tokenizer = parts
    meta = {"job_id": job_id, "created_at": f"time-of-{job_id}"}
    return save_adapter_atomically(peft_model, tokenizer, adapter_dir, meta, "tiny", storage)


def dot_entries(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_exchange_swaps_two_directories_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    assert layout.exchange(a, b) is True  # Linux: renameat2(RENAME_EXCHANGE)
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"
    with pytest.raises(FileNotFoundError):
        layout.exchange(a, tmp_path / "missing")
    assert (a / "f").read_text() == "B"  # a failed exchange changes nothing


def test_replacing_reports_the_previous_adapter_and_leaves_no_scratch(peft_parts, ft_storage):
    adapter = ft_storage / "transformers" / "adapters" / "replace-me"
    assert save(peft_parts, ft_storage, adapter, "job-first") is None  # nothing to replace
    replaced = save(peft_parts, ft_storage, adapter, "job-second")
    assert replaced["job_id"] == "job-first" and replaced["created_at"] == "time-of-job-first"
    assert replaced["path"] == str(adapter) and replaced["modified_at"]
    assert json.loads((adapter / METADATA_NAME).read_text())["job_id"] == "job-second"
    assert dot_entries(adapter.parent) == []

    foreign = ft_storage / "transformers" / "adapters" / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text("{}")  # an adapter sllm did not write
    assert save(peft_parts, ft_storage, foreign, "job-third")["job_id"] is None


def test_a_save_removes_scratch_that_a_dead_worker_left_beside_it(peft_parts, ft_storage):
    parent = ft_storage / "transformers" / "adapters" / "crashed"
    parent.mkdir(parents=True)
    dead = parent / f"{layout.TMP_PREFIX}999999999-abc-{layout._host()}"
    mine = parent / f"{layout.TMP_PREFIX}{os.getpid()}-abc-{layout._host()}"  # a live writer's
    dead.mkdir()
    mine.mkdir()
    save(peft_parts, ft_storage, parent / "adapter", "job-x")
    assert dot_entries(parent) == [mine.name]


def test_readers_always_find_a_whole_adapter_during_replacements(peft_parts, ft_storage):
    adapter = ft_storage / "transformers" / "adapters" / "watched"
    save(peft_parts, ft_storage, adapter, "job-0")
    gaps: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for name in ("adapter_config.json", "adapter_model.safetensors", METADATA_NAME):
                if not os.path.exists(adapter / name):
                    gaps.append(name)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(1, 6):
            save(peft_parts, ft_storage, adapter, f"job-{i}")
    finally:
        stop.set()
        watcher.join()
    assert gaps == []
    assert json.loads((adapter / METADATA_NAME).read_text())["job_id"] == "job-5"


def test_without_exchange_the_two_rename_fallback_still_replaces(
    peft_parts, ft_storage, monkeypatch
):
    """Filesystems without RENAME_EXCHANGE: move aside, rename in, remove the old one."""
    adapter = ft_storage / "transformers" / "adapters" / "fallback"
    save(peft_parts, ft_storage, adapter, "job-a")
    monkeypatch.setattr(layout, "exchange", lambda a, b: False)
    assert save(peft_parts, ft_storage, adapter, "job-b")["job_id"] == "job-a"
    assert json.loads((adapter / METADATA_NAME).read_text())["job_id"] == "job-b"
    assert dot_entries(adapter.parent) == []
